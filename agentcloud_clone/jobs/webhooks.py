"""The webhook delivery job: one attempt (services.webhooks.deliver schedules the next when it fails)."""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from ..logs import set_job_context
from ..services import webhooks


def deliver_webhook(delivery_id: str, first: dict[str, Any] | None = None) -> dict[str, Any]:
    """Attempt one delivery (`first`: its first attempt, claimed when it was recorded); returns what the attempt
    got."""
    set_job_context(job_id=f"webhook-{delivery_id}")
    return webhooks.deliver(ObjectId(delivery_id), first)
