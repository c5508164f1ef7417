"""Agentcloud's session API under `/<resourceSlug>/...` (resourceSlug is the team id)."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from flask import Blueprint, jsonify, request

from .. import queueing
from ..access import Permission, app_for, current_account, parse_id, require_team, session_for
from ..errors import InvalidInput
from ..repositories.sessions import Visible
from ..schemas import (
    BulkCancelSchema,
    CancelSchema,
    ListSessionsArgs,
    MessagesArgs,
    SendMessageSchema,
    SessionCreateSchema,
    SessionEditSchema,
    SessionStartSchema,
    event_out,
    operation_out,
    session_out,
)
from ..services import accounts as accounts_service
from ..services import bulk, idempotency
from ..services import sessions as service
from ..vocabulary import CancelSource, OnBusy
from .identity import api_key_in_use
from .parsing import csrf_field, load_args, load_body
from .ratelimits import bulk_cancel_limit, cancel_limit
from .responses import redirect_or_json, safe_next
from .routing import delete_with_form_twin

bp = Blueprint("sessions", __name__)
SID = "<sessionId>"


def dump_session(session: dict[str, Any]) -> dict[str, Any]:
    """A session as both API families show it, with its derived states."""
    shown: dict[str, Any] = session_out.dump(service.state_of(session))
    return shown


def cancel_fields(outcome: service.CancelOutcome) -> dict[str, Any]:
    """The cancel response's own fields: `ok`, and `alreadyCancelled` / `alreadyEnded` when they apply."""
    fields: dict[str, Any] = {"ok": True}
    if outcome.already_cancelled:
        fields["alreadyCancelled"] = True
    elif outcome.already_ended:
        fields["alreadyEnded"] = True
    return fields


def cancel_source(default: CancelSource) -> CancelSource:
    """Where a cancel came from: the web UI's forms and scripts, or a program with an API key."""
    return CancelSource.API if api_key_in_use() else default


def check_echoed_ids(data: dict[str, Any], team_id: ObjectId, session_id: ObjectId | None = None) -> None:
    """Agentcloud's UI repeats the path's ids in the body; when it does, they must name what the path names."""
    if data.pop("resourceSlug", None) not in (None, team_id):
        raise InvalidInput("The body names a different team than the path.")
    if session_id is not None and data.pop("sessionId", None) not in (None, session_id):
        raise InvalidInput("The body names a different session than the path.")
    data.pop("_csrf", None)


@bp.post("/<resourceSlug>/forms/session/add")
@require_team(Permission.SESSION_CREATE)
def add_session(team_id: ObjectId) -> Any:
    """Start a session from an app (`appId`, or Agentcloud's `id`), with an optional first message; `skipRun`
    creates it without running a turn (`start` runs it)."""
    data = load_body(SessionCreateSchema())
    check_echoed_ids(data, team_id)
    account = current_account()
    app = app_for(account, data["appId"], Permission.SESSION_CREATE, team_id=team_id)
    session_id = ObjectId()  # chosen first, so an Idempotency-Key record names its session from the start

    def create() -> tuple[dict[str, Any], ObjectId]:
        team = accounts_service.get_team(team_id)
        session = service.create_session(
            team,
            account.actor,
            app,
            data["name"],
            data["message"],
            skip_run=data["skipRun"],
            variables=data["variables"],
            session_id=session_id,
        )
        return {"_id": str(session["_id"])}, session["_id"]

    def recover(created: ObjectId) -> dict[str, Any] | None:
        return {"_id": str(created)} if service.find_created_session(team_id, created) else None

    request_hash = idempotency.fingerprint({"teamId": team_id, **data})
    key = request.headers.get("Idempotency-Key")
    result = idempotency.run_once(account.object_id, key, request_hash, create, session_id=session_id, recover=recover)
    return redirect_or_json(f"/{team_id}/session/{result['_id']}", flash_message="Session started.", **result)


@bp.get("/<resourceSlug>/sessions.json")
@require_team(Permission.SESSION_VIEW)
def list_sessions(team_id: ObjectId) -> Any:
    """The team's sessions, newest first, one page at a time."""
    args = load_args(ListSessionsArgs())
    viewer = current_account().object_id
    page, next_before = service.list_sessions_page([team_id], args["before"], args["limit"], args["status"], viewer)
    return jsonify(sessions=[dump_session(s) for s in page], nextBefore=next_before, **csrf_field())


