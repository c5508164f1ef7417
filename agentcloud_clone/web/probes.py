"""Probes and scrapes: liveness, readiness and Prometheus metrics. Not rate limited, never a login redirect."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pymongo.errors import PyMongoError

from .. import metrics
from ..db import get_db, note_failure
from ..errors import NotSignedIn
from ..jobs.reaper import live_workers
from ..queueing import get_redis, redis_available
from ..repositories import sessions as sessions_repo
from .responses import error_response

bp = Blueprint("probes", __name__)
log = logging.getLogger(__name__)


@bp.get("/healthz")
def healthz() -> Any:
    """The process is up and answering; says nothing about its dependencies."""
    return jsonify(ok=True)


@bp.get("/readyz")
def readyz() -> Any:
    """Ready to serve: MongoDB and Redis both answer. 503 with the failing checks otherwise."""
    checks: dict[str, str] = {}
    try:
        get_db().command("ping")
        checks["mongo"] = "ok"
    except Exception as exc:  # any failure means not ready; the detail is for operators' logs
        note_failure(exc)
        log.warning("readiness: MongoDB unavailable: %s", exc)
        checks["mongo"] = "unavailable"
    workers = None
    try:
        get_redis().ping()
        checks["redis"] = "ok"
        workers = live_workers(current_app._get_current_object())  # type: ignore[attr-defined]
    except Exception as exc:
        log.warning("readiness: Redis unavailable: %s", exc)
        checks["redis"] = "unavailable"
    if workers is not None:
        checks["workers"] = "ok" if workers or not current_app.config["REQUIRE_WORKERS"] else "none alive"
    if all(v == "ok" for v in checks.values()):
        return jsonify(ok=True, checks=checks, workers=workers)
    return error_response(503, "Not ready: a dependency is unavailable.", checks=checks, workers=workers)


def _sessions_by_status() -> dict[str, int] | None:
    """Sessions by status, or None while MongoDB is unavailable (the scrape goes on without them)."""
    try:
        return sessions_repo.count_by_status()
    except PyMongoError as exc:
        note_failure(exc)
        log.warning("metrics scrape without sessions by status: MongoDB unavailable (%s)", exc)
        return None


@bp.get("/metrics")
def metrics_view() -> Any:
    """Prometheus text format: request latency, cancel-to-stop latency, sessions by status, poll queries.

    With METRICS_TOKEN set, scrapers must send `Authorization: Bearer <token>`."""
    token = current_app.config.get("METRICS_TOKEN")
    if token and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
        raise NotSignedIn("A metrics token is required.")
    store = metrics.store_for(current_app.config)
    if redis_available(current_app.config["REDIS_URL"]):
        store.settle(0.5)  # what this process recorded just now is part of the scrape
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.RedisCollector(store, _sessions_by_status))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
