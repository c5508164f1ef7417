"""With no worker alive at all, the web process's own reaper still ends what must end: a turn whose queue time
ran out, and a running turn whose worker was killed."""

from __future__ import annotations

import pytest

from devtools.stack import Stack
from tests.integration.common import events_of, session_of, start_running
from tests.support import wait_until

pytestmark = pytest.mark.integration

SLOW = '{"steps": 400, "stepDelay": 0.05}'


def test_with_every_worker_gone_the_web_reaper_ends_expired_and_lost_turns(mongo_server, redis_server):
    stack = Stack(
        mongo_server.url, redis_server.url, REAPER_INTERVAL=0.5, HEARTBEAT_TIMEOUT=3, CANCEL_POLL_INTERVAL=0.2
    )
    try:
        stack.start(webs=1, workers=1)
        team = stack.demo["teamId"]
        slow = stack.cli("apps", "create", team, "--name", "slow", "--config", SLOW)["appId"]
        running = start_running(stack, slow)
        (worker,) = stack.workers
        stack.kill(worker)  # the only worker, and nothing restarts it

        added = stack.api("POST", f"/{team}/forms/app/add", {"name": "short wait", "limits": {"queueTtl": 1}})
        assert added.status_code in (200, 201), added.text
        queued = stack.api("POST", f"/{team}/forms/session/add", {"appId": added.json()["_id"], "message": "hi"})
        assert queued.status_code == 200, queued.text
        waiting = queued.json()["_id"]

        expired = wait_until(
            lambda: (s := session_of(stack, waiting))["status"] != "started" and s, 60, "the queued turn to expire"
        )
        assert (expired["status"], expired["endReason"]) == ("terminated", "expired"), expired
        lost = wait_until(
            lambda: (s := session_of(stack, running))["status"] != "running" and s, 60, "the lost turn to be reaped"
        )
        assert (lost["status"], lost["endReason"]) == ("error", "worker_lost"), lost
        events = events_of(stack, running)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # the transcript is whole
        assert any(e["type"] == "output" for e in events) and events[-1]["type"] == "status"
    finally:
        stack.stop()
