"""Thread-mode worker processes (`python -m workers`, several turns each) under what operators do to them:
SIGTERM past the grace, a turn over TURN_TIMEOUT, RQ's stop-job command, and webhook deliveries while every turn
slot is busy. Real gunicorn, Redis and MongoDB-wire server; the deadlines bound a hang, they measure nothing."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from rq.command import send_stop_job_command

from devtools.stack import Stack
from tests.fakes.receiver import Receiver
from tests.integration.common import events_of, session_of, start_running
from tests.support import wait_until

pytestmark = pytest.mark.integration

STEPS = 300
# About 9 s a turn: long past the shutdown grace, short enough for another worker to run it again in the test.
LONG = json.dumps({"steps": STEPS, "stepDelay": 0.03, "reply": "w"})


def _app(stack: Stack, name: str, config: str) -> str:
    return stack.cli("apps", "create", stack.demo["teamId"], "--name", name, "--config", config)["appId"]


def _worker_of(stack: Stack, sid: str) -> str:
    import pymongo
    from bson import ObjectId

    client = pymongo.MongoClient(stack.env["MONGO_URI"])
    try:
        return client.get_default_database().sessions.find_one({"_id": ObjectId(sid)})["workerId"]
    finally:
        client.close()


def _gap_free(events: list[dict[str, Any]]) -> bool:
    return [e["seq"] for e in events] == list(range(1, len(events) + 1))


@pytest.fixture
def make_stack(mongo_server, redis_server) -> Iterator[Any]:
    made: list[Stack] = []

    def _make(workers: int = 1, **settings: Any) -> Stack:
        stack = Stack(
            mongo_server.url,
            redis_server.url,
            WORKER_MODE="thread",
            CANCEL_POLL_INTERVAL=0.5,
            OUTPUT_FLUSH_INTERVAL=0.1,
            **settings,
        )
        made.append(stack)
        return stack.start(webs=1, workers=workers)

    yield _make
    for stack in made:
        stack.stop()


def _sigterm_and_wait(stack: Stack, victim: Any) -> None:
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(60) == 0  # a warm shutdown: it drains, hands its turns back and exits by itself


def test_sigterm_past_the_grace_hands_running_turns_to_another_worker_which_runs_them_again(make_stack):
    stack = make_stack(WORKER_SHUTDOWN_GRACE=0.5, WORKER_INTERRUPT_GRACE=5)
    team, app_id = stack.demo["teamId"], _app(stack, "long", LONG)
    sids = [start_running(stack, app_id) for _ in range(3)]
    victim = stack.workers[0]
    assert {_worker_of(stack, sid) for sid in sids} == {_worker_of(stack, sids[0])}  # all three in the victim
    before = {sid: events_of(stack, sid) for sid in sids}
    _sigterm_and_wait(stack, victim)
    # Handed back, not ended: each session waits for a worker again, its turn still in flight.
    for sid in sids:
        session = session_of(stack, sid)
        assert session["status"] == "waiting" and session["turnInFlight"] and not session.get("endReason")
    stack.start_worker()  # another worker takes the turns from the queue, through RQ
    for sid in sids:
        wait_until(lambda sid=sid: not session_of(stack, sid)["turnInFlight"], 120, "the turn to run again")
    for sid in sids:
        session, events = session_of(stack, sid), events_of(stack, sid)
        assert session["status"] == "waiting" and not session.get("endedAt")
        assert _gap_free(events)
        assert events[: len(before[sid])] == before[sid]  # what was written stays as it was
        marks = [e for e in events if e["type"] == "turn_end" and e.get("retry")]
        assert len(marks) == 1 and marks[0]["retry"] == 1 and marks[0]["interrupted"] is True
        assert "will run again" in marks[0]["message"]
        cut = events.index(marks[0])
        before_cut = [e for e in events[:cut] if e["type"] == "output"]
        assert before_cut  # the partial output is kept (marked cut off by the mark, or on its last piece)
        rerun = "".join(e["text"] for e in events[cut:] if e["type"] == "output")
        assert rerun == " ".join(["w"] * STEPS)  # run again from the user's message, to its end
        assert events[-1]["type"] == "turn_end" and not events[-1].get("retry") and not events[-1].get("interrupted")
    # Retryable means live: the conversation goes on.
    sent = stack.api("POST", f"/{team}/session/{sids[0]}/send-message", {"message": "and then?"})
    assert sent.status_code == 200, sent.text


def test_a_turn_interrupted_by_shutdown_more_often_than_allowed_ends_worker_lost(make_stack):
    stack = make_stack(WORKER_SHUTDOWN_GRACE=0.2, TURN_SHUTDOWN_RETRIES=1)
    sid = start_running(stack, _app(stack, "long", LONG))
    _sigterm_and_wait(stack, stack.workers[0])
    assert session_of(stack, sid)["status"] == "waiting"
    second = stack.start_worker()
    wait_until(
        lambda: (
            session_of(stack, sid)["status"] == "running"
            and events_of(stack, sid)[-1]["type"] == "output"
            and _worker_of(stack, sid).endswith(f":{second.pid}")
        ),
        60,
        "the second worker to run it",
    )
    _sigterm_and_wait(stack, second)
    session, events = session_of(stack, sid), events_of(stack, sid)
    assert session["status"] == "error" and session["endReason"] == "worker_lost" and session["endedAt"]
    assert _gap_free(events)
    assert [e["retry"] for e in events if e["type"] == "turn_end" and e.get("retry")] == [1]
    closing = events[-1]
    assert closing["type"] == "status" and closing["endReason"] == "worker_lost"
    assert "TURN_SHUTDOWN_RETRIES" in closing["message"] and "send the message again" not in closing["message"]


def test_a_turn_over_turn_timeout_ends_timed_out_while_a_short_sibling_completes(make_stack):
    stack = make_stack(TURN_TIMEOUT=3)
    long_sid = start_running(stack, _app(stack, "long", json.dumps({"steps": 2000, "stepDelay": 0.02})))
    team, short_app = stack.demo["teamId"], _app(stack, "short", json.dumps({"steps": 5, "stepDelay": 0.05}))
    short_sid = stack.api("POST", f"/{team}/forms/session/add", {"appId": short_app, "message": "go"}).json()["_id"]
    ended = wait_until(lambda: (s := session_of(stack, long_sid))["status"] == "error" and s, 60, "the time limit")
    assert ended["endReason"] == "timed_out"
    events = events_of(stack, long_sid)
    assert _gap_free(events) and events[-1]["endReason"] == "timed_out"
    assert any(e["type"] == "output" for e in events)  # the partial output is kept
    wait_until(lambda: session_of(stack, short_sid)["status"] == "waiting", 60, "the short turn")
    short = events_of(stack, short_sid)
    assert _gap_free(short) and short[-1]["type"] == "turn_end" and not short[-1].get("interrupted")
    assert _worker_of(stack, short_sid) == _worker_of(stack, long_sid)  # siblings in the one process


def test_rq_stop_job_on_a_running_turn_cancels_that_session_alone(make_stack):
    stack = make_stack()
    app_id = _app(stack, "medium", json.dumps({"steps": 150, "stepDelay": 0.03}))
    sids = [start_running(stack, app_id) for _ in range(3)]
    assert len({_worker_of(stack, sid) for sid in sids}) == 1
    turn = session_of(stack, sids[0])["activeTurnId"]
    send_stop_job_command(redis.Redis.from_url(stack.env["REDIS_URL"]), f"turn-{turn}")
    ended = wait_until(lambda: (s := session_of(stack, sids[0]))["status"] == "terminated" and s, 60, "the stop")
    assert ended["endReason"] == "cancelled" and ended["cancellation"]["by"]["kind"] == "system"
    assert _gap_free(events_of(stack, sids[0]))
    for sid in sids[1:]:
        wait_until(lambda sid=sid: session_of(stack, sid)["status"] == "waiting", 60, "the siblings to finish")
        events = events_of(stack, sid)
        assert _gap_free(events) and not any(e.get("interrupted") for e in events)


def test_a_webhook_is_delivered_while_every_turn_slot_is_busy(make_stack):
    stack = make_stack(TURN_CONCURRENCY=2, WEBHOOK_ALLOW_PRIVATE="true")
    team = stack.demo["teamId"]
    receiver = Receiver().start()
    try:
        stack.api("POST", f"/{team}/forms/webhook/add", {"url": receiver.url, "eventTypes": ["session.ended"]})
        app_id = _app(stack, "long", json.dumps({"steps": 3000, "stepDelay": 0.02}))
        busy = [start_running(stack, app_id) for _ in range(2)]  # both turn slots of the only worker
        sid = stack.api("POST", f"/{team}/forms/session/add", {"appId": app_id, "message": "go"}).json()["_id"]
        assert session_of(stack, sid)["queued"] is True  # no turn slot is free for it
        stack.api("POST", f"/{team}/forms/session/{sid}/cancel")  # a queued turn ends at once: session.ended
        wait_until(lambda: receiver.received, 60, "the delivery")
        # Delivered by the busy worker while its turns still ran: the delivery did not wait for a turn slot.
        assert all(session_of(stack, s)["status"] == "running" for s in busy)
        body = json.loads(receiver.received[0]["body"])
        assert body["type"] == "session.ended" and body["data"]["sessionId"] == sid
    finally:
        receiver.stop()
