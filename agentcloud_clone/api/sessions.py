"""Agentcloud's session API under `/<resourceSlug>/...` (resourceSlug is the team id)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from ..auth import current_account, require_team
from ..extensions import rate_limited
from ..permissions import Permission
from ..repositories import sessions as sessions_repo
from ..responses import redirect_or_json, safe_next
from ..schemas import ListEventsArgs, ListSessionsArgs, SendMessageSchema, SessionCreateSchema, event_out, session_out
from ..services import idempotency
from ..services import sessions as service
from .common import csrf_field, load_args, load_body, path_id

bp = Blueprint("sessions", __name__)
SID = "<sessionId>"

# One budget for every cancel route, both API families, per user.
cancel_limit = rate_limited("CANCEL_RATE_LIMIT", scope="cancel")


def cancel_fields(outcome: service.CancelOutcome) -> dict[str, Any]:
    """The cancel response's own fields: `ok`, and `alreadyCancelled` / `alreadyEnded` when they apply."""
    fields: dict[str, Any] = {"ok": True}
    if outcome.already_cancelled:
        fields["alreadyCancelled"] = True
    elif outcome.already_ended:
        fields["alreadyEnded"] = True
    return fields


@bp.post("/<resourceSlug>/forms/session/add")
@require_team(Permission.SESSION_CREATE)
def add_session(team: dict[str, Any]) -> Any:
    """Start a session from an app, with an optional first message."""
    data = load_body(SessionCreateSchema())
    account = current_account()

    def create() -> dict[str, Any]:
        session = service.create_session(team, account.object_id, data["appId"], data["name"], data["message"])
        return {"_id": str(session["_id"])}

    request_hash = idempotency.fingerprint({"teamId": team["_id"], **data})
    result = idempotency.run_once(account.object_id, request.headers.get("Idempotency-Key"), request_hash, create)
    return redirect_or_json(f"/{team['_id']}/session/{result['_id']}", flash_message="Session started.", **result)


@bp.get("/<resourceSlug>/sessions.json")
@require_team(Permission.SESSION_VIEW)
def list_sessions(team: dict[str, Any]) -> Any:
    """The team's sessions, newest first, one page at a time."""
    args = load_args(ListSessionsArgs())
    page, next_before = service.list_sessions_page([team["_id"]], args["before"], args["limit"], args["status"])
    return jsonify(sessions=session_out.dump(page, many=True), nextBefore=next_before, **csrf_field())


@bp.get(f"/<resourceSlug>/session/{SID}.json")
@require_team(Permission.SESSION_VIEW)
def session_json(team: dict[str, Any], sessionId: str) -> Any:
    """One session."""
    session = service.get_session(team["_id"], path_id(sessionId, "session"))
    return jsonify(session=session_out.dump(session), **csrf_field())


@bp.get(f"/<resourceSlug>/session/{SID}/messages.json")
@require_team(Permission.SESSION_VIEW)
def session_messages(team: dict[str, Any], sessionId: str) -> Any:
    """The transcript, oldest first; `?after=<seq>` returns only what is new."""
    session = service.get_session(team["_id"], path_id(sessionId, "session"))
    args = load_args(ListEventsArgs())
    events = sessions_repo.list_events(session["_id"], after=args["after"], limit=args["limit"])
    last_seq = events[-1]["seq"] if events else args["after"]
    return jsonify(
        messages=event_out.dump(events, many=True),
        lastSeq=last_seq,
        status=session["status"],
        cancelling=session_out.dump(session)["cancelling"],
        final=service.transcript_is_final(session),
    )


@bp.post(f"/<resourceSlug>/session/{SID}/send-message")
@require_team(Permission.SESSION_CREATE)
def send_message(team: dict[str, Any], sessionId: str) -> Any:
    """Record the user's next message and start the turn that answers it."""
    sid = path_id(sessionId, "session")
    data = load_body(SendMessageSchema())
    service.send_message(team["_id"], sid, current_account().object_id, data["message"])
    return redirect_or_json(f"/{team['_id']}/session/{sid}", _id=str(sid), ok=True)


@bp.post(f"/<resourceSlug>/forms/session/{SID}/cancel")
@cancel_limit
@require_team(Permission.SESSION_CANCEL)
def cancel_session(team: dict[str, Any], sessionId: str) -> Any:
    """Stamp `cancelledAt` once; repeats report `alreadyCancelled` and never move the stamp."""
    sid = path_id(sessionId, "session")
    outcome = service.cancel_session(team["_id"], sid, current_account().object_id)
    fields = {**cancel_fields(outcome), "_id": str(sid), "status": outcome.session["status"]}
    if outcome.already_cancelled:
        message = "This session was already cancelled."
    elif outcome.already_ended:
        message = "This session had already ended."
    else:
        message = "Session cancelled." if outcome.session["status"] == "terminated" else "Cancelling the session…"
    fields["cancelledAt"] = session_out.dump(outcome.session).get("cancelledAt")
    # A browser form may name where to go next (the session page, say); only paths on this site count.
    back = safe_next(request.form.get("next") if not request.is_json else None, f"/{team['_id']}/sessions")
    return redirect_or_json(back, flash_message=message, **fields)


def _delete(team: dict[str, Any], sessionId: str) -> Any:
    sid = path_id(sessionId, "session")
    service.delete_session(team["_id"], sid)
    return redirect_or_json(f"/{team['_id']}/sessions", flash_message="Session deleted.", _id=str(sid), ok=True)


@bp.delete(f"/<resourceSlug>/forms/session/{SID}")
@require_team(Permission.SESSION_DELETE)
def delete_session(team: dict[str, Any], sessionId: str) -> Any:
    """Remove an ended session and its transcript."""
    return _delete(team, sessionId)


@bp.post(f"/<resourceSlug>/forms/session/{SID}/delete")
@require_team(Permission.SESSION_DELETE)
def delete_session_form(team: dict[str, Any], sessionId: str) -> Any:
    """The HTML-form twin of the DELETE route."""
    return _delete(team, sessionId)
