"""Structured logs: JSON lines stamped with the request id (web) or the session, turn and job ids (workers)."""

from __future__ import annotations

import logging
from contextvars import ContextVar

from flask import g, has_request_context
from pythonjsonlogger.json import JsonFormatter

_job_context: ContextVar[dict[str, str] | None] = ContextVar("agentcloud_job_context", default=None)


def current_job_context() -> dict[str, str]:
    """`session_id`, `turn_id` and `job_id` of the turn running in this context, if any."""
    return dict(_job_context.get() or {})


def set_job_context(**ids: str) -> None:
    """Stamp later log lines in this context (a turn's thread) with these ids."""
    _job_context.set({k: v for k, v in ids.items() if v})


class ContextFilter(logging.Filter):
    """Adds the request id or the job's ids to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context():
            record.request_id = getattr(g, "request_id", None)
        for key, value in current_job_context().items():
            setattr(record, key, value)
        return True


class _ProductHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler this package installs on the root logger (recognised so it is installed once)."""


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """One handler on the root logger, JSON lines by default."""
    root = logging.getLogger()
    if any(isinstance(h, _ProductHandler) for h in root.handlers):
        return
    handler = _ProductHandler()
    if json_logs:
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", timestamp=True))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(ContextFilter())
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.StreamHandler)] + [handler]
    root.setLevel(level)
