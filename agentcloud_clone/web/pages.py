"""Server-rendered pages: sessions, transcripts, apps and API keys, on the same services as the JSON API.

Pages only read; every change is a plain form post to the API's own `/forms/...` routes, which answer a
browser with a 302 and a flash message. The static script improves on that (live transcript, cancel
without leaving the page, confirm dialogs) but nothing depends on it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from bson import ObjectId
from flask import Blueprint, Flask, g, redirect, render_template, request, send_from_directory, session, url_for
from flask_login import current_user

from ..access import (
    ROLES,
    Permission,
    app_for,
    current_account,
    has_permission,
    parse_id,
    require_team,
    session_for,
)
from ..ids import parse_object_id
from ..repositories import accounts as accounts_repo
from ..repositories import apps as apps_repo
from ..repositories import sessions as sessions_repo
from ..schemas import (
    ListSessionsArgs,
    api_key_out,
    app_out,
    event_out,
    member_out,
    my_invitation_out,
    shared_event_out,
    team_invitation_out,
)
from ..services import accounts as accounts_service
from ..services import sessions as sessions_service
from ..services import sharing
from ..vocabulary import RUNNER_NAMES, STATUSES, EventType, Runner, Status
from .parsing import load_args
from .ratelimits import share_limit
from .responses import take_revealed
from .sessions import dump_session, with_queue_position
from .share import dump_shared, shared_route

bp = Blueprint("pages", __name__)

# Shown as the config placeholder for each runner, so a new app starts from something that validates.
RUNNER_EXAMPLES = {
    Runner.SCRIPTED: {"steps": 8, "stepDelay": 0.25},
    Runner.OPENAI: {"model": "gpt-4o-mini", "baseUrl": "http://127.0.0.1:8001/v1", "apiKey": "sk-..."},
    Runner.PYTHON: {"callable": "agentcloud_clone.examples:echo", "options": {"times": 3, "delay": 0.2}},
}
TRANSCRIPT_PAGE = 1000


@bp.get("/favicon.ico")
def favicon() -> Any:
    """Browsers ask for /favicon.ico whatever the page says: the same icon."""
    return send_from_directory(bp.root_path + "/../static", "favicon.svg", mimetype="image/svg+xml", max_age=86400)


@bp.get("/")
def index() -> Any:
    """Signed-in users go to their first team's sessions; others to the login page."""
    if current_user.is_authenticated and current_user.team_ids:
        return redirect(f"/{current_user.team_ids[0]}/sessions")
    return redirect(url_for("account.login"))


def _team(team_id: ObjectId) -> dict[str, Any]:
    """The team whose page is shown (also for the team switcher)."""
    team: dict[str, Any] = accounts_repo.find_team(team_id) or {"_id": team_id, "name": str(team_id)}
    g.team = team
    return team


def _examples() -> dict[str, str]:
    return {runner: json.dumps(example) for runner, example in RUNNER_EXAMPLES.items()}


# --- sessions ------------------------------------------------------------------------------------------


@bp.get("/<resourceSlug>/sessions")
@require_team(Permission.SESSION_VIEW)
def sessions_page(team_id: ObjectId) -> Any:
    """The team's sessions, newest first, a page at a time, with the form that starts a new one."""
    args = load_args(ListSessionsArgs())
    page, next_before = sessions_service.list_sessions_page(
        [team_id], args["before"], args["limit"], args["status"], current_account().object_id
    )
    apps = apps_repo.list_apps(team_id)
    return render_template(
        "sessions.html",
        team=_team(team_id),
        sessions=[dump_session(s) for s in page],
        app_names={str(a["_id"]): a["name"] for a in apps},
        apps=app_out.dump(apps, many=True),
        before=args["before"],
        next_before=next_before,
        status_filter=args["status"],
        statuses=STATUSES,
    )


@bp.get("/<resourceSlug>/session/<sessionId>")
@require_team(Permission.SESSION_VIEW)
def session_page(team_id: ObjectId, sessionId: str) -> Any:
    """One session's transcript, its controls, and the box for the next message."""
    doc = session_for(current_account(), sessionId, Permission.SESSION_VIEW, team_id=team_id)
    events = _all_events(doc["_id"])
    session_view = with_queue_position(dump_session(doc))
    app = apps_repo.find_app(team_id, doc["appId"])
    ended = sessions_service.is_ended(doc)
    confirm_delete = (
        request.args.get("confirm") == "delete" and ended and has_permission(team_id, Permission.SESSION_DELETE)
    )
    return render_template(
        "session.html",
        team=_team(team_id),
        session=session_view,
        state=session_state(session_view),
        ended=ended,
        app_name=app["name"] if app else None,
        items=transcript(event_out.dump(events, many=True)),
        last_seq=events[-1]["seq"] if events else 0,
        confirm_delete=confirm_delete,
    )


