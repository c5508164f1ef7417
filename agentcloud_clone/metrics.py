"""Prometheus metrics kept in Redis, so every web instance and worker adds to the same series.

Histograms are stored as cumulative bucket counters in one Redis hash per metric; the `/metrics` view
reads them back through a prometheus_client collector. Recording never holds up a request or a turn: an
observation goes to a per-process recorder thread, which sends what has gathered in one pipeline; while Redis
is away (or the backlog is full) observations are dropped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .background import BackgroundQueue
from .vocabulary import STATUSES

log = logging.getLogger(__name__)

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HISTOGRAMS = {
    "http_request_duration_seconds": ("Time to answer an HTTP request.", ("method", "endpoint", "status")),
    "cancel_to_stop_seconds": ("From the cancel stamp to the worker ending the session.", ()),
}
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cancel_poll_queries_total": ("MongoDB queries made by workers polling for cancels.", ()),
    "reaper_swept_total": (
        "What the reaper's sweep found left behind by a crash or a lost answer and put right: `event` transcript "
        "entries written for a session whose writer never wrote them, `orphan_event` entries removed from a "
        "deleted session, `idempotency_key` records of requests that never finished, `job` queue entries of "
        "ended or deleted sessions, `unanswered_session` sessions whose create answered an error but stayed.",
        ("kind",),
    ),
}
# Observations a process keeps waiting for the recorder before dropping new ones.
BACKLOG = 10_000
# Observations sent in one pipeline at most.
BATCH = 500


def _label_key(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class MetricsStore:
    """Where the series live: a Redis and the deployment's key prefix (REDIS_PREFIX)."""

    client: redis.Redis
    prefix: str
    recorder: BackgroundQueue[tuple[redis.Redis, Ops]] = field(
        default_factory=lambda: _recorder(), compare=False, repr=False
    )

    def key(self, name: str) -> str:
        return f"{self.prefix}:metrics:{name}"

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Add one observation to histogram `name` (sent in the background)."""
        key, field_ = self.key(name), _label_key(labels)
        ops: Ops = [(key, f"{field_}|{bound}", 1) for bound in BUCKETS if value <= bound]
        ops += [(key, f"{field_}|+Inf", 1), (key, f"{field_}|sum", value)]
        self.recorder.put((self.client, ops))

    def increment(self, name: str, amount: int = 1, **labels: str) -> None:
        """Add to counter `name` (sent in the background)."""
        self.recorder.put((self.client, [(self.key(name), _label_key(labels), amount)]))

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until what this process recorded so far was sent (or dropped); True when it was."""
        return self.recorder.settle(timeout)


Ops = list[tuple[str, str, float]]


def _send_batch(batch: list[tuple[redis.Redis, Ops]]) -> None:
    """Send gathered observations in one Redis round trip."""
    try:
        pipe = batch[0][0].pipeline(transaction=False)
        for _, ops in batch:
            for key, field_, amount in ops:
                if field_.endswith("|sum"):
                    pipe.hincrbyfloat(key, field_, float(amount))
                else:
                    pipe.hincrby(key, field_, int(amount))
        pipe.execute()
    except redis.RedisError:
        log.debug("%d metric observations dropped: Redis unavailable", len(batch))


def _recorder() -> BackgroundQueue[tuple[redis.Redis, Ops]]:
    return BackgroundQueue("metrics-recorder", _send_batch, size=BACKLOG, batch=BATCH)


_stores: dict[tuple[int, str, str], MetricsStore] = {}
_stores_lock = threading.Lock()


def store_for(config: Any) -> MetricsStore:
    """The metrics store of an app's (or worker's) configuration, built once per process."""
    from .queueing import REDIS_TIMEOUT, redis_for

    key = (os.getpid(), config["REDIS_URL"], config["REDIS_PREFIX"])
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            client = redis_for(config["REDIS_URL"], float(config.get("REDIS_TIMEOUT", REDIS_TIMEOUT)))
            store = _stores[key] = MetricsStore(client, config["REDIS_PREFIX"])
        return store


class RedisCollector(Collector):
    """Reads the shared series from Redis, plus sessions by status from MongoDB, at scrape time. While Redis is
    away the shared series are left out (`agentcloud_metrics_store_up` says so), and sessions by status while
    MongoDB is; the rest is still served."""

    def __init__(self, store: MetricsStore, sessions_by_status: Callable[[], dict[str, int] | None]) -> None:
        self.store, self.sessions_by_status = store, sessions_by_status

    def _shared(self) -> dict[str, dict[str, float]] | None:
        """Every shared hash (metric name → field → value) in one round trip; None while Redis is away."""
        names = [*HISTOGRAMS, *COUNTERS]
        try:
            pipe = self.store.client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.store.key(name))
            hashes = pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics scrape without the shared series: Redis unavailable (%s)", exc)
            return None
        return {
            name: {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in found.items()}
            for name, found in zip(names, hashes, strict=True)
        }

    def collect(self) -> Iterator[Any]:
        shared = self._shared()
        up = GaugeMetricFamily("agentcloud_metrics_store_up", "Whether the shared series could be read from Redis.")
        up.add_metric([], 0.0 if shared is None else 1.0)
        yield up
        if shared is not None:
            yield from self._histograms(shared)
            yield from self._counters(shared)
        counts = self.sessions_by_status()
        if counts is not None:
            sessions = GaugeMetricFamily("agentcloud_sessions", "Sessions by status.", labels=["status"])
            for status in STATUSES:
                sessions.add_metric([status], float(counts.get(status, 0)))
            yield sessions

    def _histograms(self, shared: dict[str, dict[str, float]]) -> Iterator[Any]:
        for name, (help_text, label_names) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"agentcloud_{name}", help_text, labels=list(label_names))
            series: dict[str, dict[str, float]] = {}
            for text, value in shared[name].items():
                key, _, part = text.rpartition("|")
                series.setdefault(key, {})[part] = value
            for key, parts in sorted(series.items()):
                labels = json.loads(key)
                buckets = [(str(b), parts.get(str(b), 0.0)) for b in BUCKETS] + [("+Inf", parts.get("+Inf", 0.0))]
                family.add_metric([labels.get(n, "") for n in label_names], buckets, parts.get("sum", 0.0))
            yield family

    def _counters(self, shared: dict[str, dict[str, float]]) -> Iterator[Any]:
        for name, (help_text, label_names) in COUNTERS.items():
            counter = CounterMetricFamily(f"agentcloud_{name}", help_text, labels=list(label_names))
            if not label_names:
                counter.add_metric([], shared[name].get("{}", 0.0))
            for key, value in sorted(shared[name].items()):
                labels = json.loads(key)
                if label_names and labels:
                    counter.add_metric([labels.get(n, "") for n in label_names], value)
            yield counter
