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
from .parsing import csrf_field, load_body
from .responses import redirect_or_json

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
        team, data["name"], data["runner"], data["config"], account.object_id, data["limits"]
    )
    return redirect_or_json(f"/{team_id}/apps", flash_message="App created.", _id=str(app["_id"]))


@bp.post("/<resourceSlug>/forms/app/<appId>/edit")
@require_team(Permission.APP_MANAGE)
def edit_app(team_id: ObjectId, appId: str) -> Any:
    """Change an app's name, runner or settings."""
    aid = parse_id(appId, "app")
    service.edit_app(team_id, aid, load_body(AppEditSchema()))
    return redirect_or_json(f"/{team_id}/apps", flash_message="App saved.", _id=str(aid))


def _delete(team_id: ObjectId, appId: str) -> Any:
    aid = parse_id(appId, "app")
    service.delete_app(team_id, aid)
    return redirect_or_json(f"/{team_id}/apps", flash_message="App deleted.", _id=str(aid), ok=True)


@bp.delete("/<resourceSlug>/forms/app/<item:appId>")
@require_team(Permission.APP_MANAGE)
def delete_app(team_id: ObjectId, appId: str) -> Any:
    """Remove an app no live session depends on."""
    return _delete(team_id, appId)


@bp.post("/<resourceSlug>/forms/app/<appId>/delete")
@require_team(Permission.APP_MANAGE)
def delete_app_form(team_id: ObjectId, appId: str) -> Any:
    """The HTML-form twin of the DELETE route."""
    return _delete(team_id, appId)
