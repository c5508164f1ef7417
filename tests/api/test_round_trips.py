"""MongoDB round trips of each hot path, counted by a pymongo command listener over a real wire connection.

A path that grows past its budget fails here. Budgets count what comes after authentication (a cookie
request's sign-in lookup is one `find`, counted separately).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId, json_util
from pymongo import monitoring
from rq import Queue

from agentcloud_clone.queueing import get_redis
from agentcloud_clone.services import sessions as service
from agentcloud_clone.vocabulary import CancelSource, EndReason

AUTH = 1  # the cookie's account lookup (after a credential changed; none while it is kept: credentials.py)


class CommandCounter(monitoring.CommandListener):
    """Counts the commands one thread sends to one database (pymongo calls listeners in the sending thread, so
    the background threads of the process, such as the webhook emitter, are not counted)."""

    def __init__(self) -> None:
        self.database: str | None = None
        self.thread: int | None = None
        self.commands: list[str] = []
        self._lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.database_name == self.database and threading.get_ident() == self.thread:
            with self._lock:
                self.commands.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        return

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        return

    def count(self, action: Any) -> list[str]:
        """The commands `action()` sends."""
        with self._lock:
            self.commands, self.thread = [], threading.get_ident()
        action()
        with self._lock:
            return list(self.commands)


_counter = CommandCounter()
monitoring.register(_counter)  # applies to every client created from here on, filtered by database name


@pytest.fixture
def mongo_uri_template(mongo_server: Any) -> str:
    """Round trips only exist over the wire."""
    return mongo_server.url.rstrip("/") + "/{db}"


@pytest.fixture
def counter(app: Any) -> Iterator[CommandCounter]:
    from agentcloud_clone.db import database_name

    _counter.database = database_name(app.config["MONGO_URI"])
    yield _counter
    _counter.database = None


@pytest.fixture
def world(app: Any, factory: Any, login: Any) -> dict[str, Any]:
    user = factory.user("member")
    me = login(user)
    app_id = factory.app_record(user.team_id)
    return {"user": user, "me": me, "app_id": app_id, "actor": factory.actor(user)}


def _as_another_process() -> None:
    """Forget which writes this process saw stored, as a process other than the last writer knows nothing."""
    from agentcloud_clone.repositories import sessions as repo

    with repo._confirmed_lock:
        repo._confirmed.clear()


def _running_session(app: Any, factory: Any, world: dict[str, Any]) -> dict[str, Any]:
    session = factory.session(world["user"], world["app_id"], "hello")
    with app.app_context():
        assert service.claim_turn(session["teamId"], session["_id"], session["activeTurnId"], "test:1")
    return session


def test_fresh_cancel_of_a_running_session_takes_three_round_trips(app, factory, world, counter):
    session = _running_session(app, factory, world)
    with app.app_context():
        commands = counter.count(
            lambda: service.cancel_session(session["teamId"], session["_id"], world["actor"], CancelSource.API)
        )
    assert len(commands) <= 3, commands
    team, sid = world["user"].team_id, session["_id"]
    other = _running_session(app, factory, world)
    over_http = counter.count(lambda: world["me"].json("POST", f"/{team}/forms/session/{other['_id']}/cancel"))
    assert len(over_http) <= AUTH + 3, over_http
    repeat = counter.count(lambda: world["me"].json("POST", f"/{team}/forms/session/{sid}/cancel"))
    assert len(repeat) <= AUTH + 3, repeat


def test_fresh_cancel_of_an_idle_or_queued_session_takes_three_round_trips(app, factory, world, counter):
    for message in (None, "queued turn"):
        session = factory.session(world["user"], world["app_id"], message)
        with app.app_context():
            commands = counter.count(
                lambda session=session: service.cancel_session(
                    session["teamId"], session["_id"], world["actor"], CancelSource.API
                )
            )
        assert len(commands) <= 3, commands


def test_session_and_transcript_reads(app, factory, world, counter):
    session = factory.session(world["user"], world["app_id"], "hello")
    team, sid = world["user"].team_id, session["_id"]
    read = counter.count(lambda: world["me"].client.get(f"/{team}/session/{sid}.json"))
    assert len(read) <= AUTH + 1, read
    transcript = counter.count(lambda: world["me"].client.get(f"/{team}/session/{sid}/messages.json?after=0"))
    assert len(transcript) <= AUTH + 2, transcript


def test_a_transcript_poll_with_nothing_new_reads_only_the_session(app, factory, world, counter):
    """The session read says how far its transcript goes (`eventSeq`): a reader already there (the UI's poll of
    a session that is waiting for its user) costs no transcript query."""
    session = factory.session(world["user"], world["app_id"], "hello")
    team, sid = world["user"].team_id, session["_id"]
    path = f"/{team}/session/{sid}/messages.json"
    first = world["me"].client.get(f"{path}?after=0").get_json()
    assert [event["seq"] for event in first["messages"]] == [1]
    caught_up = counter.count(lambda: world["me"].client.get(f"{path}?after=1"))
    assert caught_up == ["find"], caught_up
    assert world["me"].client.get(f"{path}?after=1").get_json()["messages"] == []


def test_one_output_flush_takes_two_round_trips_however_many_pieces(app, factory, world, counter):
    session = _running_session(app, factory, world)
    with app.app_context():
        commands = counter.count(
            lambda: service.record_output(
                session["teamId"], session["_id"], session["activeTurnId"], ["a", "b", "c"], tokens=3
            )
        )
    assert len(commands) <= 2, commands


def _stopping_writer(app: Any, factory: Any, world: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A running turn with output still buffered, whose session was just cancelled; its writer and its session
    as the worker's watcher saw it."""
    from agentcloud_clone.jobs import turns
    from agentcloud_clone.jobs.watcher import CancelHandle
    from agentcloud_clone.repositories import sessions as repo

    session = _running_session(app, factory, world)
    service.cancel_session(session["teamId"], session["_id"], world["actor"], CancelSource.API)
    writer = turns.OutputWriter(session, session["activeTurnId"], 60.0, 10_000, CancelHandle(session["_id"]))
    writer.add("the last words")
    (seen,) = repo.watch_states({session["_id"]: session["teamId"]})
    return writer, seen


