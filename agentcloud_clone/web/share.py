"""Shared sessions under `/s/<resourceSlug>/...` (Agentcloud's public app routes), for people outside the team
when the app's sharing mode lets them in (services/sharing.py), and for the team's own members.

A visitor who starts a session of a public app gets a visitor token for it: programs send it back as the
`X-Visitor-Token` header; browsers keep it in the signed session cookie. Requests that rely on the cookie need a
CSRF check (a token, or JSON from this site); header requests do not, since no other site can send the header.
Whoever may not use a session finds nothing (404), whether it exists or not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from bson import ObjectId
from flask import Blueprint, g, jsonify, request, session
from flask_login import current_user

from ..access import Permission, parse_id
from ..errors import InvalidInput, NotSignedIn
from ..schemas import (
    CancelSchema,
    SendMessageSchema,
    SessionEditSchema,
    SessionStartSchema,
    SharedSessionCreateSchema,
    shared_event_out,
    shared_session_out,
)
from ..services import accounts as accounts_service
from ..services import sessions as service
from ..services import sharing
from ..vocabulary import CancelSource, OnBusy
from .identity import SAFE_METHODS, api_key_in_use, require_csrf
from .parsing import csrf_field, load_body
from .ratelimits import cancel_limit, share_limit, share_start_limit
from .responses import redirect_or_json
from .sessions import cancel_fields, check_echoed_ids, edited, messages_page, started

bp = Blueprint("share", __name__, url_prefix="/s/<resourceSlug>")
SID = "<sessionId>"
VISITOR_HEADER = "X-Visitor-Token"
# The signed session cookie remembers a browser's visitor tokens, for this many sessions.
VISITS_KEY = "share_visits"
VISITS_KEPT = 20
MAX_TOKEN_LENGTH = 200


def dump_shared(doc: dict[str, Any]) -> dict[str, Any]:
    """A session as the shared routes show it: its conversation and state, nothing else of the team's."""
    shown: dict[str, Any] = shared_session_out.dump(service.state_of(doc))
    return shown


def _cookie_tokens() -> tuple[tuple[str, str], ...]:
    visits = session.get(VISITS_KEY)
    if not isinstance(visits, list):
        return ()
    return tuple((str(item[0]), str(item[1])) for item in visits if isinstance(item, list | tuple) and len(item) == 2)


def current_caller() -> sharing.Caller:
    """Who calls: the signed-in account (if any) and the visitor tokens presented."""
    account = current_user if current_user.is_authenticated else None
    if account is None and g.get("bad_api_key"):
        raise NotSignedIn("Invalid or revoked API key.")
    header = (request.headers.get(VISITOR_HEADER) or "").strip()[:MAX_TOKEN_LENGTH] or None
    return sharing.Caller(account, header, () if header else _cookie_tokens())


def remember_visit(session_id: ObjectId, token: str) -> None:
    """Keep a new visitor token in the browser's signed cookie (the most recent VISITS_KEPT)."""
    session[VISITS_KEY] = sharing.remembered(_cookie_tokens(), session_id, token, VISITS_KEPT)


def shared_route[F: Callable[..., Any]](permission: Permission, *, anyone: bool = False) -> Callable[[F], F]:
    """Views under `/s/<resourceSlug>/`: 401 for a caller presenting nothing (unless `anyone` may call, as a share
    link's holder does), then the team slug (400 when malformed); passes `team_id` and `caller`. `permission` is
    what a team member needs; everyone else is let in by the app's sharing mode."""

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, resourceSlug: str, **kwargs: Any) -> Any:
            caller = current_caller()
            if not anyone and not caller.presents_anything:
                raise NotSignedIn("Sign in, or open the session from the browser or token that started it.")
            team_id = parse_id(resourceSlug, "team")
            return view(*args, team_id=team_id, caller=caller, **kwargs)

        wrapper.required_permission = permission  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


@bp.before_request
def _csrf_for_visitor_cookies() -> None:
    """The global CSRF policy covers signed-in cookies; this covers visitor tokens kept in the cookie (for the
    routes that act on a session through them), and every form post (a share link's page sends its token, so no
    other site can start sessions in someone's browser). JSON without a cookie to rely on needs nothing: another
    site cannot send JSON here without a CORS preflight, which this app never grants."""
    if request.method in SAFE_METHODS or api_key_in_use() or request.headers.get(VISITOR_HEADER):
        return
    relies_on_cookie = bool(_cookie_tokens()) and request.endpoint != "share.add_session"
    if relies_on_cookie or not request.is_json:
        require_csrf()


def _session(caller: sharing.Caller, team_id: ObjectId, session_id: str, permission: Permission) -> dict[str, Any]:
    doc, _ = sharing.shared_session(caller, team_id, parse_id(session_id, "session"), permission)
    return doc


def path_of(team_id: ObjectId, session_id: Any) -> str:
    """The shared page of a session."""
    return f"/s/{team_id}/session/{session_id}"


