"""Hung dependencies (SIGSTOP, as a stalled or partitioned server looks): requests that do not need the server
never wait for it, those that do answer 503 `{message, code}` within about a second, nothing piles up, and the
product recovers by itself once the server resumes; a turn whose worker loses MongoDB or Redis for a while
resumes, or ends cleanly.

The deadlines here only tell "answered while the server still hangs" from "waited for it": they are generous (a
loaded 2-core machine), and still below what a hang cost before this was built: 7 s for a session read, 11 s for a
turn start's 503, 12 s for a cancel while Redis hung, and tens of seconds for a burst. What a request costs during
a hang is measured by `python -m bench.hangs` (docs/PERFORMANCE.md), not here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from devtools.servers import ManagedProcess, start_mongo, start_redis
from devtools.stack import Stack
from tests.integration.common import events_of, session_of, start_running
from tests.support import wait_until

pytestmark = pytest.mark.integration
POLL = 0.5
SETTINGS = {
    "CANCEL_POLL_INTERVAL": POLL,
    "HEARTBEAT_INTERVAL": 1,
    "REAPER_INTERVAL": 1,
    "CANCEL_RATE_LIMIT": "10000 per minute",
    "DEFAULT_RATE_LIMIT": "10000 per minute",
}
SLOW_APP = '{"steps": 2000, "stepDelay": 0.02}'
FAST_APP = '{"steps": 3, "stepDelay": 0.01}'
# One request during a hang is answered within this, where waiting for the hung server took 7 s or more.
PROMPTLY = 5.0
# A hundred requests during a hang, fifty at a time, where each waiting for a timeout took minutes in all.
BURST_PROMPTLY = 15.0


@pytest.fixture
def own_servers(tmp_path) -> Iterator[tuple[ManagedProcess, ManagedProcess]]:
    """Servers of this test's own, since it stops them."""
    with start_mongo(data_dir=str(tmp_path / "mongo")) as mongo, start_redis() as redis:
        yield mongo, redis


