"""The managed-agents API: JSON only, scoped to the caller's own teams, on the same services."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from flask import Blueprint, jsonify, request
from marshmallow import fields, validate

from ..access import (
    Account,
    Permission,
    app_for,
    check_team,
    current_account,
    declares_permission,
    parse_id,
    session_for,
)
from ..errors import NotFound, PermissionDenied
from ..repositories import sessions as sessions_repo
from ..repositories.sessions import Visible
from ..schemas import (
    ListEventsArgs,
    ListSessionsArgs,
    ManagedBulkCancelSchema,
    ManagedCancelSchema,
    ObjectIdField,
    SendMessageSchema,
    Strict,
    event_out,
    operation_out,
)
from ..services import accounts as accounts_service
from ..services import bulk, idempotency
from ..services import sessions as service
from ..vocabulary import CancelSource, OnBusy
from .parsing import load_args, load_body
from .ratelimits import bulk_cancel_limit, cancel_limit
from .sessions import bulk_cancel_answer, cancel_fields, dump_session, with_queue_position
from .streams import stream_response

bp = Blueprint("managed_agents", __name__, url_prefix="/api/managed-agents")


@bp.before_request
def _signed_in() -> None:
    """Every route here needs a caller: 401 comes before any input is looked at."""
    current_account()


class ManagedCreateSchema(Strict):
    appId = ObjectIdField(required=True)
    teamId = ObjectIdField(load_default=None)
    name = fields.String(load_default=None, validate=validate.Length(max=200))
    message = fields.String(load_default=None, validate=validate.Length(max=100_000))


class ManagedListArgs(ListSessionsArgs):
    teamId = ObjectIdField(load_default=None)


def _denied_or_missing(account: Account, session_id: ObjectId) -> Exception:
    """Why an action on a session in the caller's teams found nothing it may act on: 403 when the session is in
    one of their teams under a role without the permission, 404 otherwise."""
    if sessions_repo.find_session_in_teams(Visible(account.team_ids, account.object_id), session_id) is not None:
        return PermissionDenied("Your role does not allow this on that session's team.")
    return NotFound("No session with this id in your teams.")


@bp.post("/cancel")
@cancel_limit
@declares_permission(Permission.SESSION_CANCEL)
def cancel() -> Any:
    """Cancel a session: `{ok: true}`, or `{ok: true, alreadyCancelled: true}` on a repeat."""
    data = load_body(ManagedCancelSchema())
    account = current_account()
    allowed = account.teams_with(Permission.SESSION_CANCEL)
    try:
        outcome = service.cancel_session(
            Visible(allowed, account.object_id),
            data["sessionId"],
            account.actor,
            CancelSource.MANAGED_API,
            data["reason"],
        )
    except NotFound:
        raise _denied_or_missing(account, data["sessionId"]) from None
    fields_out = cancel_fields(outcome)
    fields_out.pop("alreadyEnded", None)  # this family answers a plain `ok` for ended sessions
    return jsonify(fields_out)


@bp.post("/sessions/bulk-cancel")
@bulk_cancel_limit
@declares_permission(Permission.SESSION_BULK_CANCEL)
def bulk_cancel() -> Any:
    """Cancel many live sessions of one of your teams (`teamId`) by ids or filter: 202 with an operation."""
    data = load_body(ManagedBulkCancelSchema())
    account = current_account()
    team_id = check_team(account, data.pop("teamId"), Permission.SESSION_BULK_CANCEL)
    body, status = bulk_cancel_answer(team_id, account, data)
    return jsonify(body), status


@bp.get("/operations/<operationId>")
@declares_permission(Permission.SESSION_VIEW)
def get_operation(operationId: str) -> Any:
    """A bulk operation of one of your teams."""
    account = current_account()
    teams = account.teams_with(Permission.SESSION_VIEW)
    operation = bulk.get_operation(teams, parse_id(operationId, "operation"))
    return jsonify(operation=operation_out.dump(operation))


@bp.post("/sessions")
@declares_permission(Permission.SESSION_CREATE)
def create_session() -> Any:
    """Start a session from an app in one of the caller's teams; honours `Idempotency-Key`."""
    data = load_body(ManagedCreateSchema())
    account = current_account()
    if data["teamId"] is not None and data["teamId"] not in account.team_ids:
        raise PermissionDenied("You are not a member of this team.")
    app = app_for(account, data["appId"], Permission.SESSION_CREATE, team_id=data["teamId"])

    session_id = ObjectId()  # chosen first, so an Idempotency-Key record names its session from the start

    def create() -> tuple[dict[str, Any], ObjectId]:
        team = accounts_service.get_team(app["teamId"])
        session = service.create_session(team, account.actor, app, data["name"], data["message"], session_id=session_id)
        return {"session": dump_session(session)}, session["_id"]

    def recover(created: ObjectId) -> dict[str, Any] | None:
        found = service.find_created_session(app["teamId"], created)
        return {"session": dump_session(found)} if found else None

    request_hash = idempotency.fingerprint({"family": "managed", **data})
    key = request.headers.get("Idempotency-Key")
    result = idempotency.run_once(account.object_id, key, request_hash, create, session_id=session_id, recover=recover)
    return jsonify(result), 201


