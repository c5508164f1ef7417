"""Webhook endpoints a team registered, and the deliveries made to them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError

from ..db import get_db
from ..timeutil import utcnow
from .sessions import EPOCH


def insert_endpoint(doc: dict[str, Any]) -> dict[str, Any]:
    """Store a new endpoint."""
    doc["_id"] = get_db().webhook_endpoints.insert_one(doc).inserted_id
    return doc


def list_endpoints(team_id: ObjectId) -> list[dict[str, Any]]:
    """The team's endpoints, newest first, without their secrets."""
    cursor = get_db().webhook_endpoints.find({"teamId": team_id}, {"secret": 0}).sort("_id", -1).limit(100)
    return list(cursor)


def endpoints_with_secrets(team_id: ObjectId) -> list[dict[str, Any]]:
    """The team's enabled endpoints, secrets included (for signing only)."""
    return list(get_db().webhook_endpoints.find({"teamId": team_id, "disabled": {"$ne": True}}).limit(100))


def teams_with_endpoints() -> list[ObjectId]:
    """Every team that has at least one enabled endpoint."""
    return [team for team in get_db().webhook_endpoints.distinct("teamId", {"disabled": {"$ne": True}}) if team]


def find_endpoint(team_id: ObjectId, endpoint_id: ObjectId, *, with_secret: bool = False) -> dict[str, Any] | None:
    """The team's endpoint."""
    projection = None if with_secret else {"secret": 0}
    return get_db().webhook_endpoints.find_one({"_id": endpoint_id, "teamId": team_id}, projection)


def update_endpoint(team_id: ObjectId, endpoint_id: ObjectId, changes: dict[str, Any]) -> dict[str, Any] | None:
    """Apply `changes` to the team's endpoint; the endpoint after (without its secret)."""
    return get_db().webhook_endpoints.find_one_and_update(
        {"_id": endpoint_id, "teamId": team_id},
        {"$set": {**changes, "updatedAt": utcnow()}},
        projection={"secret": 0},
        return_document=ReturnDocument.AFTER,
    )


def delete_endpoint(team_id: ObjectId, endpoint_id: ObjectId) -> bool:
    """Remove the team's endpoint and its delivery records."""
    db = get_db()
    if db.webhook_endpoints.delete_one({"_id": endpoint_id, "teamId": team_id}).deleted_count != 1:
        return False
    db.webhook_deliveries.delete_many({"endpointId": endpoint_id, "teamId": team_id})
    return True


DUPLICATE_KEY = 11000
DELIVERIES_PER_WRITE = 500  # thin payloads: a write stays far below MongoDB's 16 MB


