"""Turns run in-process (mongomock + real Redis): streaming, completion, cancel, errors, races, reaping."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from bson import ObjectId
from flask import Flask

from agentcloud_clone.db import get_db
from agentcloud_clone.jobs.turns import reap_lost_turns, run_turn
from agentcloud_clone.jobs.watcher import stop_watchers
from agentcloud_clone.repositories.accounts import find_team
from agentcloud_clone.services import sessions as service

FAST = {"CANCEL_POLL_INTERVAL": 0.05, "OUTPUT_FLUSH_INTERVAL": 0.05, "HEARTBEAT_INTERVAL": 0.05}


@pytest.fixture
def app(redis_server) -> Iterator[Flask]:
    from agentcloud_clone import create_app
    from tests.conftest import make_test_config

    yield create_app(make_test_config(redis_server.url, "mongomock://localhost/{db}", **FAST))
    stop_watchers()


class Harness:
    """Starts sessions through the services and runs their turns the way a worker does."""

    def __init__(self, app: Flask, factory: Any) -> None:
        self.app = app
        self.user = factory.user("member")
        self.factory = factory
        with app.app_context():
            self.team = find_team(ObjectId(self.user.team_id))

    def start(self, message: str | None = "hello", runner: str = "scripted", **config: Any) -> dict[str, Any]:
        app_id = self.factory.app_record(self.user.team_id, runner, **config)
        with self.app.app_context():
            return service.create_session(self.team, ObjectId(self.user.account_id), ObjectId(app_id), None, message)

    def doc(self, session: dict[str, Any]) -> dict[str, Any]:
        with self.app.app_context():
            return get_db().sessions.find_one({"_id": session["_id"]})

    def events(self, session: dict[str, Any]) -> list[dict[str, Any]]:
        with self.app.app_context():
            return list(get_db().session_events.find({"sessionId": session["_id"]}).sort("seq", 1))

    def run(self, session: dict[str, Any]) -> dict[str, Any]:
        turn = self.doc(session)["activeTurnId"]
        with self.app.app_context():
            return run_turn(str(session["teamId"]), str(session["_id"]), str(turn))

    def run_in_thread(self, session: dict[str, Any]) -> tuple[threading.Thread, list[dict[str, Any]]]:
        result: list[dict[str, Any]] = []
        thread = threading.Thread(target=lambda: result.append(self.run(session)))
        thread.start()
        return thread, result

    def cancel(self, session: dict[str, Any]) -> service.CancelOutcome:
        with self.app.app_context():
            return service.cancel_session(session["teamId"], session["_id"], ObjectId(self.user.account_id))

    def wait_for(self, predicate, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.01)
        raise AssertionError("condition not reached in time")


@pytest.fixture
def harness(app, factory) -> Harness:
    return Harness(app, factory)


def test_full_turn_streams_output_and_waits_for_next_message(harness):
    session = harness.start(steps=5, stepDelay=0.02, reply="one two three four five")
    assert harness.run(session)["outcome"] == "completed"
    doc = harness.doc(session)
    assert doc["status"] == "waiting" and doc["activeTurnId"] is None and doc["tokensUsed"] == 5
    events = harness.events(session)
    output = "".join(e["text"] for e in events if e["type"] == "output")
    assert output == "one two three four five"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "turn_end"


def test_output_is_batched_not_written_per_piece(harness):
    session = harness.start(steps=40, stepDelay=0.005)
    harness.run(session)
    writes = [e for e in harness.events(session) if e["type"] == "output"]
    assert 1 <= len(writes) < 40


def test_session_can_end_normally_and_cancel_then_reports_already_ended(harness):
    session = harness.start(steps=1, stepDelay=0, endAfterTurns=1)
    assert harness.run(session)["status"] == "terminated"
    outcome = harness.cancel(session)
    assert outcome.already_ended and "cancelledAt" not in harness.doc(session)


def test_cancel_mid_turn_keeps_partial_output_and_ends_terminated(harness):
    session = harness.start(steps=200, stepDelay=0.02)
    thread, result = harness.run_in_thread(session)
    harness.wait_for(lambda: any(e["type"] == "output" for e in harness.events(session)))
    cancelled_at = time.monotonic()
    harness.cancel(session)
    thread.join(5)
    stopped_after = time.monotonic() - cancelled_at
    assert result[0]["outcome"] == "cancelled"
    assert stopped_after < 0.05 + 0.5  # one poll interval plus a margin
    doc = harness.doc(session)
    assert doc["status"] == "terminated" and doc["endedAt"] and doc["cancelledAt"]
    events = harness.events(session)
    types = [e["type"] for e in events]
    assert "cancel" in types and types[-1] == "status"
    outputs = [e for e in events if e["type"] == "output"]
    assert outputs[-1].get("interrupted") is True
    assert 0 < doc["tokensUsed"] < 200


def test_cancel_twice_mid_turn_keeps_first_stamp(harness):
    session = harness.start(steps=100, stepDelay=0.02)
    thread, _ = harness.run_in_thread(session)
    harness.wait_for(lambda: harness.doc(session)["status"] == "running")
    first = harness.cancel(session)
    second = harness.cancel(session)
    thread.join(5)
    assert not first.already_cancelled and second.already_cancelled
    assert harness.doc(session)["cancelledAt"] == first.session["cancelledAt"]


def test_cancelling_a_waiting_session_ends_it_at_once(harness):
    session = harness.start(steps=1, stepDelay=0)
    harness.run(session)
    assert harness.doc(session)["status"] == "waiting"
    outcome = harness.cancel(session)
    assert outcome.session["status"] == "terminated" and not outcome.already_cancelled


def test_queued_turn_of_cancelled_session_does_not_run(harness):
    session = harness.start(steps=3, stepDelay=0)
    harness.cancel(session)
    assert harness.run(session)["outcome"] == "cancelled-before-start"
    assert harness.doc(session)["status"] == "terminated"
    assert not [e for e in harness.events(session) if e["type"] == "output"]


def test_runner_that_raises_ends_session_error_with_message(harness):
    session = harness.start(steps=5, stepDelay=0, failAtStep=3)
    assert harness.run(session)["outcome"] == "error"
    doc = harness.doc(session)
    assert doc["status"] == "error" and doc["endedAt"]
    errors = [e for e in harness.events(session) if e["type"] == "error"]
    assert "failed at step 3" in errors[-1]["message"]


def test_completion_racing_cancel_never_revives_the_session(harness, monkeypatch):
    """The cancel lands after the last piece but before the completion write: the cancel wins."""
    from agentcloud_clone.jobs import turns

    session = harness.start(steps=2, stepDelay=0)
    original_flush = turns.OutputWriter.flush

    def flush_then_cancel(self, *, interrupted=False):
        original_flush(self, interrupted=interrupted)
        if not interrupted and not self.cancel.is_set():
            harness.cancel(session)

    monkeypatch.setattr(turns.OutputWriter, "flush", flush_then_cancel)
    assert harness.run(session)["outcome"] == "cancelled"
    doc = harness.doc(session)
    assert doc["status"] == "terminated" and doc["cancelledAt"]


def test_ended_session_stays_ended_when_a_late_turn_finishes(harness):
    session = harness.start(steps=30, stepDelay=0.01)
    thread, _ = harness.run_in_thread(session)
    harness.wait_for(lambda: harness.doc(session)["status"] == "running")
    with harness.app.app_context():
        from agentcloud_clone.repositories import sessions as repo

        repo.end_session(session["teamId"], session["_id"], "error")
    thread.join(5)
    assert harness.doc(session)["status"] == "error"


def test_session_deleted_mid_turn_stops_and_writes_nothing_more(harness):
    session = harness.start(steps=200, stepDelay=0.01)
    thread, result = harness.run_in_thread(session)
    harness.wait_for(lambda: harness.doc(session)["status"] == "running")
    with harness.app.app_context():
        get_db().sessions.delete_one({"_id": session["_id"]})
        get_db().session_events.delete_many({"sessionId": session["_id"]})
    thread.join(5)
    assert result[0]["outcome"] == "deleted"
    assert harness.events(session) == []


def test_python_runner_calls_user_callable(harness):
    session = harness.start(runner="python", callable="tests.workers.sample_runner:echo", options={"times": 2})
    harness.run(session)
    text = "".join(e["text"] for e in harness.events(session) if e["type"] == "output")
    assert text == "hello hello "


def test_reaper_ends_running_session_with_stale_heartbeat(harness, app):
    session = harness.start(steps=1, stepDelay=0)
    from datetime import UTC, datetime, timedelta

    with app.app_context():
        get_db().sessions.update_one(
            {"_id": session["_id"]},
            {"$set": {"status": "running", "heartbeatAt": datetime.now(UTC) - timedelta(seconds=60)}},
        )
        assert reap_lost_turns(30) == [str(session["_id"])]
        assert reap_lost_turns(30) == []
    doc = harness.doc(session)
    assert doc["status"] == "error"
    assert "Worker lost" in harness.events(session)[-1]["message"]


def test_reaper_ends_cancelled_session_nobody_finished_as_terminated(harness, app):
    session = harness.start(steps=1, stepDelay=0)
    harness.cancel(session)
    from datetime import UTC, datetime, timedelta

    with app.app_context():
        get_db().sessions.update_one(
            {"_id": session["_id"]}, {"$set": {"cancelledAt": datetime.now(UTC) - timedelta(seconds=60)}}
        )
        assert reap_lost_turns(30) == [str(session["_id"])]
    assert harness.doc(session)["status"] == "terminated"


def test_reaper_leaves_healthy_sessions_alone(harness, app):
    session = harness.start(steps=50, stepDelay=0.01)
    thread, _ = harness.run_in_thread(session)
    harness.wait_for(lambda: harness.doc(session)["status"] == "running")
    with app.app_context():
        assert reap_lost_turns(30) == []
    thread.join(5)
    assert harness.doc(session)["status"] == "waiting"


def test_openai_runner_streams_from_a_compatible_server(harness):
    from tests.fakes.openai_server import FakeOpenAI

    fake = FakeOpenAI(chunks=5, interval=0.001).start()
    try:
        session = harness.start(runner="openai", model="fake-model", baseUrl=fake.base_url, apiKey="sk-test")
        assert harness.run(session)["outcome"] == "completed"
    finally:
        fake.stop()
    text = "".join(e["text"] for e in harness.events(session) if e["type"] == "output")
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert fake.streams[0]["request"]["messages"][-1] == {"role": "user", "content": "hello"}


def test_openai_runner_cancel_closes_the_upstream_stream(harness):
    from tests.fakes.openai_server import FakeOpenAI

    fake = FakeOpenAI(chunks=2000, interval=0.01).start()
    try:
        session = harness.start(runner="openai", model="fake-model", baseUrl=fake.base_url, apiKey="sk-test")
        thread, result = harness.run_in_thread(session)
        harness.wait_for(lambda: fake.streams and fake.streams[0]["sent"] > 5)
        cancelled_at = time.monotonic()
        harness.cancel(session)
        thread.join(5)
        harness.wait_for(lambda: fake.streams[0]["closed_by_client"], timeout=2)
    finally:
        fake.stop()
    assert result[0]["outcome"] == "cancelled"
    assert fake.streams[0]["closed_at"] - cancelled_at < 0.05 + 0.5
    assert not fake.streams[0]["done"]
    assert harness.doc(session)["status"] == "terminated"


def test_cancel_interrupts_the_openai_retry_back_off(harness):
    from devtools.servers import free_port

    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    session = harness.start(runner="openai", model="m", baseUrl=unreachable, apiKey="sk-test")
    thread, result = harness.run_in_thread(session)
    harness.wait_for(lambda: harness.doc(session)["status"] == "running")
    time.sleep(0.6)  # inside the second back-off wait (0.5 s, then 1 s)
    cancelled_at = time.monotonic()
    harness.cancel(session)
    thread.join(5)
    assert time.monotonic() - cancelled_at < 0.5
    assert result[0]["outcome"] == "cancelled" and harness.doc(session)["status"] == "terminated"


def test_unreachable_model_ends_the_session_error_with_a_clear_message(harness):
    from devtools.servers import free_port

    session = harness.start(runner="openai", model="m", baseUrl=f"http://127.0.0.1:{free_port()}/v1", apiKey="k")
    assert harness.run(session)["outcome"] == "error"
    assert "upstream model unavailable" in harness.events(session)[-1]["message"]


def test_turn_over_the_job_timeout_ends_the_session_error(harness, monkeypatch):
    """RQ raises JobTimeoutException inside the job when TURN_TIMEOUT passes; the session ends `error`."""
    from rq.timeouts import JobTimeoutException

    from agentcloud_clone.jobs import runners

    def too_slow(ctx):
        yield "partial "
        raise JobTimeoutException("Task exceeded maximum timeout value")

    monkeypatch.setitem(runners.RUNNERS, "scripted", too_slow)
    from agentcloud_clone.jobs import turns

    monkeypatch.setattr(turns, "RUNNERS", runners.RUNNERS)
    session = harness.start()
    assert harness.run(session)["outcome"] == "timeout"
    doc = harness.doc(session)
    events = harness.events(session)
    assert doc["status"] == "error" and "timed out" in events[-1]["message"]
    assert "".join(e["text"] for e in events if e["type"] == "output") == "partial "
