"""Cancellation semantics with the parts in separate processes (gunicorn, two `python -m workers`, the servers):
a cancel racing a worker's claim ends every session exactly once, and each limit ends its session with its
reason, enforced by the worker's watch or the reaper."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from devtools.stack import Stack
from tests.integration.common import events_of, session_of
from tests.support import wait_until

pytestmark = pytest.mark.integration

ROUNDS = 40


@pytest.fixture
def stack(mongo_server, redis_server) -> Iterator[Stack]:
    stack = Stack(
        mongo_server.url,
        redis_server.url,
        CANCEL_POLL_INTERVAL=0.2,
        REAPER_INTERVAL=0.5,
        CANCEL_RATE_LIMIT="100000 per minute",
        DEFAULT_RATE_LIMIT="100000 per minute",
    )
    try:
        yield stack.start(webs=1, workers=2)
    finally:
        stack.stop()


def _app(stack: Stack, config: dict[str, Any], limits: dict[str, Any] | None = None) -> str:
    body = {"name": "semantics", "config": config, "limits": limits or {}}
    added = stack.api("POST", f"/{stack.demo['teamId']}/forms/app/add", body)
    assert added.status_code in (200, 201), added.text
    return str(added.json()["_id"])


def _ended(stack: Stack, sid: str) -> dict[str, Any]:
    return wait_until(
        lambda: (s := session_of(stack, sid))["status"] in ("terminated", "error") and s, 60, f"session {sid} to end"
    )


def test_cancels_racing_the_workers_claims_end_every_session_exactly_once(stack):
    team = stack.demo["teamId"]
    app_id = _app(stack, {"steps": 2, "stepDelay": 0.01})

    def start_and_cancel(n: int) -> tuple[str, str]:
        sid = stack.api("POST", f"/{team}/forms/session/add", {"appId": app_id, "message": f"go {n}"}).json()["_id"]
        cancelled = stack.api("POST", f"/{team}/forms/session/{sid}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        return sid, cancelled.json()["cancelledAt"]

    with ThreadPoolExecutor(8) as pool:  # the workers claim while these cancel, in every interleaving
        started = list(pool.map(start_and_cancel, range(ROUNDS)))
    for sid, stamped in started:
        session = _ended(stack, sid)
        assert (session["status"], session["endReason"]) == ("terminated", "cancelled"), session
        assert session["cancelledAt"] == stamped  # stamped once, never moved
        events = events_of(stack, sid)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
        assert [e["type"] for e in events].count("status") == 1 and events[-1]["type"] == "status", events
        assert [e["type"] for e in events].count("cancel") == 1, events


def test_each_limit_ends_its_session_with_its_reason(stack):
    team = stack.demo["teamId"]
    long_turn = _app(stack, {"steps": 2000, "stepDelay": 0.02}, {"maxTurnSeconds": 1})
    short_turn = _app(stack, {"steps": 2, "stepDelay": 0}, {"idleTimeout": 1})
    timed = stack.api("POST", f"/{team}/forms/session/add", {"appId": long_turn, "message": "long"}).json()["_id"]
    idle = stack.api("POST", f"/{team}/forms/session/add", {"appId": short_turn, "message": "short"}).json()["_id"]

    over_time = _ended(stack, timed)
    assert (over_time["status"], over_time["endReason"]) == ("error", "timed_out"), over_time
    assert any(e["type"] == "output" for e in events_of(stack, timed))  # what came before the limit is kept
    left_idle = _ended(stack, idle)
    assert (left_idle["status"], left_idle["endReason"]) == ("terminated", "expired"), left_idle
    events = events_of(stack, idle)
    # The turn ran and left the session waiting; then the limit cancelled it for its team.
    assert [e["type"] for e in events][-3:] == ["turn_end", "cancel", "status"], events
    assert events[-2]["source"] == "limit" and events[-2]["by"] is None, events[-2]