@bp.get("/sessions")
@declares_permission(Permission.SESSION_VIEW)
def list_sessions() -> Any:
    """Sessions in the caller's teams (or one of them), newest first, keyset-paginated."""
    args = load_args(ManagedListArgs())
    account = current_account()
    team_ids = account.teams_with(Permission.SESSION_VIEW)
    if args["teamId"] is not None:
        if args["teamId"] not in team_ids:
            raise PermissionDenied("You are not a member of this team.")
        team_ids = [args["teamId"]]
    if not team_ids:
        return jsonify(sessions=[], nextBefore=None)
    page, next_before = service.list_sessions_page(
        team_ids, args["before"], args["limit"], args["status"], account.object_id
    )
    return jsonify(sessions=[dump_session(s) for s in page], nextBefore=next_before)


@bp.get("/sessions/<managed_session:sessionId>")
@declares_permission(Permission.SESSION_VIEW)
def get_session(sessionId: str) -> Any:
    """One session in the caller's teams."""
    session = session_for(current_account(), sessionId, Permission.SESSION_VIEW)
    return jsonify(session=with_queue_position(dump_session(session)))


@bp.get("/sessions/<sessionId>/events")
@declares_permission(Permission.SESSION_VIEW)
def session_events(sessionId: str) -> Any:
    """The transcript, oldest first; `?after=<seq>` for what is new."""
    session = session_for(current_account(), sessionId, Permission.SESSION_VIEW)
    args = load_args(ListEventsArgs())
    events, _ = service.events_after(session, args["after"], args["limit"])
    return jsonify(events=event_out.dump(events, many=True), lastSeq=events[-1]["seq"] if events else args["after"])


@bp.post("/sessions/<sessionId>/messages")
@declares_permission(Permission.SESSION_CREATE)
def send_message(sessionId: str) -> Any:
    """The next message of a session: `{message, onBusy?}` (reject, enqueue or interrupt a turn in flight)."""
    account = current_account()
    session = session_for(account, sessionId, Permission.SESSION_CREATE)
    data = load_body(SendMessageSchema())
    after = service.send_message(
        session["teamId"], session["_id"], account.actor, data["message"], OnBusy(data["onBusy"])
    )
    return jsonify(session=dump_session(after)), 202


@bp.get("/sessions/<sessionId>/stream")
@declares_permission(Permission.SESSION_VIEW)
def session_stream(sessionId: str) -> Any:
    """The session's events as a live SSE stream, from `Last-Event-ID` (or `?after=`) to its end."""
    return stream_response(session_for(current_account(), sessionId, Permission.SESSION_VIEW))


@bp.delete("/sessions/<managed_session:sessionId>")
@declares_permission(Permission.SESSION_DELETE)
def delete_session(sessionId: str) -> Any:
    """Remove an ended session and its transcript; 409 while it is active."""
    account = current_account()
    sid = parse_id(sessionId, "session")
    try:
        service.delete_session(Visible(account.teams_with(Permission.SESSION_DELETE), account.object_id), sid)
    except NotFound:
        raise _denied_or_missing(account, sid) from None
    return jsonify(ok=True)
