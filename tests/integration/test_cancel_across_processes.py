"""Cancel crosses a process boundary: HTTP to gunicorn, a stamp in MongoDB, a worker process that stops.

Run against both worker modes (thread: many turns per process; fork: one forked process per turn). The
deadlines below bound a hang; how fast a cancel lands is measured by `make bench`, not asserted here.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from devtools.stack import Stack
from tests.fakes.openai_server import FakeOpenAI
from tests.integration.common import events_of, session_of, start_running
from tests.support import reply_was_cut_off, wait_until

pytestmark = pytest.mark.integration

POLL = 0.5
SLOW = '{"steps": 2000, "stepDelay": 0.02}'
MODES = ["thread", "fork"]


def _stack(mongo_server, redis_server, **settings) -> Iterator[Stack]:
    stack = Stack(mongo_server.url, redis_server.url, CANCEL_POLL_INTERVAL=POLL, OUTPUT_FLUSH_INTERVAL=0.1, **settings)
    try:
        yield stack.start(webs=1, workers=1)
    finally:
        stack.stop()


@pytest.fixture(params=[(mode, notices) for mode in MODES for notices in ("pubsub", "polling-only")], ids=str)
def stack(request, mongo_server, redis_server) -> Iterator[Stack]:
    mode, notices = request.param
    yield from _stack(
        mongo_server, redis_server, WORKER_MODE=mode, CANCEL_PUBSUB="true" if notices == "pubsub" else "false"
    )


def _session_doc_worker(stack: Stack, sid: str) -> str:
    """The `workerId` (host:pid) recorded on the session by the process running its turn."""
    import pymongo
    from bson import ObjectId

    client = pymongo.MongoClient(stack.env["MONGO_URI"])
    try:
        return client.get_default_database().sessions.find_one({"_id": ObjectId(sid)})["workerId"]
    finally:
        client.close()


def _slow_app(stack: Stack) -> str:
    return stack.cli("apps", "create", stack.demo["teamId"], "--name", "slow", "--config", SLOW)["appId"]


def test_cancel_over_http_stops_the_worker(stack):
    team = stack.demo["teamId"]
    sid = start_running(stack, _slow_app(stack))
    assert session_of(stack, sid)["status"] == "running"
    response = stack.api("POST", f"/{team}/forms/session/{sid}/cancel", {"reason": "enough"})
    assert response.status_code == 200 and response.json()["ok"] is True
    ended = wait_until(lambda: (s := session_of(stack, sid))["status"] == "terminated" and s, 30, "the end")
    assert ended["endReason"] == "cancelled" and ended["cancellation"]["reason"] == "enough"
    events = events_of(stack, sid)
    assert reply_was_cut_off(events)
    assert events[-1]["type"] == "status" and events[-1]["status"] == "terminated"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    again = stack.api("POST", f"/{team}/forms/session/{sid}/cancel").json()
    assert again["alreadyCancelled"] is True and again["cancelledAt"] == ended["cancelledAt"]


@pytest.fixture(params=MODES)
def polling_stack(request, mongo_server, redis_server) -> Iterator[Stack]:
    # The fake upstream listens on loopback.
    yield from _stack(
        mongo_server, redis_server, CANCEL_PUBSUB="false", WORKER_MODE=request.param, UPSTREAM_ALLOW_PRIVATE="true"
    )


def test_cancel_closes_the_upstream_openai_stream(polling_stack):
    stack = polling_stack
    fake = FakeOpenAI(chunks=5000, interval=0.01).start()
    try:
        team = stack.demo["teamId"]
        config = f'{{"model": "fake", "baseUrl": "{fake.base_url}", "apiKey": "sk-test"}}'
        app_id = stack.cli("apps", "create", team, "--name", "llm", "--runner", "openai", "--config", config)["appId"]
        sid = start_running(stack, app_id)
        stack.api("POST", f"/{team}/forms/session/{sid}/cancel")
        wait_until(lambda: fake.streams[0]["closed_by_client"], 30, "the upstream stream to close")
        # The fake stops writing once the worker hung up: the stream was cut short, not finished.
        assert not fake.streams[0]["done"]
        wait_until(lambda: session_of(stack, sid)["status"] == "terminated", 30, "the session to end")
    finally:
        fake.stop()


def test_a_queued_turn_with_no_worker_cancels_at_once_and_deletes(mongo_server, redis_server):
    stack = Stack(mongo_server.url, redis_server.url, REQUIRE_WORKERS="false")
    try:
        stack.start(webs=1, workers=0)
        team = stack.demo["teamId"]
        sid = stack.api("POST", f"/{team}/forms/session/add", {"appId": stack.demo["appId"], "message": "hi"}).json()[
            "_id"
        ]
        assert session_of(stack, sid)["queued"] is True
        cancelled = stack.api("POST", f"/{team}/forms/session/{sid}/cancel").json()
        assert cancelled["status"] == "terminated" and cancelled["endReason"] == "cancelled"
        assert stack.api("DELETE", f"/{team}/forms/session/{sid}").status_code == 200
        assert stack.api("GET", f"/{team}/session/{sid}.json").status_code == 404
    finally:
        stack.stop()


@pytest.fixture(params=MODES)
def reaper_stack(request, mongo_server, redis_server) -> Iterator[Stack]:
    stack = Stack(
        mongo_server.url,
        redis_server.url,
        CANCEL_POLL_INTERVAL=POLL,
        HEARTBEAT_INTERVAL=0.2,
        HEARTBEAT_TIMEOUT=2,
        REAPER_INTERVAL=0.5,
        WORKER_MODE=request.param,
    )
    try:
        yield stack.start(webs=1, workers=1)
    finally:
        stack.stop()


def test_killed_worker_is_reaped_with_transcript_intact(reaper_stack):
    stack = reaper_stack
    sid = start_running(stack, _slow_app(stack))
    before = events_of(stack, sid)
    victim = stack.workers[0]
    stack.start_worker()  # the survivor, whose reaper notices the loss
    # The machine running the turn is lost: the worker and (in fork mode) the job process it forked, which RQ
    # puts in a session of its own, die at once.
    turn_pid = int(_session_doc_worker(stack, sid).rsplit(":", 1)[1])
    stack.kill(victim)
    if turn_pid != victim.pid:
        os.kill(turn_pid, signal.SIGKILL)
    ended = wait_until(lambda: (s := session_of(stack, sid))["status"] == "error" and s, 30, "the reaper")
    events = events_of(stack, sid)
    assert [e["seq"] for e in events[: len(before)]] == [e["seq"] for e in before]
    assert ended["endReason"] == "worker_lost" and "Worker lost" in events[-1]["message"] and ended["endedAt"]


@pytest.fixture
def fork_stack(mongo_server, redis_server) -> Iterator[Stack]:
    yield from _stack(mongo_server, redis_server, CANCEL_PUBSUB="false", WORKER_MODE="fork")


def test_killed_job_process_ends_its_session_at_once(fork_stack):
    """Fork mode: only the forked process running the turn dies (say, the OOM killer): its worker ends the
    session straight away, long before the heartbeat bound (30 s here)."""
    stack = fork_stack
    sid = start_running(stack, _slow_app(stack))
    os.kill(int(_session_doc_worker(stack, sid).rsplit(":", 1)[1]), signal.SIGKILL)
    ended = wait_until(lambda: (s := session_of(stack, sid))["status"] == "error" and s, 20, "the worker")
    assert ended["endReason"] == "worker_lost"
    assert "process running this turn died" in events_of(stack, sid)[-1]["message"]


def test_many_turns_in_one_thread_mode_process_and_a_cancel_stops_only_its_own(mongo_server, redis_server):
    stack = Stack(mongo_server.url, redis_server.url, CANCEL_POLL_INTERVAL=POLL, WORKER_MODE="thread")
    try:
        stack.start(webs=1, workers=1)
        team = stack.demo["teamId"]
        app_id = stack.cli("apps", "create", team, "--name", "six", "--config", '{"steps": 60, "stepDelay": 0.05}')[
            "appId"
        ]
        sids = [start_running(stack, app_id) for _ in range(5)]
        workers = {_session_doc_worker(stack, sid) for sid in sids}
        assert len(workers) == 1  # all five in the one process
        stack.api("POST", f"/{team}/forms/session/{sids[0]}/cancel")
        for sid in sids[1:]:
            wait_until(lambda sid=sid: session_of(stack, sid)["status"] == "waiting", 60, "the other turns")
        assert session_of(stack, sids[0])["endReason"] == "cancelled"
        for sid in sids[1:]:
            outputs = [e for e in events_of(stack, sid) if e["type"] == "output"]
            assert not any(e.get("interrupted") for e in outputs)
    finally:
        stack.stop()


def test_kill_9_of_a_thread_mode_worker_ends_all_of_its_turns_worker_lost(mongo_server, redis_server):
    """Thread mode: one process runs three turns; `kill -9` of it ends all three `worker_lost` (the survivor's
    reaper), each transcript kept as written, gap-free, with one closing event."""
    stack = Stack(
        mongo_server.url,
        redis_server.url,
        CANCEL_POLL_INTERVAL=POLL,
        HEARTBEAT_INTERVAL=0.2,
        HEARTBEAT_TIMEOUT=2,
        REAPER_INTERVAL=0.5,
        WORKER_MODE="thread",
    )
    try:
        stack.start(webs=1, workers=1)
        app_id = _slow_app(stack)
        sids = [start_running(stack, app_id) for _ in range(3)]
        victim = stack.workers[0]
        assert {_session_doc_worker(stack, sid) for sid in sids} == {_session_doc_worker(stack, sids[0])}
        stack.start_worker()  # the survivor, whose reaper notices the loss
        stack.kill(victim)
        before = {sid: events_of(stack, sid) for sid in sids}  # nothing more is written once it is dead
        for sid in sids:
            wait_until(lambda sid=sid: session_of(stack, sid)["status"] == "error", 60, "the reaper")
        for sid in sids:
            session, events = session_of(stack, sid), events_of(stack, sid)
            assert session["endReason"] == "worker_lost" and session["endedAt"]
            assert events[: len(before[sid])] == before[sid]
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert [e["type"] for e in events].count("status") == 1 and events[-1]["type"] == "status"
            assert "Worker lost" in events[-1]["message"]
    finally:
        stack.stop()
