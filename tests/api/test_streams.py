"""Live transcripts over SSE: replay, resume without gap or duplicate, follow a running turn, end, and access."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agentcloud_clone.services import sessions as service
from agentcloud_clone.vocabulary import CancelSource
from tests.support import run_queued_turn, wait_until


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {"SSE_HEARTBEAT": 0.2, "CANCEL_POLL_INTERVAL": 0.05, "OUTPUT_FLUSH_INTERVAL": 0.05}


def frames(response: Any) -> Iterator[dict[str, Any]]:
    """The SSE frames of a streamed response, as {id, event, data} (comments skipped)."""
    pending = ""
    for chunk in response.response:
        pending += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in pending:
            block, pending = pending.split("\n\n", 1)
            fields: dict[str, Any] = {}
            for line in block.splitlines():
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if "data" in fields:
                yield {
                    "id": fields.get("id"),
                    "event": fields.get("event", "message"),
                    "data": json.loads(fields["data"]),
                }


def read_to_end(response: Any) -> list[dict[str, Any]]:
    collected = list(frames(response))
    response.close()
    return collected


def _ended_session(factory, user) -> str:
    session = factory.session(user, factory.app_record(user.team_id, steps=3, stepDelay=0), "hello")
    with factory.app.app_context():
        service.cancel_session(user.team_oid, session["_id"], factory.actor(user), CancelSource.API, "done")
    return str(session["_id"])


def test_stream_replays_the_transcript_and_ends_with_session_ended(factory, login):
    me = login(factory.user("member"))
    sid = _ended_session(factory, me.user)
    response = me.client.get(f"/{me.user.team_id}/session/{sid}/events", buffered=False)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    got = read_to_end(response)
    transcript = me.client.get(f"/{me.user.team_id}/session/{sid}/messages.json").get_json()["messages"]
    assert [f["data"] for f in got[:-1]] == transcript
    assert [int(f["id"]) for f in got[:-1]] == [e["seq"] for e in transcript]
    ended = got[-1]
    assert ended["event"] == "session.ended"
    assert ended["data"] == {"sessionId": sid, "status": "terminated", "endReason": "cancelled", "lastSeq": 3}


def test_resuming_with_last_event_id_gives_no_gap_and_no_duplicate(factory, login):
    me = login(factory.user("member"))
    sid = _ended_session(factory, me.user)
    path = f"/{me.user.team_id}/session/{sid}/events"
    first = me.client.get(path, buffered=False)
    stream = frames(first)
    head = [next(stream), next(stream)]
    first.close()  # the client went away after two events
    rest = read_to_end(me.client.get(path, headers={"Last-Event-ID": head[-1]["id"]}, buffered=False))
    seqs = [f["data"]["seq"] for f in head + rest if f["event"] == "message"]
    assert seqs == [1, 2, 3]
    by_query = read_to_end(me.client.get(f"{path}?after=2", buffered=False))
    assert [f["data"]["seq"] for f in by_query if f["event"] == "message"] == [3]
    at_the_end = read_to_end(me.client.get(path, headers={"Last-Event-ID": "3"}, buffered=False))
    assert [f["event"] for f in at_the_end] == ["session.ended"]


def test_stream_follows_a_running_turn_live_and_ends_after_the_cancel(factory, login, app):
    me = login(factory.user("member"))
    session = factory.session(me.user, factory.app_record(me.user.team_id, steps=500, stepDelay=0.01), "go")
    sid = str(session["_id"])
    worker = threading.Thread(target=run_queued_turn, args=(app, sid), daemon=True)
    worker.start()
    response = me.client.get(f"/{me.user.team_id}/session/{sid}/events", buffered=False)
    seen: list[dict[str, Any]] = []
    for frame in frames(response):
        seen.append(frame)
        if frame["event"] == "message" and frame["data"]["type"] == "output" and len(seen) == 3:
            me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel")
        if frame["event"] == "session.ended":
            break
    response.close()
    worker.join(30)
    assert seen[-1]["event"] == "session.ended" and seen[-1]["data"]["endReason"] == "cancelled"
    transcript = me.client.get(f"/{me.user.team_id}/session/{sid}/messages.json").get_json()["messages"]
    assert [f["data"] for f in seen[:-1]] == transcript


def test_stream_access_follows_the_team_rules(factory, login, app, api_key_client):
    me = login(factory.user("member"))
    sid = _ended_session(factory, me.user)
    stranger = login(factory.user("owner"))
    assert stranger.client.get(f"/{stranger.user.team_id}/session/{sid}/events").status_code == 404
    assert stranger.client.get(f"/{me.user.team_id}/session/{sid}/events").status_code == 403
    anonymous = app.test_client().get(
        f"/{me.user.team_id}/session/{sid}/events", headers={"Accept": "text/event-stream"}
    )
    assert anonymous.status_code == 401 and anonymous.get_json()["code"] == 401
    for bad in ("x", "-1", "٣", str(2**64)):
        headers = {"Last-Event-ID": bad, "Accept": "text/event-stream"}
        response = me.client.get(f"/{me.user.team_id}/session/{sid}/events", headers=headers)
        assert response.status_code == 400 and response.get_json()["code"] == 400, bad
    keyed = factory.user("viewer", {"_id": me.user.team_oid}, api_key=True)
    managed = api_key_client(keyed)("GET", f"/api/managed-agents/sessions/{sid}/stream", buffered=False)
    got = read_to_end(managed)
    assert got[-1]["event"] == "session.ended"
    assert api_key_client(keyed)("GET", f"/api/managed-agents/sessions/{'a' * 24}/stream").status_code == 404


def test_a_stream_over_the_per_process_cap_is_refused(factory, login, app):
    from agentcloud_clone.notices import dispatcher

    app.config["MAX_STREAMS_PER_PROCESS"] = 1
    me = login(factory.user("member"))
    session = factory.session(me.user, factory.app_record(me.user.team_id), None)
    with app.app_context():
        held = dispatcher().register("another-session", me.user.team_oid)  # one stream already open here
    try:
        path = f"/{me.user.team_id}/session/{session['_id']}/events"
        refused = me.client.get(path, headers={"Accept": "text/event-stream"})
    finally:
        with app.app_context():
            dispatcher().unregister("another-session", held)
    assert refused.status_code == 503 and refused.get_json()["code"] == 503


def _follow(client: Any, path: str, into: list[str]) -> threading.Thread:
    """Open a stream and read it on a thread of its own (the thread that makes a request reads its answer), each
    chunk into `into`, until it ends."""

    def read() -> None:
        response = client.get(path, buffered=False)
        try:
            for chunk in response.response:
                into.append(chunk.decode() if isinstance(chunk, bytes) else chunk)
        finally:
            response.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def test_a_stream_whose_notices_were_never_sent_still_gets_the_end(factory, login, app, monkeypatch):
    """The session's end reached no stream by notice (its writer could not send them): the process's check of
    where its streams' transcripts stand has them catch up from MongoDB, and end."""
    from agentcloud_clone import notices

    me = login(factory.user("member"))
    session = factory.session(me.user, factory.app_record(me.user.team_id), None)  # idle: a cancel ends it at once
    chunks: list[str] = []
    reader = _follow(me.client, f"/{me.user.team_id}/session/{session['_id']}/events", chunks)
    wait_until(lambda: any(": heartbeat" in c for c in chunks), 30, "the stream to follow the notices")
    monkeypatch.setattr(notices, "publish_events", lambda *args, **kwargs: None)  # every notice is lost
    with app.app_context():
        service.cancel_session(me.user.team_oid, session["_id"], factory.actor(me.user), CancelSource.API, "done")
    reader.join(30)
    assert not reader.is_alive(), "the stream never heard of the end"
    got = list(frames(type("Streamed", (), {"response": list(chunks)})()))
    assert [f["data"]["type"] for f in got[:-1]] == ["cancel", "status"]
    assert got[-1]["event"] == "session.ended" and got[-1]["data"]["endReason"] == "cancelled"


