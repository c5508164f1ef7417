"""Sessions: start, send a message, cancel, delete. Every rule about a session's life lives here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
from redis import RedisError

from .. import queueing
from ..repositories import sessions as repo
from ..responses import ApiError
from ..timeutil import utcnow
from .apps import get_app

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CancelOutcome:
    """What a cancel request found and did."""

    session: dict[str, Any]
    already_cancelled: bool = False
    already_ended: bool = False


def get_session(team_id: ObjectId, session_id: ObjectId) -> dict[str, Any]:
    """The team's session; 404 when it is not in the team (wherever else it may be)."""
    session = repo.find_session(team_id, session_id)
    if session is None:
        raise ApiError(404, "No such session in this team.")
    return session


def list_sessions_page(
    team_ids: list[ObjectId], before: ObjectId | None, limit: int, status: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of sessions, newest first, and the `before` cursor of the next page (None on the last)."""
    page = repo.list_sessions(team_ids, before=before, limit=limit + 1, status=status)
    next_before = str(page[limit - 1]["_id"]) if len(page) > limit else None
    return page[:limit], next_before


def _start_turn(session: dict[str, Any], text: str, account_id: ObjectId | None) -> None:
    """Record the user's message and queue the turn that answers it."""
    team_id, session_id, turn_id = session["teamId"], session["_id"], str(session["activeTurnId"])
    repo.append_event(team_id, session_id, "message", role="user", text=text, turnId=turn_id, by=account_id)
    try:
        queueing.enqueue_turn(str(team_id), str(session_id), turn_id)
    except RedisError:
        # Nothing will run the turn: give the slot back so the user can retry, and say why.
        repo.update_live_session(
            team_id, session_id, {"activeTurnId": session["activeTurnId"]}, {"$set": {"activeTurnId": None}}
        )
        repo.append_event(team_id, session_id, "error", message="The turn could not be queued; try again.")
        raise ApiError(503, "The job queue is unavailable; try again shortly.") from None


def create_session(
    team: dict[str, Any], account_id: ObjectId | None, app_id: ObjectId, name: str | None, message: str | None
) -> dict[str, Any]:
    """A new `started` session from the team's app; with a first message, its first turn is queued."""
    app = get_app(team["_id"], app_id)
    now = utcnow()
    doc: dict[str, Any] = {
        "orgId": team["orgId"],
        "teamId": team["_id"],
        "appId": app["_id"],
        "name": name or app["name"],
        "status": "started",
        "startDate": now,
        "lastUpdatedDate": now,
        "tokensUsed": 0,
        "previewLabel": (message or "")[:80] or None,
        "sharingConfig": {"mode": "team"},
        "createdBy": account_id,
        "eventSeq": 0,
        "activeTurnId": ObjectId() if message else None,
    }
    session = repo.insert_session(doc)
    if message:
        _start_turn(session, message, account_id)
    return session


def send_message(team_id: ObjectId, session_id: ObjectId, account_id: ObjectId | None, text: str) -> dict[str, Any]:
    """Record a message and queue the next turn; 409 when the session has ended or a turn is in flight."""
    turn_id = ObjectId()
    session = repo.update_live_session(
        team_id,
        session_id,
        {"activeTurnId": None, **repo.NOT_CANCELLED},
        {"$set": {"activeTurnId": turn_id, "lastUpdatedDate": utcnow()}},
    )
    if session is None:
        current = get_session(team_id, session_id)
        if current["status"] in repo.ENDED_STATUSES or current.get("cancelledAt"):
            raise ApiError(409, "This session has ended; start a new one.")
        raise ApiError(409, "A turn is already in flight; wait for it or cancel it.")
    _start_turn(session, text, account_id)
    return session


def cancel_session(team_id: ObjectId, session_id: ObjectId, account_id: ObjectId | None) -> CancelOutcome:
    """Stamp `cancelledAt` once. With no turn in flight the session ends now; otherwise its worker ends it."""
    now = utcnow()
    stamped = repo.stamp_cancel(team_id, session_id, account_id, now)
    if stamped is None:
        current = get_session(team_id, session_id)
        if current.get("cancelledAt"):
            return CancelOutcome(current, already_cancelled=True)
        return CancelOutcome(current, already_ended=True)
    repo.append_event(team_id, session_id, "cancel", by=account_id, at=now)
    if stamped.get("activeTurnId") is None:
        # Nothing is running, so nobody else will end it. A turn cannot start now: starts require no stamp.
        ended = repo.end_session(team_id, session_id, "terminated", extra_filter={"activeTurnId": None})
        if ended is not None:
            repo.append_event(team_id, session_id, "status", status="terminated", message="Cancelled.")
            return CancelOutcome(ended)
    queueing.publish_cancel(str(session_id))
    return CancelOutcome(repo.find_session(team_id, session_id) or stamped)


def transcript_is_final(session: dict[str, Any]) -> bool:
    """True once the session has ended and its closing event is written, so readers can stop polling.

    The status flips first and the closing event follows a moment later; a reader that stops at the
    status alone could miss that event."""
    if session["status"] not in repo.ENDED_STATUSES:
        return False
    last = repo.last_event(session["_id"])
    return last is not None and last["type"] in ("status", "error", "turn_end")


def delete_session(team_id: ObjectId, session_id: ObjectId) -> None:
    """Remove an ended session and its whole transcript; 409 while it is live, 404 when not in the team."""
    if repo.delete_ended_session(team_id, session_id):
        return
    get_session(team_id, session_id)
    raise ApiError(409, "This session is still active; cancel it first, then delete it.")
