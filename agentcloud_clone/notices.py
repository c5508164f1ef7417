"""Transcript notices over Redis pub/sub: "new events for session X", carrying the events themselves.

Writers publish without waiting (the process's Redis outbox sends; a notice that cannot be sent is dropped), so
a slow or hung Redis never holds up a request or a turn. Readers (live streams) subscribe through one
dispatcher per process, which fans notices out to per-stream queues. MongoDB stays the source of truth: a
stream that misses a notice (Redis away, a full queue, a reconnect) reads what it missed from MongoDB.
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
from flask import current_app

from .queueing import redis_for, send_later

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
    """One pub/sub subscription per process, fanned out to the streams following each session."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, channel_prefix(prefix)
        self.streams: dict[str, set[queue.Queue[dict[str, Any]]]] = {}
        self.lock = threading.Lock()
        self.started = False
        self.stopping = threading.Event()
        self.pubsub: Any = None

    def register(self, session_id: str) -> queue.Queue[dict[str, Any]]:
        """A queue that receives this session's notices until `unregister`."""
        stream: queue.Queue[dict[str, Any]] = queue.Queue(STREAM_QUEUE_SIZE)
        with self.lock:
            self.streams.setdefault(session_id, set()).add(stream)
            if not self.started:
                self.started = True
                threading.Thread(target=self._run, name="notice-dispatcher", daemon=True).start()
        return stream

    def unregister(self, session_id: str, stream: queue.Queue[dict[str, Any]]) -> None:
        """Stop delivering to `stream`."""
        with self.lock:
            streams = self.streams.get(session_id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self.streams[session_id]

    @property
    def open_streams(self) -> int:
        with self.lock:
            return sum(len(streams) for streams in self.streams.values())

    def _deliver(self, session_id: str, notice: dict[str, Any]) -> None:
        with self.lock:
            streams = list(self.streams.get(session_id, ()))
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


_dispatchers: dict[tuple[int, str, str], Dispatcher] = {}
_dispatchers_lock = threading.Lock()


def dispatcher() -> Dispatcher:
    """This process's dispatcher for the app's Redis and prefix."""
    config = current_app.config
    key = (os.getpid(), config["REDIS_URL"], config["REDIS_PREFIX"])
    with _dispatchers_lock:
        found = _dispatchers.get(key)
        if found is None:
            found = _dispatchers[key] = Dispatcher(config["REDIS_URL"], config["REDIS_PREFIX"])
        return found


def stop_dispatchers() -> None:
    """Stop this process's dispatchers (tests tearing down their apps)."""
    with _dispatchers_lock:
        for key in [k for k in _dispatchers if k[0] == os.getpid()]:
            _dispatchers.pop(key).stop()
