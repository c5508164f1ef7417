"""The reaper loop, run by every worker and every web process, and by `flask reap --loop`.

Each pass ends lost turns, enforces limit deadlines, queues lost jobs again and purges tombstones
(services.sessions.sweep). A Redis lock makes one pass per interval happen across the whole deployment;
when Redis is away every process reaps on its own, which is still safe: every end is a conditional write.
Workers also beat their presence here, which /readyz counts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import redis
from flask import Flask
from pymongo.errors import PyMongoError

from .. import metrics
from ..db import ensure_indexes_once, note_failure
from ..queueing import redis_for
from ..services import webhooks
from ..services.sessions import sweep
from ..timeutil import utcnow

log = logging.getLogger(__name__)


def presence_key(prefix: str) -> str:
    """The sorted set of live workers (name → last beat, epoch seconds)."""
    return f"{prefix}:workers"


def beat_presence(app: Flask, name: str) -> None:
    """Record that the worker `name` is alive now."""
    client = redis_for(app.config["REDIS_URL"])
    client.zadd(presence_key(app.config["REDIS_PREFIX"]), {name: time.time()})


def leave_presence(app: Flask, name: str) -> None:
    """A worker stopping on purpose leaves at once rather than when its beats go stale."""
    try:
        redis_for(app.config["REDIS_URL"]).zrem(presence_key(app.config["REDIS_PREFIX"]), name)
    except redis.RedisError:
        log.debug("worker %s could not leave the presence set", name)


def live_workers(app: Flask) -> int:
    """How many workers beat within the last WORKER_STALE_AFTER seconds (stale entries are dropped)."""
    client = redis_for(app.config["REDIS_URL"])
    key = presence_key(app.config["REDIS_PREFIX"])
    cutoff = time.time() - float(app.config["WORKER_STALE_AFTER"])
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(key, "-inf", cutoff)
    pipe.zcard(key)
    return int(pipe.execute()[1])


def _take_turn(app: Flask, interval: float) -> bool:
    """Whether this process runs this interval's pass (it holds the deployment's lock, or Redis is away)."""
    try:
        client = redis_for(app.config["REDIS_URL"])
        owner = f"{socket.gethostname()}:{os.getpid()}"
        key = f"{app.config['REDIS_PREFIX']}:reaper-lock"
        return bool(client.set(key, owner, nx=True, px=max(int(interval * 1000) - 50, 50)))
    except redis.RedisError:
        return True


# How far before its last complete pass a reaper looks again for what a crash left: writes are stamped with their
# writer's clock, so this covers a skewed clock and a write the server applied late (it had hung).
SWEEP_OVERLAP = timedelta(seconds=120)
SWEPT_KINDS = {
    "repaired": "event",
    "orphans": "orphan_event",
    "keys": "idempotency_key",
    "jobs": "job",
    "unanswered": "unanswered_session",
}


def reap_once(app: Flask, heartbeat_timeout: float | None = None, since: datetime | None = None) -> dict[str, Any]:
    """One pass of the reaper (with the indexes in place first): lost turns, limits, lost jobs, tombstones, what a
    crash left behind (since `since`: by default as far back as REPAIR_WINDOW), and webhook deliveries a crashed
    process never recorded. What it put right is counted in `agentcloud_reaper_swept_total`."""
    ensure_indexes_once(app)
    with app.app_context():
        timeout = float(app.config["HEARTBEAT_TIMEOUT"]) if heartbeat_timeout is None else heartbeat_timeout
        result: dict[str, Any] = sweep(timeout, float(app.config["REQUEUE_AFTER"]), since=since)
        result["webhooks"] = webhooks.sweep_missed()
        store = metrics.store_for(app.config)
        for field, kind in SWEPT_KINDS.items():
            found = result.get(field)
            if found:
                count = len(found) if isinstance(found, list) else int(found)
                store.increment("reaper_swept_total", count, kind=kind)
        return result


class ReaperLoop:
    """A daemon thread running the reaper every REAPER_INTERVAL (and a worker's presence beat, when named)."""

    def __init__(self, app: Flask, worker_name: str | None = None) -> None:
        self.app, self.worker_name = app, worker_name
        self.interval = float(app.config["REAPER_INTERVAL"])
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        # When this loop's last complete pass began: the next one sweeps from shortly before it.
        self.last_complete: datetime | None = None

    def start(self) -> ReaperLoop:
        """Start the thread; returns self."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (and leave the presence set)."""
        self.stop_event.set()
        if self.worker_name:
            leave_presence(self.app, self.worker_name)

    def _run(self) -> None:
        beat_every = min(self.interval, float(self.app.config["WORKER_STALE_AFTER"]) / 3)
        next_pass = time.monotonic()
        while not self.stop_event.is_set():
            if self.worker_name:
                try:
                    beat_presence(self.app, self.worker_name)
                except redis.RedisError:
                    log.debug("presence beat dropped: Redis unavailable")
            if time.monotonic() >= next_pass:
                next_pass = time.monotonic() + self.interval
                started = utcnow()
                try:
                    if _take_turn(self.app, self.interval):
                        since = None if self.last_complete is None else self.last_complete - SWEEP_OVERLAP
                        if not reap_once(self.app, since=since).get("failed"):
                            self.last_complete = started  # a pass with a failed step is looked over again
                except PyMongoError as exc:
                    with self.app.app_context():
                        note_failure(exc)
                    log.warning("reaper pass failed (MongoDB unavailable: %s); retrying next interval", exc)
                except Exception:
                    log.exception("reaper pass failed; retrying next interval")
            self.stop_event.wait(min(beat_every, max(next_pass - time.monotonic(), 0.05)))


_web_loops: dict[int, ReaperLoop] = {}
_web_lock = threading.Lock()


def ensure_web_reaper(app: Flask) -> None:
    """Start this web process's reaper loop once (after any fork), so stuck sessions are ended even when every
    worker is gone."""
    if not app.config.get("WEB_REAPER", True):
        return
    key = os.getpid()
    with _web_lock:
        if key not in _web_loops:
            _web_loops[key] = ReaperLoop(app).start()
