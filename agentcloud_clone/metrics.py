"""Prometheus metrics kept in Redis, so every web instance and worker adds to the same series.

Histograms are stored as cumulative bucket counters in one Redis hash per metric; the `/metrics` view
reads them back through a prometheus_client collector. Recording never fails a request or a turn: when
Redis is away the observation is dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

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


def store_for(config: Any) -> MetricsStore:
    """The metrics store of an app's (or worker's) configuration."""
    from .queueing import redis_for

    return MetricsStore(redis_for(config["REDIS_URL"]), config["REDIS_PREFIX"])


class RedisCollector(Collector):
    """Reads the shared series from Redis, plus sessions by status from MongoDB, at scrape time."""

    def __init__(self, store: MetricsStore, db: Any) -> None:
        self.store, self.db = store, db

    def collect(self) -> Iterator[Any]:
        for name, (help_text, label_names) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"agentcloud_{name}", help_text, labels=list(label_names))
            series: dict[str, dict[str, float]] = {}
            for field, value in self.store.client.hgetall(self.store.key(name)).items():
                key, _, part = field.decode().rpartition("|")
                series.setdefault(key, {})[part] = float(value)
            for key, parts in sorted(series.items()):
                labels = json.loads(key)
                buckets = [(str(b), parts.get(str(b), 0.0)) for b in BUCKETS] + [("+Inf", parts.get("+Inf", 0.0))]
                family.add_metric([labels.get(n, "") for n in label_names], buckets, parts.get("sum", 0.0))
            yield family
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"agentcloud_{name}", help_text)
            family.add_metric([], float(self.store.client.hget(self.store.key(name), "{}") or 0))
            yield family
        sessions = GaugeMetricFamily("agentcloud_sessions", "Sessions by status.", labels=["status"])
        counts = {
            row["_id"]: row["n"]
            for row in self.db.sessions.aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
        }
        for status in ("started", "running", "waiting", "warning", "error", "terminated"):
            sessions.add_metric([status], float(counts.get(status, 0)))
        yield sessions