@bp.get(f"/<resourceSlug>/session/{SID}.json")
@require_team(Permission.SESSION_VIEW)
def session_json(team_id: ObjectId, sessionId: str) -> Any:
    """One session (with its place in the queue while its turn waits for a worker)."""
    session = session_for(current_account(), sessionId, Permission.SESSION_VIEW, team_id=team_id)
    return jsonify(session=with_queue_position(dump_session(session)), **csrf_field())


def with_queue_position(shown: dict[str, Any]) -> dict[str, Any]:
    """A shown session, plus `queuePosition` ({state, position}) while its turn is queued."""
    if shown.get("queued") and shown.get("activeTurnId"):
        shown["queuePosition"] = queueing.queue_position(shown["activeTurnId"]) or None
    return shown


@bp.get(f"/<resourceSlug>/session/{SID}/messages.json")
@require_team(Permission.SESSION_VIEW)
def session_messages(team_id: ObjectId, sessionId: str) -> Any:
    """The transcript, oldest first; `?after=<seq>` (or Agentcloud's `?messageId=<event id>`) returns only what
    came after."""
    session = session_for(current_account(), sessionId, Permission.SESSION_VIEW, team_id=team_id)
    return jsonify(messages_page(session, event_out))


def messages_page(session: dict[str, Any], shown: Any) -> dict[str, Any]:
    """A page of the session's transcript after the query's cursor, with the session's state (both families of
    session routes, team and shared)."""
    args = load_args(MessagesArgs())
    events, after = service.events_after(session, args["after"], args["limit"], after_event=args["messageId"])
    last_seq = events[-1]["seq"] if events else after
    state = service.state_of(session)
    return dict(
        messages=shown.dump(events, many=True),
        lastSeq=last_seq,
        status=session["status"],
        endReason=session.get("endReason"),
        cancelling=state["cancelling"],
        final=service.transcript_is_final(session, last_seq),
    )


@bp.post(f"/<resourceSlug>/session/{SID}/send-message")
@require_team(Permission.SESSION_CREATE)
def send_message(team_id: ObjectId, sessionId: str) -> Any:
    """Record the user's next message and start the turn that answers it."""
    sid = parse_id(sessionId, "session")
    data = load_body(SendMessageSchema())
    account = current_account()
    session = service.send_message(
        team_id, sid, account.actor, data["message"], OnBusy(data["onBusy"]), viewer=account.object_id
    )
    shown = dump_session(session)
    return redirect_or_json(
        f"/{team_id}/session/{sid}",
        _id=str(sid),
        ok=True,
        queued=shown["queued"],
        queuedMessages=shown["queuedMessages"],
    )


@bp.post(f"/<resourceSlug>/forms/session/{SID}/cancel")
@cancel_limit
@require_team(Permission.SESSION_CANCEL)
def cancel_session(team_id: ObjectId, sessionId: str) -> Any:
    """Stamp `cancelledAt` once; repeats report `alreadyCancelled` and never move the stamp."""
    sid = parse_id(sessionId, "session")
    data = load_body(CancelSchema())
    # Agentcloud's UI repeats the ids in the body; they must name what the path names.
    if data["sessionId"] not in (None, sid) or data["resourceSlug"] not in (None, team_id):
        raise InvalidInput("The body names a different session or team than the path.")
    account = current_account()
    outcome = service.cancel_session(
        Visible(team_id, account.object_id), sid, account.actor, cancel_source(CancelSource.UI), data["reason"]
    )
    shown = dump_session(outcome.session)
    fields = {**cancel_fields(outcome), "_id": str(sid), "status": shown["status"]}
    fields.update(cancelledAt=shown.get("cancelledAt"), endReason=shown.get("endReason"))
    if outcome.already_cancelled:
        message = "This session was already cancelled."
    elif outcome.already_ended:
        message = "This session had already ended."
    else:
        message = "Session cancelled." if service.is_ended(outcome.session) else "Cancelling the session…"
    # A browser form may name where to go next (the session page, say); only paths on this site count.
    back = safe_next(None if request.is_json else data["next"], f"/{team_id}/sessions")
    return redirect_or_json(back, flash_message=message, **fields)


