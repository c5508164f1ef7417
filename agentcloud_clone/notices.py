"""Transcript notices over Redis pub/sub: "new events for session X", carrying the events themselves.

Writers publish without waiting (the process's Redis outbox sends; a notice that cannot be sent is dropped), so
a slow or hung Redis never holds up a request or a turn. Readers (live streams) subscribe through one
dispatcher per process, which fans notices out to per-stream queues. MongoDB stays the source of truth: a
stream that misses a notice (Redis away, a full queue, a reconnect) reads what it missed from MongoDB.

A notice its writer could not send is found by the dispatcher's check: every half SSE_HEARTBEAT, one read of
where the transcripts of the sessions it has streams on stand (`transcript_heads`, one query a chunk of
sessions). A session whose last reserved `seq` was already stored at the check before, and still not heard
of, has its streams catch up from MongoDB. So a lost notice is made good within one heartbeat, as when each
stream read MongoDB on its every heartbeat, at one query a process instead of two reads a stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
from collections.abc import Sequence
from typing import Any

import redis
from bson import ObjectId
from flask import Flask, current_app
from pymongo.errors import PyMongoError

from .queueing import redis_for, send_later
from .repositories import sessions as sessions_repo

log = logging.getLogger(__name__)
# Notices a stream's queue holds before the stream is told to catch up from MongoDB instead.
STREAM_QUEUE_SIZE = 256
RESYNC: dict[str, Any] = {"resync": True}


def channel_prefix(prefix: str) -> str:
    """Notices for session X travel on `<prefix>:session:X`."""
    return f"{prefix}:session:"


def publish_events(session_id: Any, events: Sequence[dict[str, Any]]) -> None:
    """Announce events just written to a session's transcript (their JSON form), without waiting."""
    if not events:
        return
    from .schemas import event_out

    config = current_app.config
    payload = json.dumps({"events": event_out.dump(list(events), many=True)}, default=str)
    channel = channel_prefix(config["REDIS_PREFIX"]) + str(session_id)
    send_later(_publish, config["REDIS_URL"], channel, payload)


def _publish(url: str, channel: str, payload: str) -> None:
    redis_for(url).publish(channel, payload)