# --- shared sessions (/s/<resourceSlug>/...) -------------------------------------------------------------


@bp.get("/s/<resourceSlug>/<shareId>")
@share_limit
@shared_route(Permission.SESSION_CREATE, anyone=True)
def share_link_page(team_id: ObjectId, caller: sharing.Caller, shareId: str) -> Any:
    """A public or whitelist app's share link: a page that starts a session of it. (Agentcloud starts one on the
    GET itself; here it takes a button, so link previews and prefetchers start nothing.)"""
    start = sharing.app_to_start(caller, team_id, shareId, None)
    return (
        render_template("share_start.html", app_name=start.app["name"], base=f"/s/{team_id}", share_id=shareId),
        200,
        {"Cache-Control": "no-store"},
    )


@bp.get("/s/<resourceSlug>/session/<sessionId>")
@share_limit
@shared_route(Permission.SESSION_VIEW)
def shared_session_page(team_id: ObjectId, caller: sharing.Caller, sessionId: str) -> Any:
    """A shared session's transcript and the box for the next message, for whoever may use it."""
    doc, app = sharing.shared_session(caller, team_id, parse_id(sessionId, "session"), Permission.SESSION_VIEW)
    events = _all_events(doc["_id"])
    account = caller.account
    may_act = account is None or account.role_in(team_id) is None or account.can(team_id, Permission.SESSION_CREATE)
    return (
        render_template(
            "shared_session.html",
            base=f"/s/{team_id}",
            session=dump_shared(doc),
            state=session_state(dump_shared(doc)),
            ended=sessions_service.is_ended(doc),
            app_name=app["name"] if app else None,
            items=transcript(shared_event_out.dump(events, many=True)),
            last_seq=events[-1]["seq"] if events else 0,
            may_act=may_act,
        ),
        200,
        {"Cache-Control": "no-store"},
    )


def _all_events(session_id: ObjectId) -> list[dict[str, Any]]:
    """The whole transcript, oldest first, read a page at a time."""
    events: list[dict[str, Any]] = []
    while True:
        after = events[-1]["seq"] if events else 0
        batch = sessions_repo.list_events(session_id, after=after, limit=TRANSCRIPT_PAGE)
        events.extend(batch)
        if len(batch) < TRANSCRIPT_PAGE:
            return events


def session_state(session_view: dict[str, Any]) -> str:
    """What the status badge says: the stored status, or `cancelling` while a cancel is being honoured."""
    return "cancelling" if session_view.get("cancelling") else session_view.get("status", Status.STARTED)


