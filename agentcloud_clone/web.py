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
from flask import Blueprint, Flask, g, redirect, render_template, request, session, url_for
from flask_login import current_user

from .api.common import load_args, path_id
from .auth import current_account, has_permission, require_team
from .permissions import Permission
from .repositories import accounts as accounts_repo
from .repositories import apps as apps_repo
from .repositories import sessions as sessions_repo
from .schemas import ListSessionsArgs, api_key_out, app_out, event_out, parse_object_id, session_out
from .services import apps as apps_service
from .services import sessions as sessions_service

bp = Blueprint("web", __name__)

ENDED = frozenset(sessions_repo.ENDED_STATUSES)
RUNNERS = ("scripted", "openai", "python")
# Shown as the config placeholder for each runner, so a new app starts from something that validates.
RUNNER_EXAMPLES = {
    "scripted": {"steps": 8, "stepDelay": 0.25},
    "openai": {"model": "gpt-4o-mini", "baseUrl": "http://127.0.0.1:8001/v1", "apiKeyEnv": "OPENAI_API_KEY"},
    "python": {"callable": "package.module:function", "options": {}},
}
TRANSCRIPT_PAGE = 1000


@bp.get("/")
def index() -> Any:
    """Signed-in users go to their first team's sessions; others to the login page."""
    if current_user.is_authenticated and current_user.team_ids:
        return redirect(f"/{current_user.team_ids[0]}/sessions")
    return redirect(url_for("auth.login"))


# --- sessions ------------------------------------------------------------------------------------------


@bp.get("/<resourceSlug>/sessions")
@require_team(Permission.SESSION_VIEW)
def sessions_page(team: dict[str, Any]) -> Any:
    """The team's sessions, newest first, a page at a time, with the form that starts a new one."""
    args = load_args(ListSessionsArgs())
    page, next_before = sessions_service.list_sessions_page(
        [team["_id"]], args["before"], args["limit"], args["status"]
    )
    apps = apps_repo.list_apps(team["_id"])
    app_names = {str(a["_id"]): a["name"] for a in apps}
    return render_template(
        "sessions.html",
        team=team,
        sessions=session_out.dump(page, many=True),
        app_names=app_names,
        apps=app_out.dump(apps, many=True),
        before=args["before"],
        next_before=next_before,
        status_filter=args["status"],
        statuses=sessions_repo.STATUSES,
    )


@bp.get("/<resourceSlug>/session/<sessionId>")
@require_team(Permission.SESSION_VIEW)
def session_page(team: dict[str, Any], sessionId: str) -> Any:
    """One session's transcript, its controls, and the box for the next message."""
    doc = sessions_service.get_session(team["_id"], path_id(sessionId, "session"))
    events = _all_events(doc["_id"])
    session_view = session_out.dump(doc)
    app = apps_repo.find_app(team["_id"], doc["appId"])
    ended = doc["status"] in ENDED
    confirm_delete = (
        request.args.get("confirm") == "delete" and ended and has_permission(team["_id"], Permission.SESSION_DELETE)
    )
    return render_template(
        "session.html",
        team=team,
        session=session_view,
        state=session_state(session_view),
        ended=ended,
        app_name=app["name"] if app else None,
        items=transcript(event_out.dump(events, many=True)),
        last_seq=events[-1]["seq"] if events else 0,
        last_type=events[-1]["type"] if events else "",
        confirm_delete=confirm_delete,
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
    return "cancelling" if session_view.get("cancelling") else session_view.get("status", "started")


def transcript(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Transcript entries for display: user messages, one agent reply per turn (chunks joined), and notes.

    static/session.js applies the same rules to events that arrive while the page is open."""
    items: list[dict[str, Any]] = []
    replies: dict[str, dict[str, Any]] = {}
    for event in events:
        kind = event.get("type")
        if kind == "message":
            items.append({"kind": "user", "text": event.get("text", ""), "turnId": event.get("turnId")})
        elif kind == "output":
            turn = event.get("turnId") or ""
            reply = replies.get(turn)
            if reply is None:
                reply = {"kind": "agent", "text": "", "turnId": turn, "interrupted": False}
                replies[turn] = reply
                items.append(reply)
            reply["text"] += event.get("text", "")
            reply["interrupted"] = reply["interrupted"] or bool(event.get("interrupted"))
        elif kind == "cancel":
            items.append({"kind": "note", "text": "Cancel requested."})
        elif kind == "status":
            text = f"Session {event.get('status', 'updated')}."
            if event.get("message"):
                text += f" {event['message']}"
            items.append({"kind": "note", "text": text})
        elif kind == "error":
            items.append({"kind": "error", "text": event.get("message") or "The turn failed."})
    return items


# --- apps ----------------------------------------------------------------------------------------------


@bp.get("/<resourceSlug>/apps")
@require_team(Permission.APP_VIEW)
def apps_page(team: dict[str, Any]) -> Any:
    """The team's apps and the form that adds one; `?delete=<id>` asks to confirm a deletion."""
    apps = app_out.dump(apps_repo.list_apps(team["_id"]), many=True)
    confirm = None
    if has_permission(team["_id"], Permission.APP_MANAGE):
        confirm = next((a for a in apps if a["_id"] == request.args.get("delete")), None)
    return render_template(
        "apps.html",
        team=team,
        apps=apps,
        confirm=confirm,
        runners=RUNNERS,
        examples={runner: json.dumps(example) for runner, example in RUNNER_EXAMPLES.items()},
    )


@bp.get("/<resourceSlug>/app/<appId>/edit")
@require_team(Permission.APP_MANAGE)
def app_edit_page(team: dict[str, Any], appId: str) -> Any:
    """The form that changes an app's name, runner or settings."""
    app = apps_service.get_app(team["_id"], path_id(appId, "app"))
    config = dict(app.get("config") or {})
    # The upstream key is a secret: never put it in a page; the form says how to keep or replace it.
    has_secret = bool(config.pop("apiKey", None))
    return render_template(
        "app_edit.html",
        team=team,
        app=app_out.dump(app),
        config_text=json.dumps(config, indent=2),
        has_secret=has_secret,
        runners=RUNNERS,
        examples={runner: json.dumps(example) for runner, example in RUNNER_EXAMPLES.items()},
    )


# --- account -------------------------------------------------------------------------------------------


@bp.get("/account/apikeys")
def api_keys_page() -> Any:
    """The caller's API keys; a key just created is shown here once, then never again."""
    account = current_account()
    keys = api_key_out.dump(accounts_repo.list_api_keys(account.object_id), many=True)
    new_key = session.pop("new_api_key", None)
    revoke = next((k for k in keys if k["_id"] == request.args.get("revoke") and not k.get("revokedAt")), None)
    response = render_template("apikeys.html", keys=keys, new_key=new_key, confirm=revoke)
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
    return g.web_user_teams


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
    """Add security headers to every response, and the helpers the templates use."""

    @app.after_request
    def _security_headers(response: Any) -> Any:
        if response.status_code != 429:
            # flask-limiter adds Retry-After to every response; it only means something on a 429.
            response.headers.pop("Retry-After", None)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if response.mimetype == "text/html":
            response.headers.setdefault(
                "Content-Security-Policy",
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
            )
        return response

    app.add_template_filter(_when, "when")
    app.add_template_global(session_state)
    app.add_template_global(_can, "can")

    @app.context_processor
    def _web_helpers() -> dict[str, Any]:
        return {"user_teams": _user_teams, "current_team": _current_team, "safe_referrer": _safe_referrer}
