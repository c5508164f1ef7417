"""A 503 leaves nothing half done: when the job queue cannot take a turn, the session, its first message, the
message sent to a live session and the Idempotency-Key record all go again, and a retry with the same key works."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from bson import ObjectId
from pymongo.errors import AutoReconnect

from agentcloud_clone import queueing
from agentcloud_clone.db import breaker, get_db
from agentcloud_clone.repositories import sessions as repo
from agentcloud_clone.services import sessions as service
from tests.support import wait_until

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


def _counts(app: Any, team_id: str) -> dict[str, int]:
    with app.app_context():
        db = get_db()
        sessions = list(db.sessions.find({"teamId": ObjectId(team_id)}, {"_id": 1}))
        return {
            "sessions": len(sessions),
            "events": db.session_events.count_documents({"sessionId": {"$in": [s["_id"] for s in sessions]}}),
            "idempotency": db.idempotency_keys.count_documents({}),
        }


def _queue_down(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise redis.ConnectionError("Error 111 connecting to the queue. Connection refused.")

    monkeypatch.setattr(queueing, "enqueue_turn", refuse)


def _creates(user: Any, app_id: str) -> list[tuple[str, dict[str, Any], int]]:
    """Both families' create routes, each with the status its success answers."""
    return [
        (f"/{user.team_id}/forms/session/add", {"appId": app_id, "message": "hello"}, 200),
        ("/api/managed-agents/sessions", {"appId": app_id, "message": "hello"}, 201),
    ]


def _refused(response: Any) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.get_json() == {"message": "The job queue is unavailable; try again shortly.", "code": 503}


def test_a_create_refused_by_the_queue_leaves_nothing_and_the_same_key_then_works(
    app, factory, api_key_client, monkeypatch
):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    for number, (path, body, ok) in enumerate(_creates(user, app_id)):
        key = {"Idempotency-Key": f"create-{number}"}
        before = _counts(app, user.team_id)
        with monkeypatch.context() as patch:
            _queue_down(patch)
            _refused(call("POST", path, body, headers=key))
            _refused(call("POST", path, body))  # without a key too
        assert _counts(app, user.team_id) == before, path
        retried = call("POST", path, body, headers=key)
        assert retried.status_code == ok and "idempotentReplay" not in retried.get_json(), path
        after = _counts(app, user.team_id)
        assert after == {
            "sessions": before["sessions"] + 1,
            "events": before["events"] + 1,
            "idempotency": before["idempotency"] + 1,
        }, path
        # And it is the one session the key names from now on.
        assert call("POST", path, body, headers=key).get_json().get("idempotentReplay") is True


def test_a_message_refused_by_the_queue_is_taken_back_and_can_be_sent_again(app, factory, api_key_client, monkeypatch):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    for path_of in (
        lambda sid: f"/{user.team_id}/session/{sid}/send-message",
        lambda sid: f"/api/managed-agents/sessions/{sid}/messages",
    ):
        sid = str(factory.session(user, app_id, None)["_id"])
        with app.app_context():
            before = get_db().sessions.find_one({"_id": ObjectId(sid)})
        with monkeypatch.context() as patch:
            _queue_down(patch)
            _refused(call("POST", path_of(sid), {"message": "are you there?"}))
        with app.app_context():
            after = get_db().sessions.find_one({"_id": ObjectId(sid)})
            assert get_db().session_events.count_documents({"sessionId": ObjectId(sid)}) == 0
        assert (after["status"], after.get("activeTurnId"), after.get("eventSeq", 0)) == (
            before["status"],
            before.get("activeTurnId"),
            before.get("eventSeq", 0),
        )
        assert call("POST", path_of(sid), {"message": "are you there?"}).status_code in (200, 202)
        events = call("GET", f"/{user.team_id}/session/{sid}/messages.json").get_json()["messages"]
        assert [(e["type"], e["seq"], e["text"]) for e in events] == [("message", 1, "are you there?")]


