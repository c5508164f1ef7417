"""Sessions and their transcript events (`session_events`, ordered by a per-session `seq`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument

from ..db import get_db
from ..timeutil import utcnow

# Agentcloud's statuses. A session in LIVE_STATUSES can still do work; the others are final.
LIVE_STATUSES = ("started", "running", "waiting", "warning")
ENDED_STATUSES = ("terminated", "error")
STATUSES = LIVE_STATUSES + ENDED_STATUSES

NOT_CANCELLED = {"cancelledAt": {"$exists": False}}
LIVE = {"status": {"$in": list(LIVE_STATUSES)}}


def insert_session(doc: dict[str, Any]) -> dict[str, Any]:
    """Store a new session document."""
    doc["_id"] = get_db().sessions.insert_one(doc).inserted_id
    return doc


def find_session(team_id: ObjectId, session_id: ObjectId) -> dict[str, Any] | None:
    """The session, only if it belongs to the team."""
    return get_db().sessions.find_one({"_id": session_id, "teamId": team_id})


def find_session_in_teams(team_ids: list[ObjectId], session_id: ObjectId) -> dict[str, Any] | None:
    """The session, only if it belongs to one of the teams."""
    return get_db().sessions.find_one({"_id": session_id, "teamId": {"$in": team_ids}})


def list_sessions(
    team_ids: list[ObjectId], *, before: ObjectId | None, limit: int, status: str | None = None
) -> list[dict[str, Any]]:
    """Newest first, keyset-paginated on `_id`; served by the `(teamId, [status,] _id)` indexes."""
    query: dict[str, Any] = {"teamId": team_ids[0] if len(team_ids) == 1 else {"$in": team_ids}}
    if status:
        query["status"] = status
    if before is not None:
        query["_id"] = {"$lt": before}
    return list(get_db().sessions.find(query).sort("_id", -1).limit(limit))


def update_live_session(
    team_id: ObjectId, session_id: ObjectId, extra_filter: dict[str, Any], update: dict[str, Any]
) -> dict[str, Any] | None:
    """Apply `update` only while the session is live and matches `extra_filter`; the document after, or None."""
    return get_db().sessions.find_one_and_update(
        {"_id": session_id, "teamId": team_id, **LIVE, **extra_filter},
        update,
        return_document=ReturnDocument.AFTER,
    )


def stamp_cancel(
    team_id: ObjectId, session_id: ObjectId, account_id: ObjectId | None, now: datetime
) -> dict[str, Any] | None:
    """The one cancel write: stamps `cancelledAt` only when absent and the session is live."""
    return update_live_session(
        team_id,
        session_id,
        NOT_CANCELLED,
        {"$set": {"cancelledAt": now, "cancelledBy": account_id, "lastUpdatedDate": now}},
    )


def end_session(
    team_id: ObjectId, session_id: ObjectId, status: str, *, extra_filter: dict[str, Any] | None = None, **fields: Any
) -> dict[str, Any] | None:
    """Move a live session to a final status (sticky: an ended session never changes again)."""
    now = utcnow()
    return update_live_session(
        team_id,
        session_id,
        extra_filter or {},
        {"$set": {"status": status, "endedAt": now, "lastUpdatedDate": now, "activeTurnId": None, **fields}},
    )


def delete_ended_session(team_id: ObjectId, session_id: ObjectId) -> bool:
    """Remove an ended session and then its events; False when no ended session matched."""
    db = get_db()
    result = db.sessions.delete_one({"_id": session_id, "teamId": team_id, "status": {"$in": list(ENDED_STATUSES)}})
    if result.deleted_count != 1:
        return False
    # The session is gone first, so no reader can reach a half-deleted transcript through the API.
    db.session_events.delete_many({"sessionId": session_id})
    return True


def count_live_sessions_for_app(team_id: ObjectId, app_id: ObjectId) -> int:
    """How many live sessions were started from the app."""
    return get_db().sessions.count_documents({"teamId": team_id, "appId": app_id, **LIVE})


def append_event(
    team_id: ObjectId, session_id: ObjectId, event_type: str, *, tokens: int = 0, **fields: Any
) -> dict[str, Any] | None:
    """Append a transcript event with the session's next `seq` (adding `tokens` to `tokensUsed`).

    None when the session no longer exists, which is how a worker learns it was deleted."""
    now = utcnow()
    db = get_db()
    session = db.sessions.find_one_and_update(
        {"_id": session_id, "teamId": team_id},
        {"$inc": {"eventSeq": 1, "tokensUsed": tokens}, "$set": {"lastUpdatedDate": now}},
        projection={"eventSeq": 1},
        return_document=ReturnDocument.AFTER,
    )
    if session is None:
        return None
    event = {
        "sessionId": session_id,
        "teamId": team_id,
        "seq": session["eventSeq"],
        "type": event_type,
        "createdAt": now,
        **fields,
    }
    if tokens:
        event["tokens"] = tokens
    event["_id"] = db.session_events.insert_one(event).inserted_id
    return event


def mark_event(session_id: ObjectId, event_id: ObjectId, **fields: Any) -> None:
    """Set fields on one transcript event of the session."""
    get_db().session_events.update_one({"_id": event_id, "sessionId": session_id}, {"$set": fields})


def last_event(session_id: ObjectId) -> dict[str, Any] | None:
    """The session's newest transcript event."""
    return get_db().session_events.find_one({"sessionId": session_id}, sort=[("seq", -1)])


def list_events(session_id: ObjectId, *, after: int, limit: int) -> list[dict[str, Any]]:
    """Transcript events with `seq > after`, oldest first; served by the `(sessionId, seq)` index."""
    cursor = get_db().session_events.find({"sessionId": session_id, "seq": {"$gt": after}}).sort("seq", 1)
    return list(cursor.limit(limit))