class Dispatcher:
    """One pub/sub subscription per process, fanned out to the streams following each session, and the check for
    notices that were never sent (see the module docstring)."""

    def __init__(self, url: str, prefix: str, app: Flask, check_every: float) -> None:
        self.url, self.prefix = url, channel_prefix(prefix)
        self.app, self.check_every = app, check_every
        self.streams: dict[str, set[queue.Queue[dict[str, Any]]]] = {}
        self.lock = threading.Lock()
        self.started = False
        self.stopping = threading.Event()
        self.pubsub: Any = None
        self.listening = False  # subscribed now: notices reach the streams
        # Per session with streams here: its team, the last seq its streams were told of (by a notice, or by their
        # own catch-up), and its last reserved seq at the last check.
        self.teams: dict[str, ObjectId] = {}
        self.heard: dict[str, int] = {}
        self.checked: dict[str, int] = {}

    def register(self, session_id: str, team_id: ObjectId) -> queue.Queue[dict[str, Any]]:
        """A queue that receives the notices of this session (of this team) until `unregister`."""
        stream: queue.Queue[dict[str, Any]] = queue.Queue(STREAM_QUEUE_SIZE)
        with self.lock:
            self.streams.setdefault(session_id, set()).add(stream)
            self.teams[session_id] = team_id
            if not self.started:
                self.started = True
                threading.Thread(target=self._run, name="notice-dispatcher", daemon=True).start()
                threading.Thread(target=self._check_loop, name="notice-check", daemon=True).start()
        return stream

    def unregister(self, session_id: str, stream: queue.Queue[dict[str, Any]]) -> None:
        """Stop delivering to `stream`."""
        with self.lock:
            streams = self.streams.get(session_id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self.streams[session_id]
                    for known in (self.teams, self.heard, self.checked):
                        known.pop(session_id, None)

    def caught_up(self, session_id: str, seq: int) -> None:
        """A stream on the session read its transcript up to `seq` from MongoDB."""
        with self.lock:
            if session_id in self.streams:
                self.heard[session_id] = max(self.heard.get(session_id, 0), seq)

    @property
    def open_streams(self) -> int:
        with self.lock:
            return sum(len(streams) for streams in self.streams.values())

    def check_once(self) -> list[str]:
        """Compare where the transcripts stand with what their streams heard; the sessions whose streams were
        told to catch up (deleted ones too: their streams end)."""
        with self.lock:
            teams = {ObjectId(sid): team for sid, team in self.teams.items()}
        if not teams:
            return []
        with self.app.app_context():
            heads = sessions_repo.transcript_heads(teams)
        behind: list[str] = []
        with self.lock:
            for oid in teams:
                sid = str(oid)
                if sid not in self.streams:
                    continue
                head, before = heads.get(oid), self.checked.get(sid)
                if head is None:
                    behind.append(sid)
                    continue
                self.checked[sid] = head
                # What was stored a whole check ago has had time to be heard of: if it was not, it never will be.
                if before is not None and before > self.heard.get(sid, 0):
                    self.heard[sid] = before
                    behind.append(sid)
            streams = [stream for sid in behind for stream in self.streams.get(sid, ())]
        for stream in streams:
            _resync(stream)
        return behind

    def _check_loop(self) -> None:
        while not self.stopping.wait(self.check_every):
            if not self.listening:
                continue  # the streams read MongoDB themselves meanwhile
            try:
                self.check_once()
            except PyMongoError as exc:  # the streams keep their notices; the next check tries again
                log.warning("live streams' check failed (MongoDB unavailable: %s)", exc)
            except Exception:
                log.exception("live streams' check failed")

    def _deliver(self, session_id: str, notice: dict[str, Any]) -> None:
        seqs = [int(event["seq"]) for event in notice.get("events") or [] if "seq" in event]
        with self.lock:
            streams = list(self.streams.get(session_id, ()))
            if streams and seqs:
                self.heard[session_id] = max(self.heard.get(session_id, 0), *seqs)
        for stream in streams:
            try:
                stream.put_nowait(notice)
            except queue.Full:
                _resync(stream)  # a slow reader catches up from MongoDB instead

    def _resync_all(self) -> None:
        with self.lock:
            streams = [stream for group in self.streams.values() for stream in group]
        for stream in streams:
            _resync(stream)

    def stop(self) -> None:
        """Stop listening (a test tearing down its app; a web process just exits)."""
        self.stopping.set()
        with contextlib.suppress(Exception):
            if self.pubsub is not None:
                self.pubsub.close()

    def _run(self) -> None:
        backoff, outage = 0.1, False
        while not self.stopping.is_set():
            try:
                self.pubsub = pubsub = redis_for(self.url).pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.psubscribe(f"{self.prefix}*")
                self.listening = True
                # Anything published while not subscribed was missed: every stream catches up from MongoDB.
                self._resync_all()
                if outage:
                    log.info("transcript notices restored")
                backoff, outage = 0.1, False
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=1)
                    if message and message.get("type") == "pmessage":
                        channel = message["channel"]
                        session_id = (channel.decode() if isinstance(channel, bytes) else channel)[len(self.prefix) :]
                        self._deliver(session_id, json.loads(message["data"]))
            except (redis.RedisError, OSError, ValueError, AttributeError) as exc:
                self.listening = False
                if self.stopping.is_set():
                    return
                if not outage:
                    log.warning("transcript notices unavailable (%s); streams read MongoDB meanwhile", exc)
                outage = True
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)


def _resync(stream: queue.Queue[dict[str, Any]]) -> None:
    """Replace whatever the stream has not read with one "catch up from MongoDB"."""
    while True:
        try:
            stream.get_nowait()
        except queue.Empty:
            break
    with contextlib.suppress(queue.Full):  # only the dispatcher fills it, and it has just been emptied
        stream.put_nowait(RESYNC)


_dispatchers: dict[tuple[int, str, str, int], Dispatcher] = {}
_dispatchers_lock = threading.Lock()


def dispatcher() -> Dispatcher:
    """This process's dispatcher for the app (its Redis and prefix, and its database for the check)."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    config = app.config
    key = (os.getpid(), config["REDIS_URL"], config["REDIS_PREFIX"], id(app))
    with _dispatchers_lock:
        found = _dispatchers.get(key)
        if found is None:
            check_every = float(config["SSE_HEARTBEAT"]) / 2
            found = _dispatchers[key] = Dispatcher(config["REDIS_URL"], config["REDIS_PREFIX"], app, check_every)
        return found


def stop_dispatchers() -> None:
    """Stop this process's dispatchers (tests tearing down their apps)."""
    with _dispatchers_lock:
        for key in [k for k in _dispatchers if k[0] == os.getpid()]:
            _dispatchers.pop(key).stop()
