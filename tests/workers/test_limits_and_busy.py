"""Limits that end a session for its team, and what a message does while a turn is in flight."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from agentcloud_clone.errors import Conflict
from agentcloud_clone.services import sessions as service
from tests.fakes.openai_server import FakeOpenAI
from tests.support import reply_was_cut_off


def _turn_ends(harness: Any, session: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in harness.events(session) if e["type"] == "turn_end"]


def test_queue_ttl_expires_a_turn_no_worker_took(harness, app):
    session = harness.start(limits={"queueTtl": 1})
    doc = harness.doc(session)
    assert doc["deadlineReason"] == "expired" and doc["deadline"] > doc["startDate"]
    with app.app_context():
        assert service.enforce_deadlines() == []  # not yet
        harness.wait_for(lambda: service.enforce_deadlines() == [str(session["_id"])], "the queue TTL to pass")
    doc = harness.doc(session)
    assert doc["status"] == "terminated" and doc["endReason"] == "expired"
    assert doc["cancellation"]["source"] == "limit" and doc["cancellation"]["by"] == {"kind": "system"}
    assert harness.closing(session)["endReason"] == "expired"
    assert harness.run_turn(session, session["activeTurnId"])["outcome"] == "skipped"


def test_idle_timeout_ends_a_session_waiting_for_input(harness, app):
    session = harness.start(steps=1, stepDelay=0, limits={"idleTimeout": 1})
    harness.run(session)
    assert harness.doc(session)["status"] == "waiting"
    with app.app_context():
        harness.wait_for(lambda: service.enforce_deadlines() == [str(session["_id"])], "the idle timeout")
    assert harness.doc(session)["endReason"] == "expired"


def test_a_turn_over_its_duration_limit_ends_timed_out_while_others_are_untouched(harness):
    slow = harness.start(steps=2000, stepDelay=0.01, limits={"maxTurnSeconds": 1})
    other = harness.start(steps=3, stepDelay=0.01)
    thread, result = harness.run_in_thread(slow)
    assert harness.run(other)["outcome"] == "completed"
    harness.finish(thread)
    doc = harness.doc(slow)
    assert doc["status"] == "error" and doc["endReason"] == "timed_out"
    assert result[0]["outcome"] == "cancelled"
    assert reply_was_cut_off(harness.events(slow))
    assert harness.doc(other)["status"] == "waiting"


def test_token_budget_stops_streaming_and_asks_the_upstream_for_no_more(harness):
    fake = FakeOpenAI(chunks=500, interval=0.005).start()
    try:
        session = harness.start(
            runner="openai", model="m", baseUrl=fake.base_url, apiKey="sk-test", limits={"tokenBudget": 20}
        )
        assert harness.run(session)["outcome"] == "cancelled"
        doc = harness.doc(session)
        assert doc["status"] == "terminated" and doc["endReason"] == "budget_exceeded"
        assert doc["tokensUsed"] == 20
        assert fake.streams[0]["request"]["max_tokens"] == 20
        harness.wait_for(lambda: fake.streams[0]["closed_by_client"], "the upstream stream to be closed")
        with pytest.raises(Conflict):
            harness.send(session, "more please")
        assert fake.requests == 1
    finally:
        fake.stop()


def test_a_spent_budget_is_not_started_again(harness, app):
    session = harness.start(steps=5, stepDelay=0, limits={"tokenBudget": 5})
    assert harness.run(session)["outcome"] == "cancelled"
    assert harness.doc(session)["endReason"] == "budget_exceeded"


def test_app_limits_win_over_team_defaults(harness, app, factory):
    from agentcloud_clone.services.accounts import edit_team

    with app.app_context():
        edit_team(harness.user.team_oid, {"limits": {"queueTtl": 100, "tokenBudget": 7}})
    session = harness.start(limits={"queueTtl": 5})
    assert harness.doc(session)["limits"] == {"queueTtl": 5, "tokenBudget": 7}
    doc = harness.doc(session)
    assert doc["deadline"] - doc["startDate"] <= timedelta(seconds=5)


def test_busy_message_is_rejected_by_default(harness):
    session = harness.start(steps=3, stepDelay=0)
    with pytest.raises(Conflict, match="in flight"):
        harness.send(session, "again")


def test_enqueued_message_runs_after_the_current_turn(harness):
    session = harness.start(steps=3, stepDelay=0, reply="first answer now")
    after = harness.send(session, "second", "enqueue")
    assert after["queuedTurns"] and len(after["queuedTurns"]) == 1
    assert harness.run(session)["outcome"] == "completed"
    doc = harness.doc(session)
    assert doc["status"] == "waiting" and doc["activeTurnId"] == after["queuedTurns"][0] and doc["queuedTurns"] == []
    assert harness.run(session)["outcome"] == "completed"
    assert harness.doc(session)["activeTurnId"] is None
    messages = [e for e in harness.events(session) if e["type"] == "message"]
    assert [m["text"] for m in messages] == ["hello", "second"] and messages[1]["queued"] is True
    assert len(_turn_ends(harness, session)) == 2


def test_interrupting_message_stops_the_turn_keeps_its_output_and_runs_next(harness):
    session = harness.start(runner="python", callable="tests.workers.runners:patient")
    first_turn = session["activeTurnId"]
    thread, result = harness.run_in_thread(session)
    harness.wait_running(session)
    harness.send(session, "stop that, do this", "interrupt")
    harness.finish(thread)
    assert result[0]["outcome"] == "interrupted"
    ends = _turn_ends(harness, session)
    assert ends[0]["turnId"] == str(first_turn) and ends[0]["interrupted"] is True
    assert reply_was_cut_off(harness.events(session), first_turn)
    doc = harness.doc(session)
    assert doc["status"] == "waiting" and doc["activeTurnId"] is not None and doc.get("interruptTurnId") is None
    messages = [e for e in harness.events(session) if e["type"] == "message"]
    assert messages[-1]["turnId"] == str(doc["activeTurnId"]) and messages[-1]["text"] == "stop that, do this"


def test_interrupting_a_turn_that_has_not_started_skips_it(harness):
    session = harness.start(steps=3, stepDelay=0)
    first_turn = session["activeTurnId"]
    harness.send(session, "instead", "interrupt")
    assert harness.run(session)["outcome"] == "skipped"
    doc = harness.doc(session)
    assert doc["activeTurnId"] not in (None, first_turn)
    assert _turn_ends(harness, session)[0]["interrupted"] is True
    assert harness.run(session)["outcome"] == "completed"


def test_cancel_with_messages_waiting_ends_the_session(harness):
    session = harness.start(steps=3, stepDelay=0)
    harness.send(session, "later", "enqueue")
    assert harness.cancel(session).session["status"] == "terminated"
    assert harness.run_turn(session, session["activeTurnId"])["outcome"] == "skipped"