def _ends_with_the_last_words(session_id: Any) -> None:
    from agentcloud_clone.repositories import sessions as repo

    output, closing = repo.list_events(session_id, after=0, limit=100)[-2:]
    assert (output["text"], output["interrupted"]) == ("the last words", True)
    assert (closing["type"], closing["endReason"], closing["interrupted"]) == ("status", EndReason.CANCELLED, True)


def test_a_cancelled_turn_ends_in_two_round_trips_its_unwritten_output_included(app, factory, world, counter):
    """The watcher's poll saw the cancel, so the turn ends from what it saw: one update and one insert, which
    carry the output still buffered as well as the closing event."""
    from agentcloud_clone.jobs import turns

    with app.app_context():
        writer, seen = _stopping_writer(app, factory, world)
        writer.cancel.trigger("cancelled", seen)
        commands = counter.count(lambda: turns._stop(writer, EndReason.CANCELLED, "Cancelled."))
        _ends_with_the_last_words(writer.session_id)
    assert len(commands) <= 2, commands


def test_a_turn_that_hears_the_stamp_in_the_cancel_notice_ends_in_two_round_trips_without_a_poll(
    app, factory, world, counter, monkeypatch
):
    """The notice carries the stamp as stored, so the worker's watcher stops the turn as soon as it hears it, and
    the turn ends from the stamp: no poll, one update and one insert."""
    from agentcloud_clone import queueing
    from agentcloud_clone.jobs import turns
    from agentcloud_clone.jobs.watcher import CancelWatcher

    session = _running_session(app, factory, world)
    published: list[Any] = []
    monkeypatch.setattr(queueing, "send_later", lambda function, *args: published.append(args[-1]))
    watcher = CancelWatcher(app)  # not started: what its listener hears is handed to it here
    handle = watcher.register(session["teamId"], session["_id"], session["activeTurnId"])
    with app.app_context():
        writer = turns.OutputWriter(session, session["activeTurnId"], 60.0, 10_000, handle)
        writer.add("the last words")
        service.cancel_session(session["teamId"], session["_id"], world["actor"], CancelSource.API)
        (notice,) = published
        assert counter.count(lambda: watcher.hear(notice)) == [] and handle.reason == "cancelled"
        commands = counter.count(lambda: turns._stop(writer, EndReason.CANCELLED, "Cancelled."))
        _ends_with_the_last_words(writer.session_id)
    assert commands == ["findAndModify", "insert"], commands


