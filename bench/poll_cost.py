"""Part 4: what polling for cancels costs MongoDB as the number of running sessions grows.

One CancelWatcher (as one worker process has) watches N running sessions; a pymongo CommandListener counts
the commands it sends to the `sessions` collection. Polling should cost one query per process per interval
whatever N is, so reads per session per interval should fall as 1/N.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import monitoring

from agentcloud_clone import create_app
from agentcloud_clone.jobs.watcher import CancelWatcher

from .stats import summarize

HEARTBEAT_INTERVAL = 5.0
MIN_POLLS = 3
MAX_WINDOW = 12.0
# mongoeco answers one command at a time, so a slow poll also holds up pymongo's server checks; with the
# product's 3 s default the client would drop its connections mid-query at N = 1,000.
PATIENT_TIMEOUTS = "connectTimeoutMS=30000&serverSelectionTimeoutMS=30000"


class SessionCommands(monitoring.CommandListener):
    """Counts commands on the `sessions` collection, and how long each `find` took."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.find_seconds: list[float] = []
        self._lock = threading.Lock()
        self._names: dict[int, str] = {}
        self.active = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        collection = event.command.get("collection") if name == "getMore" else event.command.get(name)
        if not self.active or collection != "sessions":
            return
        with self._lock:
            self.counts[event.command_name] += 1
            self._names[event.request_id] = event.command_name

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        with self._lock:
            if self._names.pop(event.request_id, None) == "find":
                self.find_seconds.append(event.duration_micros / 1e6)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        with self._lock:
            self._names.pop(event.request_id, None)
            self.counts["failed"] += 1


def _measure(
    mongo_url: str, redis_url: str, listener: SessionCommands, n: int, interval: float, seconds: float
) -> dict[str, Any]:
    uri = mongo_url.rstrip("/") + f"/bench_poll_{uuid.uuid4().hex[:10]}?{PATIENT_TIMEOUTS}"
    team = ObjectId()
    seeder: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
    ids = (
        seeder.get_default_database()
        .sessions.insert_many([{"teamId": team, "status": "running", "name": f"bench {i}"} for i in range(n)])
        .inserted_ids
    )
    app = create_app(
        {
            "MONGO_URI": uri,
            "REDIS_URL": redis_url,
            "REDIS_PREFIX": f"bench-poll-{uuid.uuid4().hex[:10]}",
            "CANCEL_POLL_INTERVAL": interval,
            "HEARTBEAT_INTERVAL": HEARTBEAT_INTERVAL,
            "CANCEL_PUBSUB": False,
            "SECRET_KEY": "bench",
            "LOG_LEVEL": "WARNING",
        }
    )
    watcher = CancelWatcher(app)
    try:
        for sid in ids:
            watcher.register(team, sid)
        warm_up = time.monotonic()
        watcher.check_once()  # connect and warm up outside the window
        # Long enough for several polls even when each query is slow, within the run's time budget.
        seconds = min(max(seconds, MIN_POLLS * (interval + time.monotonic() - warm_up)), MAX_WINDOW)
        with listener._lock:
            listener.counts.clear()
            listener.find_seconds.clear()
        listener.active = True
        polls_before, started = watcher.polls, time.monotonic()
        watcher.start()
        time.sleep(seconds)
        # Counting ends before stop(): stopping wakes the poll loop, which polls once more on its way out.
        listener.active = False
        elapsed = time.monotonic() - started
        polls = watcher.polls - polls_before
    finally:
        watcher.stop()
        for thread in watcher._threads:  # a poll still in flight finishes before its database goes
            thread.join(30)
        seeder.drop_database(seeder.get_default_database().name)
        seeder.close()
    counts = dict(listener.counts)
    reads = counts.get("find", 0) + counts.get("getMore", 0)
    return {
        "sessions": n,
        "seconds": elapsed,
        "polls": polls,
        "commands": counts,
        "finds_per_s": counts.get("find", 0) / elapsed,
        "reads_per_s": reads / elapsed,
        "baseline_per_s": 1 / interval,
        "reads_per_session_per_interval": reads / elapsed * interval / n,
        "find_seconds": summarize(listener.find_seconds),
    }


def run(mongo_url: str, redis_url: str, *, sizes: list[int], interval: float, seconds: float) -> dict[str, Any]:
    """The watcher's MongoDB commands per second for each number of watched sessions."""
    listener = SessionCommands()
    monitoring.register(listener)  # applies to clients created from now on, the watcher's included
    return {
        "poll_interval_s": interval,
        "heartbeat_interval_s": HEARTBEAT_INTERVAL,
        "runs": [_measure(mongo_url, redis_url, listener, n, interval, seconds) for n in sizes],
    }