def test_a_message_taken_back_stays_gone_when_the_repair_runs_at_any_step_of_the_take_back(
    app, factory, api_key_client, monkeypatch
):
    """Until the take-back's first write, the message is the session's last write, which the reaper's repair (or
    the next writer) stores again if it is missing: the take-back must never leave it missing before then."""
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    sid = str(factory.session(user, factory.app_record(user.team_id), None)["_id"])
    repairs: list[int] = []

    def repair_first(step: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            window = (datetime(2000, 1, 1, tzinfo=UTC), datetime(3000, 1, 1, tzinfo=UTC))
            repairs.append(len(repo.materialise_pending(repo.unsettled(*window))))
            return step(*args, **kwargs)

        return run

    _queue_down(monkeypatch)
    monkeypatch.setattr(repo, "release_turn", repair_first(repo.release_turn))
    monkeypatch.setattr(repo, "remove_event", repair_first(repo.remove_event))
    _refused(call("POST", f"/{user.team_id}/session/{sid}/send-message", {"message": "are you there?"}))
    assert len(repairs) == 2  # the repair ran before each of the take-back's two writes
    with app.app_context():
        session = get_db().sessions.find_one({"_id": ObjectId(sid)})
        seqs = [e["seq"] for e in get_db().session_events.find({"sessionId": ObjectId(sid)})]
    assert (session.get("eventSeq", 0), session.get("activeTurnId"), seqs) == (0, None, [])


def _store_fails(*args: Any, **kwargs: Any) -> Any:
    raise AutoReconnect("connection to the store lost")


def _sweep(app: Any, requeue_after: float = 0.0) -> dict[str, Any]:
    """One reaper pass that takes any turn waiting unqueued, and any session left unanswered, as lost now."""
    with app.app_context():
        return service.sweep(3600.0, requeue_after)


def _left_behind(app: Any, team_id: str) -> dict[str, Any]:
    """The team's one session as stored, once the store answers this process again: the simulated loss of the
    connection opened the store's breaker, and its probe (the server never went away) closes it."""
    uri = app.config["MONGO_URI"]
    if not uri.startswith("mongomock://"):
        mongo = breaker(uri, float(app.config["MONGO_TIMEOUT"]))
        wait_until(lambda: not mongo.is_open, what="the store's breaker closed again")
    with app.app_context():
        return get_db().sessions.find_one({"teamId": ObjectId(team_id)}) or {}


def test_a_refused_create_the_store_cannot_take_back_is_removed_by_the_reaper_and_its_turn_never_queued(
    app, factory, api_key_client, monkeypatch
):
    """The queue refuses the turn and the store then fails the take-back: the 503 stands, so the session left
    behind must never run. The reaper removes it instead of queuing its turn as a lost job."""
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    with monkeypatch.context() as patch:
        _queue_down(patch)
        patch.setattr(repo, "delete_new_session", _store_fails)
        _refused(call("POST", f"/{user.team_id}/forms/session/add", {"appId": app_id, "message": "hello"}))
    left = _left_behind(app, user.team_id)
    assert left.get("unansweredSince") is not None and left.get("activeTurnId") is not None
    assert call("GET", f"/{user.team_id}/sessions.json").get_json()["sessions"] == []  # its creator got a 503
    assert _sweep(app, requeue_after=3600.0)["unanswered"] == []  # not before REQUEUE_AFTER
    swept = _sweep(app)
    assert (swept["unanswered"], swept["requeued"]) == ([str(left["_id"])], [])
    with app.app_context():
        assert not queueing.turn_is_waiting(str(left["activeTurnId"]))
        assert get_db().session_events.count_documents({"sessionId": left["_id"]}) == 0
    assert call("GET", f"/{user.team_id}/session/{left['_id']}.json").status_code == 404
    assert _sweep(app)["unanswered"] == []  # removed once


def test_a_create_whose_confirming_look_fails_answers_an_error_takes_its_job_out_and_is_removed(
    app, factory, api_key_client, monkeypatch
):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    with monkeypatch.context() as patch:
        patch.setattr(repo, "confirm_new_session", _store_fails)
        response = call("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": "hello"})
    assert response.status_code == 503 and set(response.get_json()) == {"message", "code"}
    left = _left_behind(app, user.team_id)
    with app.app_context():  # the job is taken out in the background
        wait_until(lambda: not queueing.turn_is_waiting(str(left["activeTurnId"])), what="the job taken out")
    assert _sweep(app)["unanswered"] == [str(left["_id"])]


