"""Prometheus metrics kept in Redis, so every web instance and worker adds to the same series.

Histograms are stored as cumulative bucket counters in one Redis hash per metric; the `/metrics` view
reads them back through a prometheus_client collector. Recording never fails a request or a turn: when
Redis is away the observation is dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .vocabulary import STATUSES

log = logging.getLogger(__name__)

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HISTOGRAMS = {
    "http_request_duration_seconds": ("Time to answer an HTTP request.", ("method", "endpoint", "status")),
    "cancel_to_stop_seconds": ("From the cancel stamp to the worker ending the session.", ()),
}
COUNTERS = {
    "cancel_poll_queries_total": "MongoDB queries made by workers polling for cancels.",
}


def _label_key(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class MetricsStore:
    """Where the series live: a Redis and the deployment's key prefix (REDIS_PREFIX)."""

    client: redis.Redis
    prefix: str

    def key(self, name: str) -> str:
        return f"{self.prefix}:metrics:{name}"

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Add one observation to histogram `name`."""
        key, field = self.key(name), _label_key(labels)
        try:
            pipe = self.client.pipeline(transaction=False)
            for bound in BUCKETS:
                if value <= bound:
                    pipe.hincrby(key, f"{field}|{bound}", 1)
            pipe.hincrby(key, f"{field}|+Inf", 1)
            pipe.hincrbyfloat(key, f"{field}|sum", value)
            pipe.execute()
        except redis.RedisError:
            log.debug("metric %s dropped: Redis unavailable", name)

    def increment(self, name: str, amount: int = 1) -> None:
        """Add to counter `name`."""
        try:
            self.client.hincrby(self.key(name), "{}", amount)
        except redis.RedisError:
            log.debug("metric %s dropped: Redis unavailable", name)


_stores: dict[tuple[int, str, str], MetricsStore] = {}


def store_for(config: Any) -> MetricsStore:
    """The metrics store of an app's (or worker's) configuration, built once per process."""
    from .queueing import redis_for

    key = (os.getpid(), config["REDIS_URL"], config["REDIS_PREFIX"])
    store = _stores.get(key)
    if store is None:
        store = _stores[key] = MetricsStore(redis_for(config["REDIS_URL"]), config["REDIS_PREFIX"])
    return store


class RedisCollector(Collector):
    """Reads the shared series from Redis, plus sessions by status from MongoDB, at scrape time."""

    def __init__(self, store: MetricsStore, sessions_by_status: Callable[[], dict[str, int]]) -> None:
        self.store, self.sessions_by_status = store, sessions_by_status

    def collect(self) -> Iterator[Any]:
        for name, (help_text, label_names) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"agentcloud_{name}", help_text, labels=list(label_names))
            series: dict[str, dict[str, float]] = {}
            for field, value in self.store.client.hgetall(self.store.key(name)).items():
                text = field.decode() if isinstance(field, bytes) else str(field)
                key, _, part = text.rpartition("|")
                series.setdefault(key, {})[part] = float(value)
            for key, parts in sorted(series.items()):
                labels = json.loads(key)
                buckets = [(str(b), parts.get(str(b), 0.0)) for b in BUCKETS] + [("+Inf", parts.get("+Inf", 0.0))]
                family.add_metric([labels.get(n, "") for n in label_names], buckets, parts.get("sum", 0.0))
            yield family
        for name, help_text in COUNTERS.items():
            counter = CounterMetricFamily(f"agentcloud_{name}", help_text)
            counter.add_metric([], float(self.store.client.hget(self.store.key(name), "{}") or 0))
            yield counter
        sessions = GaugeMetricFamily("agentcloud_sessions", "Sessions by status.", labels=["status"])
        counts = self.sessions_by_status()
        for status in STATUSES:
            sessions.add_metric([status], float(counts.get(status, 0)))
        yield sessions
