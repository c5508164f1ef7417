"""Operations: liveness, readiness, metrics, request ids and structured JSON logs."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, has_request_context, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pythonjsonlogger.json import JsonFormatter

from . import metrics
from .db import get_db
from .queueing import get_redis
from .responses import ApiError

bp = Blueprint("ops", __name__)
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
        log.warning("readiness: MongoDB unavailable: %s", exc)
        checks["mongo"] = "unavailable"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        log.warning("readiness: Redis unavailable: %s", exc)
        checks["redis"] = "unavailable"
    if all(v == "ok" for v in checks.values()):
        return jsonify(ok=True, checks=checks)
    return jsonify(message="Not ready: a dependency is unavailable.", code=503, checks=checks), 503


@bp.get("/metrics")
def metrics_view() -> Any:
    """Prometheus text format: request latency, cancel-to-stop latency, sessions by status, poll queries.

    With METRICS_TOKEN set, scrapers must send `Authorization: Bearer <token>`."""
    token = current_app.config.get("METRICS_TOKEN")
    if token and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
        raise ApiError(401, "A metrics token is required.")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.RedisCollector(metrics.store_for(current_app.config), get_db()))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


class ContextFilter(logging.Filter):
    """Stamps each record with the request id (web) or the session and job ids (workers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context():
            record.request_id = getattr(g, "request_id", None)
        from .jobs.context import current_job_context

        for key, value in current_job_context().items():
            setattr(record, key, value)
        return True


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """One handler on the root logger, JSON lines by default."""
    root = logging.getLogger()
    if any(getattr(h, "agentcloud", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.agentcloud = True  # type: ignore[attr-defined]
    if json_logs:
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", timestamp=True))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(ContextFilter())
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.StreamHandler)] + [handler]
    root.setLevel(level)


def init_app(app: Flask) -> None:
    """Request ids on every request and response; request latency into the shared histogram."""

    @app.before_request
    def _start() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
        g.request_started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = getattr(g, "request_id", "")
        started = getattr(g, "request_started", None)
        if started is not None and request.endpoint not in ("ops.metrics", "static"):
            labels = {
                "method": request.method,
                "endpoint": request.url_rule.rule if request.url_rule else "unmatched",
                "status": str(response.status_code),
            }
            try:
                store = metrics.store_for(current_app.config)
                store.observe("http_request_duration_seconds", time.perf_counter() - started, **labels)
            except Exception:
                log.debug("request metric dropped")
        return response