@bp.post("/forms/session/add")
@share_start_limit
@share_limit
@shared_route(Permission.SESSION_CREATE, anyone=True)
def add_session(team_id: ObjectId, caller: sharing.Caller) -> Any:
    """Start a session of a shared app: `{shareId}` (a public or whitelist app's link) or `{appId | id}`, with
    Agentcloud's `skipRun`, a first `message`, `name` and `variables`. A visitor gets `visitorToken`."""
    data = load_body(SharedSessionCreateSchema())
    check_echoed_ids(data, team_id)
    start = sharing.app_to_start(caller, team_id, data["shareId"], data["appId"])
    team = accounts_service.get_team(team_id)
    doc, token = sharing.start_shared_session(
        caller,
        team,
        start,
        data["name"],
        data["message"],
        skip_run=data["skipRun"],
        variables=data["variables"],
    )
    fields: dict[str, Any] = {"_id": str(doc["_id"]), "session": dump_shared(doc)}
    if token is not None:
        remember_visit(doc["_id"], token)
        fields["visitorToken"] = token
    return redirect_or_json(path_of(team_id, doc["_id"]), flash_message="Session started.", **fields)


@bp.get(f"/session/{SID}.json")
@share_limit
@shared_route(Permission.SESSION_VIEW)
def session_json(team_id: ObjectId, caller: sharing.Caller, sessionId: str) -> Any:
    """One shared session."""
    doc = _session(caller, team_id, sessionId, Permission.SESSION_VIEW)
    return jsonify(session=dump_shared(doc), **csrf_field())


@bp.get(f"/session/{SID}/messages.json")
@share_limit
@shared_route(Permission.SESSION_VIEW)
def session_messages(team_id: ObjectId, caller: sharing.Caller, sessionId: str) -> Any:
    """A shared session's transcript, oldest first, after `?after=<seq>` or `?messageId=<event id>`."""
    doc = _session(caller, team_id, sessionId, Permission.SESSION_VIEW)
    return jsonify(messages_page(doc, shared_event_out))


@bp.post(f"/forms/session/{SID}/edit")
@share_limit
@shared_route(Permission.SESSION_CREATE)
def edit_session(team_id: ObjectId, caller: sharing.Caller, sessionId: str) -> Any:
    """Set a shared session's `variables`: `{message: 'Session updated successfully', session}`."""
    doc = _session(caller, team_id, sessionId, Permission.SESSION_CREATE)
    data = load_body(SessionEditSchema())
    check_echoed_ids(data, team_id, doc["_id"])
    return edited(
        path_of(team_id, doc["_id"]), dump_shared(service.set_variables(team_id, doc["_id"], data["variables"]))
    )


@bp.post(f"/forms/session/{SID}/start")
@share_start_limit
@share_limit
@shared_route(Permission.SESSION_CREATE)
def start_session(team_id: ObjectId, caller: sharing.Caller, sessionId: str) -> Any:
    """Run a turn for a shared session with none in flight: `{message: 'Session started successfully'}`."""
    doc = _session(caller, team_id, sessionId, Permission.SESSION_CREATE)
    check_echoed_ids(load_body(SessionStartSchema()), team_id, doc["_id"])
    return started(path_of(team_id, doc["_id"]), dump_shared(service.start_session(team_id, doc["_id"])))


@bp.post(f"/session/{SID}/send-message")
@share_start_limit
@share_limit
@shared_route(Permission.SESSION_CREATE)
def send_message(team_id: ObjectId, caller: sharing.Caller, sessionId: str) -> Any:
    """The next message of a shared session (`message` or Agentcloud's `messageText`)."""
    doc = _session(caller, team_id, sessionId, Permission.SESSION_CREATE)
    data = load_body(SendMessageSchema())
    after = dump_shared(
        service.send_message(team_id, doc["_id"], caller.actor, data["message"], OnBusy(data["onBusy"]))
    )
    return redirect_or_json(
        path_of(team_id, doc["_id"]),
        _id=after["_id"],
        ok=True,
        queued=after["queued"],
        queuedMessages=after["queuedMessages"],
    )


@bp.post(f"/forms/session/{SID}/cancel")
@cancel_limit
@share_limit
@shared_route(Permission.SESSION_CANCEL)
def cancel_session(team_id: ObjectId, caller: sharing.Caller, sessionId: str) -> Any:
    """Cancel a shared session, once; repeats report `alreadyCancelled`."""
    doc = _session(caller, team_id, sessionId, Permission.SESSION_CANCEL)
    data = load_body(CancelSchema())
    if data["sessionId"] not in (None, doc["_id"]) or data["resourceSlug"] not in (None, team_id):
        raise InvalidInput("The body names a different session or team than the path.")
    outcome = service.cancel_session(team_id, doc["_id"], caller.actor, CancelSource.SHARE, data["reason"])
    shown = dump_shared(outcome.session)
    fields = {**cancel_fields(outcome), "_id": shown["_id"], "status": shown["status"]}
    fields.update(cancelledAt=shown.get("cancelledAt"), endReason=shown.get("endReason"))
    return redirect_or_json(path_of(team_id, doc["_id"]), flash_message="Cancel requested.", **fields)