def test_a_created_session_is_answered_and_the_reaper_leaves_it(app, factory, api_key_client):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    created = call("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": "hello"})
    assert created.status_code == 201
    assert "unansweredSince" not in _left_behind(app, user.team_id)
    assert _sweep(app)["unanswered"] == []
    assert call("GET", f"/{user.team_id}/session/{created.get_json()['session']['_id']}.json").status_code == 200


@pytest.fixture
def redis_unreachable(app: Any, make_app: Callable[..., Any]) -> Any:
    """A second app on the same database whose REDIS_URL answers nothing (the limiter falls back to memory)."""
    return make_app(MONGO_URI=app.config["MONGO_URI"], REDIS_URL=UNREACHABLE_REDIS)


def test_with_redis_unreachable_a_create_is_503_and_leaves_nothing(app, factory, redis_unreachable):
    user = factory.user("member", api_key=True)
    app_id = factory.app_record(user.team_id)
    headers = {"Authorization": f"Bearer {user.api_key}", "Idempotency-Key": "while-down"}
    for path, body, ok in _creates(user, app_id):
        before = _counts(app, user.team_id)
        _refused(redis_unreachable.test_client().post(path, json=body, headers=headers))
        assert _counts(app, user.team_id) == before, path
        # Redis is back (the healthy app, same database): the same key starts the session.
        retried = app.test_client().post(path, json=body, headers=headers)
        assert retried.status_code == ok, retried.get_json()
        assert _counts(app, user.team_id)["sessions"] == before["sessions"] + 1
        headers["Idempotency-Key"] += "-again"


def test_no_worker_claims_the_turn_of_a_create_that_answered_an_error(app, factory, api_key_client, monkeypatch):
    """A worker may take the job before the create's confirming look: it waits for that look, and when the create
    answers an error instead, the turn is never claimed."""
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    monkeypatch.setattr(service, "ANSWER_WAIT", 0.2)
    monkeypatch.setattr(repo, "confirm_new_session", _store_fails)
    response = call("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": "hello"})
    assert response.status_code == 503
    left = _left_behind(app, user.team_id)
    with app.app_context():
        assert service.claim_turn(left["teamId"], left["_id"], left["activeTurnId"], "worker:1") is None
    left = _left_behind(app, user.team_id)
    assert left["status"] != "running" and left.get("workerId") is None


def test_a_worker_faster_than_the_creates_confirming_look_waits_for_it(app, factory, api_key_client, monkeypatch):
    import threading

    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    real_confirm, real_find, claimed = repo.confirm_new_session, repo.find_session, []
    saw_it_unanswered = threading.Event()

    def find_session(*args: Any, **kwargs: Any) -> Any:
        found = real_find(*args, **kwargs)
        if found and found.get("unansweredSince") and threading.current_thread().name == "worker":
            saw_it_unanswered.set()
        return found

    def worker_first(team_id: Any, session_id: Any) -> Any:
        with app.app_context():
            turn = get_db().sessions.find_one({"_id": session_id})["activeTurnId"]

        def claim() -> None:
            with app.app_context():
                claimed.append(service.claim_turn(team_id, session_id, turn, "worker:1"))

        worker = threading.Thread(target=claim, name="worker")
        worker.start()
        assert saw_it_unanswered.wait(10), "the worker never read the session"
        answered = real_confirm(team_id, session_id)
        worker.join(10)
        return answered

    monkeypatch.setattr(repo, "confirm_new_session", worker_first)
    monkeypatch.setattr(repo, "find_session", find_session)
    assert call("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": "hello"}).status_code == 201
    assert claimed and claimed[0] is not None and claimed[0]["status"] == "running"


def test_a_confirming_look_that_fails_once_is_tried_again(app, factory, api_key_client, monkeypatch):
    """The look is idempotent: one that failed (or whose answer was lost) is sent again, and the create succeeds."""
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    real_confirm, calls = repo.confirm_new_session, []

    def lost_once(team_id: Any, session_id: Any) -> Any:
        calls.append(session_id)
        answered = real_confirm(team_id, session_id)
        if len(calls) == 1:
            raise AutoReconnect("the answer was lost")
        return answered

    monkeypatch.setattr(repo, "confirm_new_session", lost_once)
    assert call("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": "hello"}).status_code == 201
    assert len(calls) == 2 and "unansweredSince" not in _left_behind(app, user.team_id)