def transcript(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Transcript entries for display: user messages, one agent reply per turn (chunks joined), and notes.

    static/session.js applies the same rules to events that arrive while the page is open."""
    items: list[dict[str, Any]] = []
    replies: dict[str, dict[str, Any]] = {}
    for event in events:
        kind = event.get("type")
        if kind == EventType.MESSAGE:
            items.append({"kind": "user", "text": event.get("text", ""), "turnId": event.get("turnId")})
        elif kind == EventType.OUTPUT:
            turn = event.get("turnId") or ""
            reply = replies.get(turn)
            if reply is None:
                reply = {"kind": "agent", "text": "", "turnId": turn, "interrupted": False}
                replies[turn] = reply
                items.append(reply)
            reply["text"] += event.get("text", "")
            reply["interrupted"] = reply["interrupted"] or bool(event.get("interrupted"))
        elif kind == EventType.CANCEL:
            reason = event.get("reason")
            items.append({"kind": "note", "text": f"Cancel requested: {reason}" if reason else "Cancel requested."})
        if kind in (EventType.STATUS, EventType.TURN_END) and event.get("interrupted"):
            reply = replies.get(event.get("turnId") or "")
            if reply is not None:
                reply["interrupted"] = True  # the turn was cut off after its last output
        if kind == EventType.TURN_END and event.get("retry"):
            # Its worker shut down: the turn runs again, and its new output is a reply of its own.
            replies.pop(event.get("turnId") or "", None)
            items.append({"kind": "note", "text": event.get("message") or "The turn will run again."})
        if kind == EventType.STATUS:
            items.append(
                {
                    "kind": "error" if event.get("status") == Status.ERROR else "note",
                    "text": f"Session {event.get('status', 'updated')}"
                    + (f" ({event['endReason']})" if event.get("endReason") else "")
                    + (f". {event['message']}" if event.get("message") else "."),
                    "endReason": event.get("endReason"),
                }
            )
    return items


# --- apps ----------------------------------------------------------------------------------------------


@bp.get("/<resourceSlug>/apps")
@require_team(Permission.APP_VIEW)
def apps_page(team_id: ObjectId) -> Any:
    """The team's apps and the form that adds one; `?delete=<id>` asks to confirm a deletion."""
    apps = app_out.dump(apps_repo.list_apps(team_id), many=True)
    confirm = None
    if has_permission(team_id, Permission.APP_MANAGE):
        confirm = next((a for a in apps if a["_id"] == request.args.get("delete")), None)
    new_link = take_revealed("share_link")
    page = render_template(
        "apps.html",
        team=_team(team_id),
        apps=apps,
        confirm=confirm,
        runners=RUNNER_NAMES,
        examples=_examples(),
        new_link=new_link and request.host_url.rstrip("/") + new_link,
    )
    return page, 200, {"Cache-Control": "no-store"} if new_link else {}


@bp.get("/<resourceSlug>/app/<appId>/edit")
@require_team(Permission.APP_MANAGE)
def app_edit_page(team_id: ObjectId, appId: str) -> Any:
    """The form that changes an app's name, runner or settings."""
    app = app_for(current_account(), appId, Permission.APP_MANAGE, team_id=team_id)
    config = dict(app.get("config") or {})
    # The upstream key is a secret: never put it in a page; the form says how to keep or replace it.
    has_secret = bool(config.pop("apiKey", None))
    return render_template(
        "app_edit.html",
        team=_team(team_id),
        app=app_out.dump(app),
        config_text=json.dumps(config, indent=2),
        has_secret=has_secret,
        runners=RUNNER_NAMES,
        examples=_examples(),
    )


# --- team ----------------------------------------------------------------------------------------------


@bp.get("/<resourceSlug>/members")
@require_team(Permission.TEAM_MANAGE)
def members_page(team_id: ObjectId) -> Any:
    """The team's members, their roles, and the form that adds one; `?remove=<id>` asks to confirm."""
    members = member_out.dump(accounts_service.team_members(team_id), many=True)
    invitations = team_invitation_out.dump(accounts_service.team_invitations(team_id), many=True)
    confirm = next((m for m in members if m["_id"] == request.args.get("remove")), None)
    return render_template(
        "members.html", team=_team(team_id), members=members, invitations=invitations, roles=ROLES, confirm=confirm
    )


# --- account -------------------------------------------------------------------------------------------


@bp.get("/account/apikeys")
def api_keys_page() -> Any:
    """The caller's API keys, and invitations to teams waiting for an answer; a key just created is shown here
    once, then never again."""
    account = current_account()
    keys = api_key_out.dump(accounts_repo.list_api_keys(account.object_id), many=True)
    invitations = my_invitation_out.dump(accounts_service.invitations_for(account.email), many=True)
    new_key = take_revealed("api_key")
    revoke = next((k for k in keys if k["_id"] == request.args.get("revoke") and not k.get("revokedAt")), None)
    response = render_template("apikeys.html", keys=keys, new_key=new_key, confirm=revoke, invitations=invitations)
    headers = {"Cache-Control": "no-store"} if new_key else {}
    return response, 200, headers


# --- template helpers ----------------------------------------------------------------------------------


def _user_teams() -> list[dict[str, Any]]:
    """The signed-in user's teams with their role, read once per request (for the team switcher)."""
    if not current_user.is_authenticated:
        return []
    if "web_user_teams" not in g:
        teams = accounts_repo.find_teams(current_user.team_ids)
        g.web_user_teams = [
            {"_id": str(t["_id"]), "name": t.get("name") or str(t["_id"]), "role": current_user.role_in(t["_id"])}
            for t in teams
        ]
    found: list[dict[str, Any]] = g.web_user_teams
    return found


def _current_team() -> dict[str, Any] | None:
    """The team whose pages are shown; on account pages, the team last visited (or the first one)."""
    team = g.get("team")
    if team is not None:
        if session.get("web_team") != str(team["_id"]):
            session["web_team"] = str(team["_id"])
        return {"_id": str(team["_id"]), "name": team.get("name") or str(team["_id"])}
    teams = _user_teams()
    return next((t for t in teams if t["_id"] == session.get("web_team")), teams[0] if teams else None)


def _can(team_id: str | ObjectId, permission: Permission) -> bool:
    oid = team_id if isinstance(team_id, ObjectId) else parse_object_id(team_id)
    return oid is not None and has_permission(oid, permission)


def _when(value: str | datetime | None) -> str:
    """A timestamp as people read it, in UTC (the `<time>` element carries the exact value)."""
    if not value:
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.strftime("%d %b %Y, %H:%M:%S UTC")


def _safe_referrer() -> str | None:
    """The previous page when it is one of ours, for the error page's way back."""
    referrer = request.referrer or ""
    return referrer if referrer.startswith(request.host_url) and referrer != request.url else None


def init_app(app: Flask) -> None:
    """The helpers the templates use."""
    app.add_template_filter(_when, "when")
    app.add_template_global(session_state)
    app.add_template_global(_can, "can")

    @app.context_processor
    def _web_helpers() -> dict[str, Any]:
        return {"user_teams": _user_teams, "current_team": _current_team, "safe_referrer": _safe_referrer}