def test_a_cancel_notice_that_does_not_match_the_session_costs_one_write_and_the_turn_ends_as_stored(
    app, factory, world, counter
):
    """A notice is only a hint: one whose stamp is not the stored one (stale, or not what MongoDB holds) makes the
    guarded ending write miss, and the turn reads the session and ends as its cancellation says."""
    from datetime import timedelta

    from agentcloud_clone import queueing
    from agentcloud_clone.jobs import turns
    from agentcloud_clone.jobs.watcher import CancelWatcher

    session = _running_session(app, factory, world)
    watcher = CancelWatcher(app)
    handle = watcher.register(session["teamId"], session["_id"], session["activeTurnId"])
    with app.app_context():
        writer = turns.OutputWriter(session, session["activeTurnId"], 60.0, 10_000, handle)
        writer.add("the last words")
        stored = service.cancel_session(session["teamId"], session["_id"], world["actor"], CancelSource.API).session
        other = {"cancelledAt": stored["cancelledAt"] - timedelta(seconds=1), "endReason": "expired"}
        wrong = {"cancelledAt": other["cancelledAt"], "cancellation": {**stored["cancellation"], **other}}
        watcher.hear(json_util.dumps({"session": str(session["_id"]), **wrong}, json_options=queueing.EXACT))
        assert handle.seen is not None and handle.seen["cancelledAt"] == wrong["cancelledAt"]
        commands = counter.count(lambda: turns._stop(writer, EndReason.CANCELLED, "Cancelled."))
        _ends_with_the_last_words(writer.session_id)
    assert commands == ["findAndModify", "find", "findAndModify", "insert"], commands


def test_a_turn_ending_from_a_stale_view_reads_the_session_and_ends_as_it_says(app, factory, world, counter):
    """What the watcher saw no longer holds (here: it saw no cancel): the guarded write misses, the session is
    read, and the turn ends as the cancellation asks."""
    from agentcloud_clone.jobs import turns

    with app.app_context():
        writer, seen = _stopping_writer(app, factory, world)
        stale = {key: value for key, value in seen.items() if key not in ("cancelledAt", "cancellation")}
        writer.cancel.trigger("ended", stale)
        commands = counter.count(lambda: turns._stop(writer, EndReason.ERROR, "The agent failed."))
        _ends_with_the_last_words(writer.session_id)
    assert commands.count("find") == 1, commands


def test_a_write_after_another_process_s_write_costs_no_extra_round_trip(app, factory, world, counter):
    """The previous write's events are inserted again (they may never have been) and refused as duplicates of
    themselves: the refusal says so, so nothing more is read."""
    session = _running_session(app, factory, world)
    with app.app_context():
        _as_another_process()
        flush = counter.count(
            lambda: service.record_output(session["teamId"], session["_id"], session["activeTurnId"], ["a"], tokens=1)
        )
        assert len(flush) <= 2, flush
        _as_another_process()
        cancel = counter.count(
            lambda: service.cancel_session(session["teamId"], session["_id"], world["actor"], CancelSource.API)
        )
        assert len(cancel) <= 3, cancel


def test_heartbeat_and_watcher_poll_take_one_query_for_many_sessions(app, factory, world, counter):
    from agentcloud_clone.repositories import sessions as repo
    from agentcloud_clone.timeutil import utcnow

    sessions = [_running_session(app, factory, world) for _ in range(5)]
    teams = {s["_id"]: s["teamId"] for s in sessions}
    with app.app_context():
        assert len(counter.count(lambda: repo.heartbeat(teams, utcnow()))) == 1
        assert len(counter.count(lambda: repo.watch_states(teams))) == 1


