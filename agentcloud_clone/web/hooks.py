"""What every request and response gets: a request id, its latency in the shared histogram, security headers."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from flask import Flask, Response, current_app, g, request

from .. import metrics
from ..jobs.reaper import ensure_web_reaper

log = logging.getLogger(__name__)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
)


def init_app(app: Flask) -> None:
    """Register the hooks. Call before the limiter is bound: Flask runs after-request hooks in reverse, and
    the security-header hook must see the headers the limiter adds."""

    @app.before_request
    def _start() -> None:
        ensure_web_reaper(app)
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
        g.request_started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = getattr(g, "request_id", "")
        started = getattr(g, "request_started", None)
        if started is not None and request.endpoint not in ("probes.metrics_view", "static"):
            labels = {
                "method": request.method,
                "endpoint": request.url_rule.rule if request.url_rule else "unmatched",
                "status": str(response.status_code),
            }
            metrics.store_for(current_app.config).observe(
                "http_request_duration_seconds", time.perf_counter() - started, **labels
            )
        return response

    @app.after_request
    def _security_headers(response: Any) -> Any:
        if response.status_code != 429:
            # flask-limiter adds Retry-After to every response; it only means something on a 429.
            response.headers.pop("Retry-After", None)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response