@contextlib.contextmanager
def hung(server: ManagedProcess) -> Iterator[None]:
    """The server stops answering (its connections stay open), until the block ends."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def timed(call: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def assert_unavailable(response: requests.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert set(body) == {"message", "code"} and body["code"] == 503


def _stack(mongo: ManagedProcess, redis: ManagedProcess, **settings: Any) -> Stack:
    return Stack(mongo.url, redis.url, **{**SETTINGS, **settings})


def test_while_redis_hangs_reads_and_cancels_never_wait_and_turn_starts_answer_503_at_once(own_servers):
    mongo, redis = own_servers
    # Redis is what hangs here: MongoDB gets 3 s (a request waits at most REDIS_TIMEOUT for Redis, once, and then
    # MongoDB), so a loaded machine's slow store command is not taken for the failure under test.
    stack = _stack(mongo, redis, MONGO_TIMEOUT=3)
    try:
        stack.start(webs=1, workers=1)
        team = stack.demo["teamId"]
        fast = stack.cli("apps", "create", team, "--name", "fast", "--config", FAST_APP)["appId"]
        slow = stack.cli("apps", "create", team, "--name", "slow", "--config", SLOW_APP)["appId"]
        idle = stack.api("POST", f"/{team}/forms/session/add", {"appId": fast, "message": "hi"}).json()["_id"]
        wait_until(lambda: session_of(stack, idle)["status"] == "waiting", 30, "the first turn")
        running = start_running(stack, slow)
        with hung(redis):
            reads = [timed(lambda: stack.api("GET", f"/{team}/session/{idle}.json")) for _ in range(10)]
            send = timed(lambda: stack.api("POST", f"/{team}/session/{idle}/send-message", {"message": "more"}))
            start = timed(lambda: stack.api("POST", f"/{team}/forms/session/add", {"appId": fast, "message": "x"}))
            cancel = timed(lambda: stack.api("POST", f"/{team}/forms/session/{running}/cancel"))
            # The worker sees the cancel by polling MongoDB: pub/sub is only a wake-up.
            wait_until(lambda: session_of(stack, running)["status"] == "terminated", 30, "the cancel")
            ready = timed(lambda: requests.get(f"{stack.url}/readyz", timeout=10))
            scrape = timed(lambda: requests.get(f"{stack.url}/metrics", timeout=10))
        assert all(r.status_code == 200 for r, _ in reads), [(r.status_code, r.text[:300]) for r, _ in reads]
        assert max(seconds for _, seconds in reads) < PROMPTLY, [round(s, 3) for _, s in reads]
        for response, seconds in (send, start):
            assert_unavailable(response)
            assert seconds < PROMPTLY
        assert cancel[0].status_code == 200 and cancel[1] < PROMPTLY
        assert ready[0].status_code == 503 and ready[0].json()["checks"]["redis"] == "unavailable"
        assert ready[1] < PROMPTLY
        assert scrape[0].status_code == 200 and "agentcloud_metrics_store_up 0.0" in scrape[0].text
        assert scrape[1] < PROMPTLY
        # Redis answers again: turns start, with no restart of anything.
        again = wait_until(
            lambda: (r := stack.api("POST", f"/{team}/forms/session/add", {"appId": fast, "message": "y"})).ok and r,
            20,
            "a turn start after the hang",
        )
        wait_until(lambda: session_of(stack, again.json()["_id"])["status"] == "waiting", 30, "its turn")
        wait_until(lambda: requests.get(f"{stack.url}/readyz", timeout=10).status_code == 200, 20, "readiness")
    finally:
        stack.stop()


def test_while_mongodb_hangs_requests_answer_503_at_once_without_piling_up(own_servers):
    mongo, redis = own_servers
    stack = _stack(mongo, redis, REQUIRE_WORKERS="false")
    try:
        stack.start(webs=1, workers=0)
        team = stack.demo["teamId"]
        path = f"/{team}/sessions.json"
        assert stack.api("GET", path).status_code == 200
        with hung(mongo):
            first = [timed(lambda: stack.api("GET", path)) for _ in range(2)]  # each gunicorn process finds out
            later = [timed(lambda: stack.api("GET", path)) for _ in range(5)]
            start = timed(lambda: stack.api("POST", f"/{team}/forms/session/add", {"appId": stack.demo["appId"]}))
            with ThreadPoolExecutor(50) as pool:
                began = time.monotonic()
                burst = list(pool.map(lambda _: stack.api("GET", path), range(100)))
                burst_seconds = time.monotonic() - began
            ready = timed(lambda: requests.get(f"{stack.url}/readyz", timeout=10))
            alive = timed(lambda: requests.get(f"{stack.url}/healthz", timeout=10))
        for response, seconds in [*first, *later, start]:
            assert_unavailable(response)
            assert seconds < PROMPTLY
        for response in burst:
            assert_unavailable(response)
        assert burst_seconds < BURST_PROMPTLY  # a hundred requests, none held for a timeout
        assert ready[0].status_code == 503 and ready[0].json()["checks"]["mongo"] == "unavailable"
        assert ready[1] < PROMPTLY
        assert alive[0].status_code == 200 and alive[1] < PROMPTLY
        wait_until(lambda: stack.api("GET", path).status_code == 200, 20, "recovery")
        wait_until(lambda: requests.get(f"{stack.url}/readyz", timeout=10).status_code == 200, 20, "readiness")
    finally:
        stack.stop()


def test_a_turn_keeps_streaming_and_stops_on_cancel_while_its_workers_redis_hangs(own_servers):
    mongo, redis = own_servers
    stack = _stack(mongo, redis)
    try:
        stack.start(webs=1, workers=1)
        team = stack.demo["teamId"]
        slow = stack.cli("apps", "create", team, "--name", "slow", "--config", SLOW_APP)["appId"]
        sid = start_running(stack, slow)
        with hung(redis):
            written = len(events_of(stack, sid))
            wait_until(lambda: len(events_of(stack, sid)) > written + 3, 10, "output to keep landing")
            assert stack.api("POST", f"/{team}/forms/session/{sid}/cancel").status_code == 200
            ended = wait_until(lambda: (s := session_of(stack, sid))["status"] == "terminated" and s, 30, "the cancel")
        assert ended["endReason"] == "cancelled"
        events = events_of(stack, sid)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["type"] for e in events].count("status") == 1 and events[-1]["type"] == "status"
        # The worker's RQ loop carried on: a new turn runs.
        fast = stack.cli("apps", "create", team, "--name", "fast", "--config", FAST_APP)["appId"]
        new = wait_until(
            lambda: (r := stack.api("POST", f"/{team}/forms/session/add", {"appId": fast, "message": "y"})).ok and r,
            20,
            "a turn start after the hang",
        )
        wait_until(lambda: session_of(stack, new.json()["_id"])["status"] == "waiting", 30, "its turn")
    finally:
        stack.stop()


@pytest.mark.parametrize("hang_seconds", [3.0, 8.0], ids=["shorter-than-the-heartbeat-timeout", "longer"])
def test_a_turn_whose_mongodb_hangs_resumes_or_ends_cleanly(own_servers, hang_seconds):
    mongo, redis = own_servers
    stack = _stack(mongo, redis, HEARTBEAT_TIMEOUT=5)
    steps = 150
    try:
        stack.start(webs=1, workers=1)
        team = stack.demo["teamId"]
        app_id = stack.cli(
            "apps", "create", team, "--name", "s", "--config", f'{{"steps": {steps}, "stepDelay": 0.04}}'
        )
        sid = start_running(stack, app_id["appId"])
        with hung(mongo):
            time.sleep(hang_seconds)  # how long the fault lasts, not a wait for anything
        session = wait_until(
            lambda: (s := session_of(stack, sid))["status"] != "running" and s, 60, "the turn to finish or end"
        )
        events = events_of(stack, sid)
        assert [e["seq"] for e in events] == list(range(1, session["lastSeq"] + 1))
        statuses = [e for e in events if e["type"] == "status"]
        output = "".join(e.get("text", "") for e in events if e["type"] == "output")
        if hang_seconds < 5:
            # Shorter than HEARTBEAT_TIMEOUT: the turn carried on where it was, every piece written once.
            assert session["status"] == "waiting" and statuses == [], session
            assert len(output.split()) == steps and session["tokensUsed"] == steps
        else:
            # Longer: the turn may have been taken for lost; if so it ended once, with one closing event.
            assert session["status"] in ("waiting", "error"), session
            if session["status"] == "error":
                assert len(statuses) == 1 and events[-1] is statuses[0] and session["endReason"] == "worker_lost"
            else:
                assert statuses == [] and session["tokensUsed"] == steps
    finally:
        stack.stop()