def test_idle_streams_cost_the_store_one_check_a_process_not_reads_a_stream(factory, login, app, monkeypatch):
    """Ten streams on one idle session: while they send heartbeats, what they read of MongoDB is the process's
    check of their session, not a catch-up per stream per heartbeat (two reads each, before). Counted in the same
    window as the heartbeats they sent, so the machine's speed does not matter."""
    from agentcloud_clone.repositories import sessions as sessions_repo

    me = login(factory.user("member"))
    session = factory.session(me.user, factory.app_record(me.user.team_id), None)
    path = f"/{me.user.team_id}/session/{session['_id']}/events"
    streams: list[list[str]] = [[] for _ in range(10)]
    readers = [_follow(me.client, path, chunks) for chunks in streams]

    def heartbeats() -> int:
        return sum(c.count(": heartbeat") for chunks in streams for c in list(chunks))

    wait_until(lambda: all(any(": heartbeat" in c for c in chunks) for chunks in streams), 30, "ten streams")
    reads: list[str] = []
    for name in ("list_events", "find_session", "transcript_heads"):
        real = getattr(sessions_repo, name, None)
        if real is None:
            continue

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            reads.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(sessions_repo, name, counted)
    before = heartbeats()
    wait_until(lambda: heartbeats() - before >= 50, 60, "fifty heartbeats")
    sent, read = heartbeats() - before, list(reads)
    with app.app_context():  # the session's end closes the streams
        service.cancel_session(me.user.team_oid, session["_id"], factory.actor(me.user), CancelSource.API)
    for reader in readers:
        reader.join(30)
    assert [r for r in read if r != "transcript_heads"] == [] and 0 < len(read) < sent / 2, (read, sent)
