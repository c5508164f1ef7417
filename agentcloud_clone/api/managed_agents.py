"""The managed-agents API: JSON only, scoped to the caller's own teams, on the same services."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from flask import Blueprint, jsonify, request
from marshmallow import fields, validate

from ..auth import current_account, declares_permission
from ..permissions import Permission, permissions_for
from ..repositories import accounts as accounts_repo
from ..repositories import apps as apps_repo
from ..repositories import sessions as sessions_repo
from ..responses import ApiError
from ..schemas import (
    ListEventsArgs,
    ListSessionsArgs,
    ManagedCancelSchema,
    ObjectIdField,
    Strict,
    event_out,
    session_out,
)
from ..services import idempotency
from ..services import sessions as service
from .common import load_args, load_body, path_id
from .sessions import cancel_fields, cancel_limit

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


def _teams_with(permission: Permission) -> list[ObjectId]:
    account = current_account()
    return [team_id for team_id, role in account.roles.items() if permissions_for(role) & permission]


def _session_in_my_teams(session_id: ObjectId, permission: Permission) -> dict[str, Any]:
    """The session if it is in one of the caller's teams (404 otherwise), and the caller may act on it (403)."""
    account = current_account()
    session = sessions_repo.find_session_in_teams(account.team_ids, session_id)
    if session is None:
        raise ApiError(404, "No session with this id in your teams.")
    if not permissions_for(account.role_in(session["teamId"]) or "") & permission:
        raise ApiError(403, f"Your role ({account.role_in(session['teamId'])}) does not allow this.")
    return session


@bp.post("/cancel")
@cancel_limit
@declares_permission(Permission.SESSION_CANCEL)
def cancel() -> Any:
    """Cancel a session: `{ok: true}`, or `{ok: true, alreadyCancelled: true}` on a repeat."""
    session_id = load_body(ManagedCancelSchema())["sessionId"]
    session = _session_in_my_teams(session_id, Permission.SESSION_CANCEL)
    outcome = service.cancel_session(session["teamId"], session_id, current_account().object_id)
    fields_out = cancel_fields(outcome)
    fields_out.pop("alreadyEnded", None)  # this family answers a plain `ok` for ended sessions
    return jsonify(fields_out)


@bp.post("/sessions")
@declares_permission(Permission.SESSION_CREATE)
def create_session() -> Any:
    """Start a session from an app in one of the caller's teams; honours `Idempotency-Key`."""
    data = load_body(ManagedCreateSchema())
    account = current_account()
    if data["teamId"] and data["teamId"] not in account.team_ids:
        raise ApiError(403, "You are not a member of this team.")
    allowed = _teams_with(Permission.SESSION_CREATE)
    candidates = [data["teamId"]] if data["teamId"] else account.team_ids
    app = next((a for t in candidates if (a := apps_repo.find_app(t, data["appId"]))), None)
    if app is None:
        raise ApiError(404, "No app with this id in your teams.")
    if app["teamId"] not in allowed:
        raise ApiError(403, "Your role does not allow starting sessions in this team.")
    team = accounts_repo.find_team(app["teamId"])
    assert team is not None

    def create() -> dict[str, Any]:
        session = service.create_session(team, account.object_id, app["_id"], data["name"], data["message"])
        return {"session": session_out.dump(session)}

    request_hash = idempotency.fingerprint({"family": "managed", **data})
    result = idempotency.run_once(account.object_id, request.headers.get("Idempotency-Key"), request_hash, create)
    return jsonify(result), 201


@bp.get("/sessions")
@declares_permission(Permission.SESSION_VIEW)
def list_sessions() -> Any:
    """Sessions in the caller's teams (or one of them), newest first, keyset-paginated."""
    args = load_args(ManagedListArgs())
    team_ids = _teams_with(Permission.SESSION_VIEW)
    if args["teamId"] is not None:
        if args["teamId"] not in team_ids:
            raise ApiError(403, "You are not a member of this team.")
        team_ids = [args["teamId"]]
    if not team_ids:
        return jsonify(sessions=[], nextBefore=None)
    page, next_before = service.list_sessions_page(team_ids, args["before"], args["limit"], args["status"])
    return jsonify(sessions=session_out.dump(page, many=True), nextBefore=next_before)


@bp.get("/sessions/<sessionId>")
@declares_permission(Permission.SESSION_VIEW)
def get_session(sessionId: str) -> Any:
    """One session in the caller's teams."""
    session = _session_in_my_teams(path_id(sessionId, "session"), Permission.SESSION_VIEW)
    return jsonify(session=session_out.dump(session))


@bp.get("/sessions/<sessionId>/events")
@declares_permission(Permission.SESSION_VIEW)
def session_events(sessionId: str) -> Any:
    """The transcript, oldest first; `?after=<seq>` for what is new."""
    session = _session_in_my_teams(path_id(sessionId, "session"), Permission.SESSION_VIEW)
    args = load_args(ListEventsArgs())
    events = sessions_repo.list_events(session["_id"], after=args["after"], limit=args["limit"])
    return jsonify(events=event_out.dump(events, many=True), lastSeq=events[-1]["seq"] if events else args["after"])


@bp.delete("/sessions/<sessionId>")
@declares_permission(Permission.SESSION_DELETE)
def delete_session(sessionId: str) -> Any:
    """Remove an ended session and its transcript; 409 while it is active."""
    session = _session_in_my_teams(path_id(sessionId, "session"), Permission.SESSION_DELETE)
    service.delete_session(session["teamId"], session["_id"])
    return jsonify(ok=True)