def test_the_orphan_sweep_reads_the_recent_purges_not_the_recent_events(app, factory, world, counter):
    """The reaper's sweep for events whose session is gone looks at the sessions purged lately (one `find`),
    checks that they are gone (one `find` of `_id`s a chunk), then removes their events (one `delete` a chunk):
    its cost does not grow with the transcripts written meanwhile, and with no purge it is the one `find`."""
    from datetime import timedelta

    from agentcloud_clone.repositories import sessions as repo
    from agentcloud_clone.timeutil import utcnow

    since = utcnow()
    kept = [_running_session(app, factory, world) for _ in range(3)]
    with app.app_context():
        db = repo.get_db()
        event = {"type": "output", "teamId": world["user"].team_oid}
        db.session_events.insert_many([{**event, "sessionId": s["_id"], "seq": 99 + n} for s in kept for n in (1, 2)])
        before = {s["_id"]: db.session_events.count_documents({"sessionId": s["_id"]}) for s in kept}
        assert counter.count(lambda: repo.remove_orphan_events(since)) == ["find"]
        # A session purged for good, then the late insert of a writer that died: its two events are orphans.
        gone = factory.session(world["user"], world["app_id"])
        db.sessions.update_one({"_id": gone["_id"]}, {"$set": {"deletedAt": utcnow(), "status": "terminated"}})
        repo.purge_tombstones(utcnow() + timedelta(seconds=1))
        db.session_events.insert_many(
            [{"sessionId": gone["_id"], "teamId": gone["teamId"], "seq": n, "type": "output"} for n in (1, 2)]
        )
        removed: list[int] = []
        commands = counter.count(lambda: removed.append(repo.remove_orphan_events(since)))
        assert commands == ["find", "find", "delete"] and removed == [2], (commands, removed)
        assert db.session_events.count_documents({"sessionId": gone["_id"]}) == 0
        assert {s["_id"]: db.session_events.count_documents({"sessionId": s["_id"]}) for s in kept} == before


def test_a_turn_s_output_write_is_its_heartbeat_and_the_watcher_beats_only_the_silent_ones(
    app, factory, world, counter
):
    """A streaming turn's output writes stamp `heartbeatAt` themselves, so the watcher's heartbeat leaves its
    session out: with every turn of the process streaming, the heartbeat sends nothing."""
    from agentcloud_clone.jobs import turns
    from agentcloud_clone.jobs.watcher import CancelWatcher
    from agentcloud_clone.repositories import sessions as repo

    streaming, silent = (_running_session(app, factory, world) for _ in range(2))
    watcher = CancelWatcher(app)  # not started: its steps are run here, one at a time
    handles = {s["_id"]: watcher.register(s["teamId"], s["_id"], s["activeTurnId"]) for s in (streaming, silent)}

    def stamps() -> dict[Any, Any]:
        return {s["_id"]: repo.find_session(s["teamId"], s["_id"])["heartbeatAt"] for s in (streaming, silent)}

    with app.app_context():
        long_ago = {"$set": {"heartbeatAt": datetime(2000, 1, 1, tzinfo=UTC)}}
        repo.get_db().sessions.update_many({"_id": {"$in": list(handles)}}, long_ago)
        writer = turns.OutputWriter(streaming, streaming["activeTurnId"], 60.0, 10_000, handles[streaming["_id"]])
        writer.add("some output")
        before = stamps()
        assert len(counter.count(writer.flush)) <= 2  # the output write's budget, the stamp included
        written = stamps()
        assert written[streaming["_id"]] > before[streaming["_id"]] and written[silent["_id"]] == before[silent["_id"]]
        assert counter.count(watcher.beat_once) == ["update"]
        beaten = stamps()
        assert beaten[streaming["_id"]] == written[streaming["_id"]] and beaten[silent["_id"]] > written[silent["_id"]]
        handles[silent["_id"]].note_stamp(time.monotonic())  # the other turn streams as well now
        assert counter.count(watcher.beat_once) == []


