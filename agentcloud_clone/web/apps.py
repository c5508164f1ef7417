"""Apps under `/<resourceSlug>/...`: the agent configurations sessions start from."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from flask import Blueprint, jsonify

from ..access import Permission, app_for, current_account, parse_id, require_team
from ..repositories import apps as apps_repo
from ..schemas import AppCreateSchema, AppEditSchema, app_out
from ..services import accounts as accounts_service
from ..services import apps as service
from ..services import sharing
from .parsing import csrf_field, load_body
from .responses import redirect_or_json
from .routing import delete_with_form_twin

bp = Blueprint("apps", __name__)


@bp.get("/<resourceSlug>/apps.json")
@require_team(Permission.APP_VIEW)
def list_apps(team_id: ObjectId) -> Any:
    """The team's apps, newest first."""
    return jsonify(apps=app_out.dump(apps_repo.list_apps(team_id), many=True), **csrf_field())


@bp.get("/<resourceSlug>/app/<appId>.json")
@require_team(Permission.APP_VIEW)
def app_json(team_id: ObjectId, appId: str) -> Any:
    """One app."""
    app = app_for(current_account(), appId, Permission.APP_VIEW, team_id=team_id)
    return jsonify(app=app_out.dump(app), **csrf_field())


@bp.post("/<resourceSlug>/forms/app/add")
@require_team(Permission.APP_MANAGE)
def add_app(team_id: ObjectId) -> Any:
    """Create an app; its runner settings are validated against the runner."""
    data = load_body(AppCreateSchema())
    team = accounts_service.get_team(team_id)
    account = current_account()
    app = service.create_app_record(
        team,
        data["name"],
        data["runner"],
        data["config"],
        account.object_id,
        data["limits"],
        sharing_config=data["sharingConfig"],
        required_variables=data["requiredVariables"],
    )
    return _saved(team_id, "App created.", app)


def _saved(team_id: ObjectId, message: str, app: dict[str, Any]) -> Any:
    """Back to the apps page, with a share link made just now (`shareId`, and the path it opens) shown this once:
    in the JSON answer, or on the page a browser is sent to."""
    share_id = app.get("shareId")
    link = {"shareId": share_id, "shareLink": sharing.share_path(app["teamId"], share_id)} if share_id else {}
    reveal = {"share_link": link["shareLink"]} if link else None
    return redirect_or_json(f"/{team_id}/apps", flash_message=message, reveal=reveal, _id=str(app["_id"]), **link)


@bp.post("/<resourceSlug>/forms/app/<appId>/edit")
@require_team(Permission.APP_MANAGE)
def edit_app(team_id: ObjectId, appId: str) -> Any:
    """Change an app's name, runner, settings, sharing or the variables it needs; a new sharing mode replaces the
    share link."""
    aid = parse_id(appId, "app")
    app = service.edit_app(team_id, aid, load_body(AppEditSchema()))
    return _saved(team_id, "App saved.", app)


@bp.post("/<resourceSlug>/forms/app/<appId>/share-link")
@require_team(Permission.APP_MANAGE)
def renew_share_link(team_id: ObjectId, appId: str) -> Any:
    """Replace a public or whitelist app's share link: the old one, and the visitor access it gave, end now."""
    app, share_id = service.renew_share_link(team_id, parse_id(appId, "app"))
    return _saved(team_id, "New share link made.", {**app, "shareId": share_id})


@delete_with_form_twin(
    bp,
    "/<resourceSlug>/forms/app/<item:appId>",
    "/<resourceSlug>/forms/app/<appId>/delete",
    Permission.APP_MANAGE,
    endpoint="delete_app",
    summary="Remove an app no live session depends on.",
)
def _delete(team_id: ObjectId, appId: str) -> Any:
    aid = parse_id(appId, "app")
    service.delete_app(team_id, aid)
    return redirect_or_json(f"/{team_id}/apps", flash_message="App deleted.", _id=str(aid), ok=True)
