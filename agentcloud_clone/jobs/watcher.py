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
from flask import Flask
from pymongo.errors import PyMongoError

from .. import metrics
from ..db import note_failure
from ..ids import parse_object_id
from ..queueing import cancel_channel, read_cancel_notice, redis_for
from ..repositories import sessions as sessions_repo
from ..services import sessions
from ..timeutil import utcnow
from ..vocabulary import ENDED_STATUSES, Status

log = logging.getLogger(__name__)
# A session whose turn stamped its own heartbeat within this many heartbeat intervals is left out of the next
# heartbeat (see CancelWatcher.beat_once).
STAMPED_RECENTLY = 1.5


class CancelHandle:
    """What a runner sees of cancellation: a flag to test, a wait that wakes early, close-on-cancel hooks."""

    def __init__(self, session_id: ObjectId, turn_id: ObjectId | None = None) -> None:
        self.session_id, self.turn_id = session_id, turn_id
        self._event = threading.Event()
        self._callbacks: list[Callable[[], Any]] = []
        self._lock = threading.Lock()
        self.reason: str | None = None
        self.noticed_at: float | None = None
        # The session as the poll that triggered this handle saw it (None when no poll did): the turn ends from
        # it without reading the session again, and reads it only if it changed since (services.sessions.end_turn).
        self.seen: dict[str, Any] | None = None
        # When (time.monotonic()) the last write of the turn's own that stamped `heartbeatAt` began.
        self.stamped_at: float | None = None

    def is_set(self) -> bool:
        """True once the session was cancelled, deleted or ended elsewhere, or this turn was interrupted by a
        newer message (`reason` says which)."""
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, returning True at once if cancelled meanwhile."""
        return self._event.wait(timeout)

    def note_stamp(self, began_at: float) -> None:
        """A write that began at `began_at` (time.monotonic()) stamped the session's heartbeat."""
        self.stamped_at = began_at if self.stamped_at is None else max(self.stamped_at, began_at)

    def on_cancel(self, callback: Callable[[], Any]) -> None:
        """Run `callback` (e.g. closing an upstream stream) when cancelled; at once if already cancelled."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        _run_quietly(callback)

    def trigger(self, reason: str, seen: dict[str, Any] | None = None) -> None:
        """Mark cancelled and run the hooks once; `seen` is the session state that told."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason, self.noticed_at, self.seen = reason, time.monotonic(), seen
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

    def __init__(self, app: Flask) -> None:
        config = app.config
        self.app = app
        self.redis_url, self.redis_prefix = config["REDIS_URL"], config["REDIS_PREFIX"]
        self.poll_interval = float(config["CANCEL_POLL_INTERVAL"])
        self.heartbeat_interval = float(config["HEARTBEAT_INTERVAL"])
        self.pubsub = bool(config["CANCEL_PUBSUB"])
        self.metrics = metrics.store_for(config)
        self._handles: dict[ObjectId, tuple[ObjectId, CancelHandle]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.polls = 0

    def start(self) -> None:
        """Start the poll and heartbeat threads (and the pub/sub listener when enabled)."""
        targets = [self._poll_loop, self._heartbeat_loop] + ([self._listen_loop] if self.pubsub else [])
        for target in targets:
            thread = threading.Thread(target=target, name=f"cancel-watcher-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the threads (a worker shutting down, or a test tearing down its app)."""
        self._stop.set()
        self._wake.set()

    def register(self, team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId | None = None) -> CancelHandle:
        """Watch a session while this process runs a turn of it."""
        handle = CancelHandle(session_id, turn_id)
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
        teams = {session_id: team_id for session_id, (team_id, _) in watched.items()}
        with self.app.app_context():
            docs = sessions_repo.watch_states(teams)
            self.polls += 1
            self.metrics.increment("cancel_poll_queries_total")
            seen = set()
            now_dt = utcnow()
            for doc in docs:
                seen.add(doc["_id"])
                team_id, handle = watched[doc["_id"]]
                if doc.get("deletedAt"):
                    handle.trigger("deleted")
                elif doc.get("cancelledAt"):
                    handle.trigger("cancelled", doc)
                elif doc.get("status") in ENDED_STATUSES:
                    handle.trigger("ended", doc)
                elif handle.turn_id is not None and doc.get("interruptTurnId") == handle.turn_id:
                    handle.trigger("interrupted", doc)
                elif doc.get("deadline") is not None and doc["deadline"] < now_dt:
                    # Over its duration limit: the stamp says why, and the turn stops as for any cancel.
                    sessions.enforce_deadline(team_id, doc)
                    handle.trigger("cancelled")
            for session_id in set(watched) - seen:
                watched[session_id][1].trigger("deleted")

    def beat_once(self) -> None:
        """One heartbeat of every watched session whose turn is still running and has not stamped its heartbeat
        itself within one and a half intervals (a turn's output writes do, at OUTPUT_FLUSH_INTERVAL or less
        often while the store is slow): one write however many, none while every turn streams. A session's
        stamps therefore come at most two and a half intervals apart."""
        recent = time.monotonic() - STAMPED_RECENTLY * self.heartbeat_interval
        with self._lock:
            live = {
                sid: team_id
                for sid, (team_id, handle) in self._handles.items()
                if not handle.is_set() and (handle.stamped_at is None or handle.stamped_at < recent)
            }
        if live:
            with self.app.app_context():
                sessions_repo.heartbeat(live, utcnow())

    def _poll_loop(self) -> None:
        # Polls keep to a fixed schedule, so the time a poll takes does not stretch the interval.
        next_poll = time.monotonic() + self.poll_interval
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
            next_poll = max(next_poll + self.poll_interval, time.monotonic())
            self._attempt(self.check_once, "cancel poll")

    def _heartbeat_loop(self) -> None:
        # A thread of its own: a heartbeat updates every running session of the process, which on a loaded store
        # takes seconds, and the poll a cancel notice asks for must not wait behind it. Measured from the start of
        # the last heartbeat that landed; while MongoDB is away it is tried again every poll interval, so the
        # first that gets through comes at once and a turn that kept running is not taken for lost.
        wait = self.heartbeat_interval
        while not self._stop.wait(wait):
            started = time.monotonic()
            if not self._attempt(self.beat_once, "heartbeat"):
                wait = self.poll_interval
                continue
            wait = max(0.0, self.heartbeat_interval - (time.monotonic() - started))

    def _attempt(self, step: Callable[[], None], what: str) -> bool:
        """Run one poll or heartbeat; False when MongoDB was away or hung (noted; the caller tries again after the
        poll interval, and turns keep running meanwhile)."""
        try:
            step()
        except PyMongoError as exc:
            with self.app.app_context():
                note_failure(exc)
            log.warning("%s failed (MongoDB unavailable: %s); trying again in %.2f s", what, exc, self.poll_interval)
            return False
        except Exception:
            log.exception("%s failed", what)
        return True

    def _listen_loop(self) -> None:
        backoff, outage = 0.1, False
        while not self._stop.is_set():
            try:
                pubsub = redis_for(self.redis_url).pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(cancel_channel(self.redis_prefix))
                if outage:
                    log.info("cancel notices restored")
                backoff, outage = 0.1, False
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message:
                        self.hear(message.get("data"))
            except (redis.RedisError, OSError) as exc:
                if not outage:
                    log.warning("cancel notices unavailable (%s); polling alone until Redis returns", exc)
                outage = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def hear(self, data: Any) -> None:
        """A cancel notice: a turn of this process whose session's stamp it carries stops at once, ending from
        that stamp (no poll); a bare notice asks for a poll. Only the web's cancel publishes a stamp, once it is
        stored, and the ending write checks it against MongoDB (a stale one costs a read); Redis is trusted as
        far as RQ's queue on it is, since whoever can publish there can queue any job too."""
        session_text, stamp = read_cancel_notice(data)
        session_id = parse_object_id(session_text)
        with self._lock:
            watched = self._handles.get(session_id) if session_id is not None else None
        if watched is None:
            return
        handle = watched[1]
        if stamp is None or handle.turn_id is None:
            self.poll_now()
            return
        seen = {"_id": session_id, "status": Status.RUNNING, "activeTurnId": handle.turn_id, **stamp}
        handle.trigger("cancelled", seen)


_watchers: dict[tuple[int, str], CancelWatcher] = {}
_watchers_lock = threading.Lock()


def watcher_for(app: Flask) -> CancelWatcher:
    """This process's watcher for the app, started on first use (after any fork)."""
    key = (os.getpid(), app.config["MONGO_URI"])
    with _watchers_lock:
        watcher = _watchers.get(key)
        if watcher is None:
            watcher = CancelWatcher(app)
            watcher.start()
            _watchers[key] = watcher
        return watcher


def stop_watchers() -> None:
    """Stop this process's watchers (a worker shutting down, or a test tearing down its app)."""
    with _watchers_lock:
        for key in [k for k in _watchers if k[0] == os.getpid()]:
            _watchers.pop(key).stop()
