"""A flood of turns from one team does not hold back another team's first turn (one fork-mode worker)."""

from __future__ import annotations

import pytest
import requests

from devtools.stack import Stack
from tests.integration.common import session_of
from tests.support import wait_until

pytestmark = pytest.mark.integration


def test_a_flood_from_one_team_does_not_delay_another_teams_first_turn(mongo_server, redis_server):
    stack = Stack(mongo_server.url, redis_server.url, WORKER_MODE="fork", CANCEL_POLL_INTERVAL=0.2)
    try:
        stack.start(webs=1, workers=1)
        team = stack.demo["teamId"]
        slow = stack.cli("apps", "create", team, "--name", "slow", "--config", '{"steps": 25, "stepDelay": 0.04}')
        # Team B is ready before the flood starts.
        other = stack.cli("users", "create", "b@example.com", "--password", "longenough", "--team", "Team B")
        key = stack.cli("apikeys", "create", "b@example.com")["key"]
        quick = stack.cli(
            "apps", "create", other["teamId"], "--name", "quick", "--config", '{"steps": 2, "stepDelay": 0}'
        )
        flood = [
            stack.api("POST", f"/{team}/forms/session/add", {"appId": slow["appId"], "message": f"n{n}"}).json()["_id"]
            for n in range(10)
        ]
        wait_until(lambda: session_of(stack, flood[0])["status"] == "running", 60, "the flood's first turn")
        headers = {"Authorization": f"Bearer {key}"}
        created = requests.post(
            f"{stack.url}/{other['teamId']}/forms/session/add",
            json={"appId": quick["appId"], "message": "me too"},
            headers=headers,
            timeout=10,
        ).json()["_id"]

        def b_session() -> dict:
            return requests.get(
                f"{stack.url}/{other['teamId']}/session/{created}.json", headers=headers, timeout=10
            ).json()["session"]

        done = wait_until(lambda: (s := b_session())["status"] == "waiting" and s, 120, "team B's turn")
        started = {sid: session_of(stack, sid).get("turnStartedAt") for sid in flood}
        # One worker: team B's turn ran as soon as the worker was free, right after the flood's running turn (a
        # second may have started between B's request and its answer, no more).
        later = [sid for sid, at in started.items() if not at or at > done["turnStartedAt"]]
        assert len(later) >= len(flood) - 2, started
    finally:
        for sid in locals().get("flood", []):
            stack.api("POST", f"/{stack.demo['teamId']}/forms/session/{sid}/cancel")
        stack.stop()
