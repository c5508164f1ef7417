"""The cancel notice reaches the workers as soon as the stamp is stored: on a busy store each write waits its turn,
and a worker that heard only after the cancel event's insert would start stopping one store round trip late."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from agentcloud_clone import queueing
from agentcloud_clone.repositories import sessions as repo
from agentcloud_clone.services import sessions as service
from agentcloud_clone.vocabulary import CancelSource, EventType, OnBusy

HEARD_WITHIN = 10.0  # seconds; the notice is sent by this process's outbox thread, so only a broken order waits


@pytest.fixture
def notices(app: Any) -> Any:
    """A subscriber on the cancel channel, as each worker's watcher is."""
    pubsub = redis.Redis.from_url(app.config["REDIS_URL"]).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(queueing.cancel_channel(app.config["REDIS_PREFIX"]))
    pubsub.get_message(timeout=HEARD_WITHIN)  # the subscription's confirmation
    yield pubsub
    pubsub.close()


def _running(app: Any, factory: Any) -> tuple[dict[str, Any], Any]:
    user = factory.user("member")
    session = factory.session(user, factory.app_record(user.team_id), "hello")
    with app.app_context():
        assert service.claim_turn(session["teamId"], session["_id"], session["activeTurnId"], "test:1")
    return session, factory.actor(user)


def _hold_insert_until_heard(monkeypatch: pytest.MonkeyPatch, notices: Any, event_type: str) -> list[str | None]:
    """Make the insert of the first event of `event_type` wait for a cancel notice; returns what was heard."""
    heard: list[str | None] = []
    insert = repo.insert_events

    def insert_after_notice(events: Any, **kwargs: Any) -> Any:
        if not heard and any(event.get("type") == event_type for event in events):
            message = notices.get_message(timeout=HEARD_WITHIN)
            heard.append(message["data"].decode() if message else None)
        return insert(events, **kwargs)

    monkeypatch.setattr(repo, "insert_events", insert_after_notice)
    return heard


def test_a_cancel_notice_goes_out_before_the_cancel_event_is_inserted(app, factory, notices, monkeypatch):
    session, actor = _running(app, factory)
    heard = _hold_insert_until_heard(monkeypatch, notices, EventType.CANCEL)
    with app.app_context():
        outcome = service.cancel_session(session["teamId"], session["_id"], actor, CancelSource.API)
        events = repo.list_events(session["_id"], after=0, limit=100)
    assert [queueing.read_cancel_notice(text)[0] for text in heard] == [str(session["_id"])]
    assert outcome.session["cancelledAt"] is not None
    assert [e["type"] for e in events].count(EventType.CANCEL) == 1  # and the event is stored all the same


def test_an_interrupting_message_wakes_the_worker_before_its_event_is_inserted(app, factory, notices, monkeypatch):
    session, actor = _running(app, factory)
    heard = _hold_insert_until_heard(monkeypatch, notices, EventType.MESSAGE)
    with app.app_context():
        after = service.send_message(session["teamId"], session["_id"], actor, "stop and do this", OnBusy.INTERRUPT)
    assert heard == [str(session["_id"])]
    assert after["interruptTurnId"] == session["activeTurnId"]


def test_a_transcript_notice_goes_out_before_the_output_is_inserted(app, factory, monkeypatch):
    """Live streams hear of a turn's output once its write is committed (its `seq`s reserved), one store round
    trip before the insert that stores it."""
    from agentcloud_clone import notices as transcript_notices

    session, _ = _running(app, factory)
    pubsub = redis.Redis.from_url(app.config["REDIS_URL"]).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(transcript_notices.channel_prefix(app.config["REDIS_PREFIX"]) + str(session["_id"]))
    pubsub.get_message(timeout=HEARD_WITHIN)  # the subscription's confirmation
    heard = _hold_insert_until_heard(monkeypatch, pubsub, EventType.OUTPUT)
    try:
        with app.app_context():
            written = service.record_output(session["teamId"], session["_id"], session["activeTurnId"], ["hi"], 1)
    finally:
        pubsub.close()
    assert heard and heard[0] is not None, "no transcript notice before the insert"
    (event,) = json.loads(heard[0])["events"]
    assert (event["type"], event["text"], event["seq"]) == ("output", "hi", written[0]["seq"])