def test_webhook_deliveries_of_many_ended_sessions_take_one_read_and_one_write(app, factory, world, counter):
    import time

    from agentcloud_clone.repositories import webhooks as webhooks_repo
    from agentcloud_clone.services import webhooks

    team = world["user"].team_oid
    items = [(f"session.ended:{n}", {"type": "session.ended", "data": {"n": n}}) for n in range(20)]
    with app.app_context():
        for url in ("https://one.example/hook", "https://two.example/hook"):
            webhooks_repo.insert_endpoint({"teamId": team, "url": url, "eventTypes": ["session.ended"], "secret": "x"})
        # Two announcements that waited together (a cancel of all sessions): one read of the team's endpoints,
        # one write of the 40 deliveries.
        emitter = webhooks._Emitter()
        emitter.teams = (time.monotonic(), webhooks._endpoints_version(), {team})
        announcements = [(app, team, items[:10]), (app, team, items[10:])]
        assert counter.count(lambda: emitter._record(announcements)) == ["find", "insert"]
        assert webhooks_repo.get_db().webhook_deliveries.count_documents({"teamId": team}) == 40
        # Announced again (a sweep after a crash, say): every event has its delivery already, none is added;
        # and the team's endpoints are this process's copies now (no endpoint changed since they were read).
        assert counter.count(lambda: webhooks.record_deliveries(team, items)) == ["insert"]
        assert webhooks_repo.get_db().webhook_deliveries.count_documents({"teamId": team}) == 40
        # An endpoint changes (here: a third one): the next recording reads them again, and delivers to it.
        webhooks_repo.insert_endpoint({"teamId": team, "url": "https://three.example/hook", "secret": "x"})
        webhooks._forget_teams()
        assert counter.count(lambda: webhooks.record_deliveries(team, items)) == ["find", "insert"]
        assert webhooks_repo.get_db().webhook_deliveries.count_documents({"teamId": team}) == 60


def test_a_delivery_to_an_endpoint_this_process_delivered_to_reads_no_endpoint(app, factory, world, counter):
    """A delivery's first attempt was claimed as it was recorded and only records its answer; a later one claims
    itself too. The endpoint (its address and secret) is read once per process until an endpoint changes."""
    from agentcloud_clone.repositories import webhooks as webhooks_repo
    from agentcloud_clone.services import webhooks
    from tests.fakes.receiver import Receiver

    app.config["WEBHOOK_ALLOW_PRIVATE"] = True  # the receiver is on loopback
    receiver = Receiver().start()
    try:
        with app.app_context():
            team = world["user"].team_oid
            webhooks.create_endpoint(team, receiver.url, ["session.ended"], world["actor"])
            items = [(f"session.ended:{n}", {"type": "session.ended", "data": {"n": n}}) for n in range(2)]
            webhooks.record_deliveries(team, items)
            queue = Queue(app.config["WEBHOOK_QUEUE"], connection=get_redis())
            first, second = sorted(queue.get_jobs(), key=lambda job: job.args[1]["payload"]["data"]["n"])
            # The first attempt was claimed with the delivery's record: it sends, then records the answer.
            assert counter.count(lambda: webhooks.deliver(ObjectId(first.args[0]), first.args[1])) == ["find", "update"]
            assert counter.count(lambda: webhooks.deliver(ObjectId(second.args[0]), second.args[1])) == ["update"]
            # A later attempt (a redelivery, a retry) claims itself.
            webhooks_repo.set_delivery(ObjectId(first.args[0]), {"status": "queued"})
            assert counter.count(lambda: webhooks.deliver(ObjectId(first.args[0]))) == ["findAndModify", "update"]
            delivered = webhooks_repo.get_db().webhook_deliveries.find({"teamId": team}, {"attemptCount": 1})
            assert sorted(d["attemptCount"] for d in delivered) == [1, 2]
    finally:
        receiver.stop()
    assert len(receiver.received) == 3


def test_a_signed_in_request_reads_no_credential_while_none_changed(app, factory, world, counter, api_key_client):
    # credentials.py: the account (and an API key) read once per process, until a credential changes.
    session = factory.session(world["user"], world["app_id"], "hello")
    path = f"/{world['user'].team_id}/session/{session['_id']}.json"
    world["me"].client.get(path)  # reads the account and keeps it
    assert counter.count(lambda: world["me"].client.get(path)) == ["find"]  # the session, nothing else
    keyed = factory.user("member", api_key=True)
    keyed_session = factory.session(keyed, factory.app_record(keyed.team_id), "hello")
    request = api_key_client(keyed)
    keyed_path = f"/{keyed.team_id}/session/{keyed_session['_id']}.json"
    assert request("GET", keyed_path).status_code == 200  # reads the key and its account, keeps both
    assert counter.count(lambda: request("GET", keyed_path)) == ["find"]


def test_the_account_read_without_invitations_reads_no_inviting_teams(app, factory, world, counter):
    """account.json: the caller's teams and the invitations waiting for them; with none waiting, the teams that
    would have invited them are not looked up (every account page pays for this read)."""
    world["me"].client.get("/account.json")  # the credential is kept from here on
    commands = counter.count(lambda: world["me"].client.get("/account.json"))
    assert commands == ["find", "find"], commands
