"""One watcher per process: notices cancels for every turn it runs and heartbeats them.

Polling costs one MongoDB query per process per interval however many turns the process runs. A Redis
pub/sub notice only makes the next poll happen at once; MongoDB stays the source of truth, so a lost
notice delays a cancel by at most one poll interval.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from bson import ObjectId

from .. import metrics
from ..db import client_for, database_name
from ..queueing import cancel_channel, redis_for
from ..timeutil import utcnow

log = logging.getLogger(__name__)


class CancelHandle:
    """What a runner sees of cancellation: a flag to test, a wait that wakes early, close-on-cancel hooks."""

    def __init__(self, session_id: ObjectId) -> None:
        self.session_id = session_id
        self._event = threading.Event()
        self._callbacks: list[Callable[[], Any]] = []
        self._lock = threading.Lock()
        self.reason: str | None = None
        self.noticed_at: float | None = None

    def is_set(self) -> bool:
        """True once the session was cancelled, deleted or ended elsewhere."""
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, returning True at once if cancelled meanwhile."""
        return self._event.wait(timeout)

    def on_cancel(self, callback: Callable[[], Any]) -> None:
        """Run `callback` (e.g. closing an upstream stream) when cancelled; at once if already cancelled."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        _run_quietly(callback)

    def trigger(self, reason: str) -> None:
        """Mark cancelled and run the hooks once."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason, self.noticed_at = reason, time.monotonic()
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _run_quietly(callback)


def _run_quietly(callback: Callable[[], Any]) -> None:
    try:
        callback()
    except Exception:  # a hook failing must not stop the others or the watcher
        log.exception("cancel hook failed")


class CancelWatcher:
    """Polls MongoDB for the turns this process runs; see the module docstring."""

    def __init__(
        self,
        mongo_uri: str,
        redis_url: str,
        poll_interval: float,
        heartbeat_interval: float,
        pubsub: bool,
        redis_prefix: str = "agentcloud",
    ) -> None:
        self.mongo_uri, self.redis_url, self.redis_prefix = mongo_uri, redis_url, redis_prefix
        self.poll_interval, self.heartbeat_interval, self.pubsub = poll_interval, heartbeat_interval, pubsub
        self._handles: dict[ObjectId, tuple[ObjectId, CancelHandle]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.polls = 0
        self._last_heartbeat = 0.0

    @property
    def _sessions(self) -> Any:
        return client_for(self.mongo_uri)[database_name(self.mongo_uri)].sessions

    def start(self) -> None:
        """Start the poll thread (and the pub/sub listener when enabled)."""
        targets = [self._poll_loop] + ([self._listen_loop] if self.pubsub else [])
        for target in targets:
            thread = threading.Thread(target=target, name=f"cancel-watcher-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the threads (used by tests; worker processes just exit)."""
        self._stop.set()
        self._wake.set()

    def register(self, team_id: ObjectId, session_id: ObjectId) -> CancelHandle:
        """Watch a session while this process runs a turn of it."""
        handle = CancelHandle(session_id)
        with self._lock:
            self._handles[session_id] = (team_id, handle)
        return handle

    def unregister(self, session_id: ObjectId) -> None:
        """Stop watching a session."""
        with self._lock:
            self._handles.pop(session_id, None)

    def poll_now(self) -> None:
        """Ask for a poll without waiting for the interval."""
        self._wake.set()

    def check_once(self) -> None:
        """One poll: trigger the handle of every watched session that was cancelled, deleted or ended."""
        with self._lock:
            watched = dict(self._handles)
        if not watched:
            return
        team_ids = list({team_id for team_id, _ in watched.values()})
        docs = self._sessions.find(
            {"_id": {"$in": list(watched)}, "teamId": {"$in": team_ids}},
            {"cancelledAt": 1, "status": 1},
        )
        self.polls += 1
        metrics.MetricsStore(redis_for(self.redis_url), self.redis_prefix).increment("cancel_poll_queries_total")
        seen = set()
        for doc in docs:
            seen.add(doc["_id"])
            if doc.get("cancelledAt"):
                watched[doc["_id"]][1].trigger("cancelled")
            elif doc.get("status") in ("terminated", "error"):
                watched[doc["_id"]][1].trigger("ended")
        for session_id in set(watched) - seen:
            watched[session_id][1].trigger("deleted")
        now = time.monotonic()
        if now - self._last_heartbeat >= self.heartbeat_interval:
            self._last_heartbeat = now
            live = [sid for sid, (_, h) in watched.items() if not h.is_set()]
            if live:
                self._sessions.update_many(
                    {"_id": {"$in": live}, "teamId": {"$in": team_ids}, "status": "running"},
                    {"$set": {"heartbeatAt": utcnow()}},
                )

    def _poll_loop(self) -> None:
        # Polls keep to a fixed schedule, so the time a poll takes does not stretch the interval.
        next_poll = time.monotonic() + self.poll_interval
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
            next_poll = max(next_poll + self.poll_interval, time.monotonic())
            try:
                self.check_once()
            except Exception:
                # MongoDB away: keep trying every interval; turns keep running meanwhile.
                log.exception("cancel poll failed")

    def _listen_loop(self) -> None:
        backoff, outage = 0.1, False
        while not self._stop.is_set():
            try:
                pubsub = redis_for(self.redis_url).pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(cancel_channel(self.redis_prefix))
                if outage:
                    log.info("cancel notices restored")
                backoff, outage = 0.1, False
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and self._is_watched(message.get("data")):
                        self.poll_now()
            except (redis.RedisError, OSError) as exc:
                if not outage:
                    log.warning("cancel notices unavailable (%s); polling alone until Redis returns", exc)
                outage = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _is_watched(self, data: Any) -> bool:
        try:
            session_id = ObjectId(data.decode() if isinstance(data, bytes) else data)
        except Exception:
            return False
        with self._lock:
            return session_id in self._handles


_watchers: dict[tuple[int, str], CancelWatcher] = {}
_watchers_lock = threading.Lock()


def watcher_for(config: Any) -> CancelWatcher:
    """This process's watcher for the app's settings, started on first use (after any fork)."""
    key = (os.getpid(), config["MONGO_URI"])
    with _watchers_lock:
        watcher = _watchers.get(key)
        if watcher is None:
            watcher = CancelWatcher(
                config["MONGO_URI"],
                config["REDIS_URL"],
                float(config["CANCEL_POLL_INTERVAL"]),
                float(config["HEARTBEAT_INTERVAL"]),
                bool(config["CANCEL_PUBSUB"]),
                config["REDIS_PREFIX"],
            )
            watcher.start()
            _watchers[key] = watcher
        return watcher


def stop_watchers() -> None:
    """Stop this process's watchers (a worker shutting down, or a test tearing down its app)."""
    with _watchers_lock:
        for key in [k for k in _watchers if k[0] == os.getpid()]:
            _watchers.pop(key).stop()