def bulk_cancel_answer(team_id: ObjectId, account: Any, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Count (dry run) or start a bulk cancel; the answer's body and status (200 or 202), for both families. A dry
    run stores nothing under its Idempotency-Key, which is checked all the same."""
    key = request.headers.get("Idempotency-Key")
    idempotency.check_key(key)
    if data["dryRun"]:
        return {"dryRun": True, "count": bulk.count(team_id, data["criteria"])}, 200

    def start() -> tuple[dict[str, Any], None]:
        operation = bulk.start_bulk_cancel(team_id, account.actor, data["criteria"], data["reason"])
        return {"operation": operation_out.dump(operation), "operationId": str(operation["_id"])}, None

    request_hash = idempotency.fingerprint({"bulk": str(team_id), **data})
    result = idempotency.run_once(account.object_id, key, request_hash, start)
    return result, 202


@bp.post("/<resourceSlug>/forms/session/bulk-cancel")
@bulk_cancel_limit
@require_team(Permission.SESSION_BULK_CANCEL)
def bulk_cancel(team_id: ObjectId) -> Any:
    """Cancel many of the team's live sessions by ids or filter (admins): 202 with an operation to follow."""
    body, status = bulk_cancel_answer(team_id, current_account(), load_body(BulkCancelSchema()))
    return jsonify(body), status


@bp.get("/<resourceSlug>/operation/<operationId>.json")
@require_team(Permission.SESSION_VIEW)
def operation_json(team_id: ObjectId, operationId: str) -> Any:
    """A bulk operation's progress: queued, running, then done with its counts."""
    operation = bulk.get_operation(team_id, parse_id(operationId, "operation"))
    return jsonify(operation=operation_out.dump(operation))


@delete_with_form_twin(
    bp,
    "/<resourceSlug>/forms/session/<session_item:sessionId>",
    f"/<resourceSlug>/forms/session/{SID}/delete",
    Permission.SESSION_DELETE,
    endpoint="delete_session",
    summary="Remove an ended session and its transcript.",
)
def _delete(team_id: ObjectId, sessionId: str) -> Any:
    sid = parse_id(sessionId, "session")
    service.delete_session(Visible(team_id, current_account().object_id), sid)
    return redirect_or_json(f"/{team_id}/sessions", flash_message="Session deleted.", _id=str(sid), ok=True)


@bp.post(f"/<resourceSlug>/forms/session/{SID}/edit")
@require_team(Permission.SESSION_CREATE)
def edit_session(team_id: ObjectId, sessionId: str) -> Any:
    """Set the session's `variables` (Agentcloud's edit), replacing them; the next turn's runner sees them."""
    session = session_for(current_account(), sessionId, Permission.SESSION_CREATE, team_id=team_id)
    data = load_body(SessionEditSchema())
    check_echoed_ids(data, team_id, session["_id"])
    updated = service.set_variables(team_id, session["_id"], data["variables"])
    return edited(f"/{team_id}/session/{session['_id']}", dump_session(updated))


def edited(path: str, shown: dict[str, Any]) -> Any:
    """Agentcloud's edit answer, `{message, session}`, with ours (`_id`, `redirect`)."""
    message = "Session updated successfully"
    return redirect_or_json(path, flash_message=message, message=message, session=shown, _id=shown["_id"])


@bp.post(f"/<resourceSlug>/forms/session/{SID}/start")
@require_team(Permission.SESSION_CREATE)
def start_session(team_id: ObjectId, sessionId: str) -> Any:
    """Run a turn for a session with none in flight (created with `skipRun`, or once its variables are set)."""
    session = session_for(current_account(), sessionId, Permission.SESSION_CREATE, team_id=team_id)
    check_echoed_ids(load_body(SessionStartSchema()), team_id, session["_id"])
    after = service.start_session(team_id, session["_id"])
    return started(f"/{team_id}/session/{session['_id']}", dump_session(after))


def started(path: str, shown: dict[str, Any]) -> Any:
    """Agentcloud's start answer, `{message}`, with ours (`_id`, `redirect`, `queued`)."""
    message = "Session started successfully"
    return redirect_or_json(path, flash_message=message, message=message, _id=shown["_id"], queued=shown["queued"])
