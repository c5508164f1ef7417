"""The ids a worker's log lines carry while a turn runs."""

from __future__ import annotations

from contextvars import ContextVar

_job_context: ContextVar[dict[str, str] | None] = ContextVar("agentcloud_job_context", default=None)


def current_job_context() -> dict[str, str]:
    """`session_id`, `turn_id` and `job_id` of the turn running in this context, if any."""
    return dict(_job_context.get() or {})


def set_job_context(**ids: str) -> None:
    """Stamp later log lines in this context with these ids."""
    _job_context.set({k: v for k, v in ids.items() if v})