def insert_deliveries(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Store deliveries once per (endpoint, event), in one write per DELIVERIES_PER_WRITE: those stored, in order
    (an event that already has its delivery is left out)."""
    stored: list[dict[str, Any]] = []
    for start in range(0, len(docs), DELIVERIES_PER_WRITE):
        chunk = docs[start : start + DELIVERIES_PER_WRITE]
        refused: set[int] = set()
        try:
            get_db().webhook_deliveries.insert_many(chunk, ordered=False)  # sets each document's `_id`
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != DUPLICATE_KEY for error in errors) or exc.details.get("writeConcernErrors"):
                raise
            refused = {error["index"] for error in errors}
        stored += [doc for index, doc in enumerate(chunk) if index not in refused]
    return stored


def find_delivery(delivery_id: ObjectId) -> dict[str, Any] | None:
    """A delivery by id (the delivery job's own lookup; the team is in the document)."""
    return get_db().webhook_deliveries.find_one({"_id": delivery_id})


def find_team_delivery(team_id: ObjectId, endpoint_id: ObjectId, delivery_id: ObjectId) -> dict[str, Any] | None:
    """A delivery of the team's endpoint."""
    return get_db().webhook_deliveries.find_one({"_id": delivery_id, "endpointId": endpoint_id, "teamId": team_id})


def list_deliveries(team_id: ObjectId, endpoint_id: ObjectId, limit: int = 100) -> list[dict[str, Any]]:
    """The endpoint's latest deliveries, newest first."""
    cursor = get_db().webhook_deliveries.find({"endpointId": endpoint_id, "teamId": team_id}).sort("_id", -1)
    return list(cursor.limit(limit))


def record_attempt(delivery_id: ObjectId, attempt: dict[str, Any], changes: dict[str, Any]) -> None:
    """Add an attempt to a delivery (keeping the latest 20) and apply `changes` (its status). (`start_attempt`
    counted it.)"""
    get_db().webhook_deliveries.update_one(
        {"_id": delivery_id}, {"$push": {"attempts": {"$each": [attempt], "$slice": -20}}, "$set": changes}
    )


def set_delivery(delivery_id: ObjectId, changes: dict[str, Any]) -> None:
    """Apply `changes` to a delivery."""
    get_db().webhook_deliveries.update_one({"_id": delivery_id}, {"$set": changes})


# A delivery's state: `pending` (recorded; its job could not be queued), `queued` (a job was queued), `sending` (a
# job is making the attempt), `retrying` (waiting out its back-off), then `delivered` or `failed`. In the first
# four `nextAttemptAt` says when the reaper takes it (again): at once for `pending`, when the back-off is over for
# `retrying`, and when the job's lease runs out for `queued` and `sending` (its job was lost with a Redis restart,
# or its worker died mid-attempt).
OPEN_STATES = ("pending", "queued", "sending", "retrying")


def due_deliveries(now: datetime, lease_until: datetime, limit: int = 1000) -> list[ObjectId]:
    """Open deliveries whose `nextAttemptAt` has come: each is marked queued (until `lease_until`) as it is taken,
    conditionally on the state it was found in, so two reapers do not both queue it."""
    db = get_db()
    taken = []
    query = {"status": {"$in": list(OPEN_STATES)}, "nextAttemptAt": {"$gt": EPOCH, "$lte": now}}
    for doc in db.webhook_deliveries.find(query, {"_id": 1, "status": 1, "nextAttemptAt": 1}).limit(limit):
        seen = {"_id": doc["_id"], "status": doc["status"], "nextAttemptAt": doc["nextAttemptAt"]}
        if db.webhook_deliveries.update_one(
            seen, {"$set": {"status": "queued", "nextAttemptAt": lease_until}}
        ).modified_count:
            taken.append(doc["_id"])
    return taken


def start_attempt(delivery_id: ObjectId, lease_until: datetime) -> dict[str, Any] | None:
    """Claim an open delivery for one attempt, counted now (an attempt whose job dies still counts) and leased
    until `lease_until`; None when it is not open (delivered, failed, or gone)."""
    return get_db().webhook_deliveries.find_one_and_update(
        {"_id": delivery_id, "status": {"$in": list(OPEN_STATES)}},
        {"$set": {"status": "sending", "nextAttemptAt": lease_until}, "$inc": {"attemptCount": 1}},
        return_document=ReturnDocument.AFTER,
    )


def watermark(name: str) -> ObjectId | None:
    """Where a sweep got to last time."""
    doc = get_db().sweeps.find_one({"_id": name})
    return doc.get("after") if doc else None


def set_watermark(name: str, after: ObjectId) -> None:
    """Remember where a sweep got to."""
    get_db().sweeps.update_one({"_id": name}, {"$set": {"after": after, "at": utcnow()}}, upsert=True)


def events_since(after: ObjectId, types: list[str], teams: list[ObjectId], limit: int) -> list[dict[str, Any]]:
    """Transcript events written after `after` (by `_id`), of these types, in these teams, oldest first."""
    query = {"_id": {"$gt": after}, "type": {"$in": types}, "teamId": {"$in": teams}}
    return list(get_db().session_events.find(query).sort("_id", 1).limit(limit))


def sessions_since(after: ObjectId, teams: list[ObjectId], limit: int) -> list[dict[str, Any]]:
    """Sessions created after `after`, in these teams, oldest first; not those whose create has not answered
    success (one that answered an error never started, as far as its creator knows)."""
    query = {"_id": {"$gt": after}, "teamId": {"$in": teams}, "unansweredSince": {"$exists": False}}
    return list(get_db().sessions.find(query, {"teamId": 1, "status": 1, "startDate": 1}).sort("_id", 1).limit(limit))


def prune_deliveries(older_than: datetime) -> int:
    """Forget deliveries older than `older_than`."""
    cutoff = ObjectId.from_datetime(older_than)
    return int(get_db().webhook_deliveries.delete_many({"_id": {"$lt": cutoff}}).deleted_count)


def stored_secrets() -> Iterator[tuple[ObjectId, ObjectId, str]]:
    """(team id, endpoint id, stored secret) of every endpoint in every team (operators' resealing)."""
    for doc in get_db().webhook_endpoints.find({"secret": {"$type": "string"}}, {"teamId": 1, "secret": 1}):
        yield doc["teamId"], doc["_id"], doc["secret"]


def replace_secret(team_id: ObjectId, endpoint_id: ObjectId, was: str, now: str) -> bool:
    """Store `now` in place of `was` (unless the secret was rotated meanwhile)."""
    query = {"_id": endpoint_id, "teamId": team_id, "secret": was}
    return get_db().webhook_endpoints.update_one(query, {"$set": {"secret": now}}).modified_count == 1
