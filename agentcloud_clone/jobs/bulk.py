"""The bulk-cancel job: applies an operation recorded by services.bulk."""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from ..logs import set_job_context
from ..services import bulk


def run_bulk_cancel(team_id: str, operation_id: str) -> dict[str, Any]:
    """Cancel every session the operation matches; returns its counts."""
    set_job_context(job_id=f"bulk-{operation_id}")
    done = bulk.apply_bulk_cancel(ObjectId(team_id), ObjectId(operation_id))
    return {"processed": done.get("processed"), "cancelled": done.get("cancelled")}
