"""Long-running operations a user started (bulk cancels), with their progress."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument

from ..db import get_db
from ..timeutil import utcnow


def insert_operation(doc: dict[str, Any]) -> dict[str, Any]:
    """Store a new operation."""
    doc["_id"] = get_db().operations.insert_one(doc).inserted_id
    return doc


def find_operation(scope: Any, operation_id: ObjectId) -> dict[str, Any] | None:
    """The operation, only if it belongs to the team (or one of the teams)."""
    team = {"$in": scope} if isinstance(scope, list) else scope
    return get_db().operations.find_one({"_id": operation_id, "teamId": team})


def delete_operation(team_id: ObjectId, operation_id: ObjectId) -> None:
    """Remove an operation that never started (its job could not be queued)."""
    get_db().operations.delete_one({"_id": operation_id, "teamId": team_id})


def update_operation(team_id: ObjectId, operation_id: ObjectId, update: dict[str, Any]) -> dict[str, Any] | None:
    """Apply `update` (with `lastUpdatedDate`) to the team's operation; the document after."""
    update.setdefault("$set", {})["lastUpdatedDate"] = utcnow()
    return get_db().operations.find_one_and_update(
        {"_id": operation_id, "teamId": team_id}, update, return_document=ReturnDocument.AFTER
    )
