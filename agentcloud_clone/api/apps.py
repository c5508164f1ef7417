"""Apps under `/<resourceSlug>/...`: the agent configurations sessions start from."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from ..auth import current_account, require_team
from ..permissions import Permission
from ..repositories import apps as apps_repo
from ..responses import redirect_or_json
from ..schemas import AppCreateSchema, AppEditSchema, app_out
from ..services import apps as service
from .common import csrf_field, load_body, path_id

bp = Blueprint("apps", __name__)


@bp.get("/<resourceSlug>/apps.json")
@require_team(Permission.APP_VIEW)
def list_apps(team: dict[str, Any]) -> Any:
    """The team's apps, newest first."""
    return jsonify(apps=app_out.dump(apps_repo.list_apps(team["_id"]), many=True), **csrf_field())


@bp.get("/<resourceSlug>/app/<appId>.json")
@require_team(Permission.APP_VIEW)
def app_json(team: dict[str, Any], appId: str) -> Any:
    """One app."""
    return jsonify(app=app_out.dump(service.get_app(team["_id"], path_id(appId, "app"))), **csrf_field())


@bp.post("/<resourceSlug>/forms/app/add")
@require_team(Permission.APP_MANAGE)
def add_app(team: dict[str, Any]) -> Any:
    """Create an app; its runner settings are validated against the runner."""
    data = load_body(AppCreateSchema())
    app = service.create_app_record(team, data["name"], data["runner"], data["config"], current_account().object_id)
    aid = str(app["_id"])
    return redirect_or_json(f"/{team['_id']}/apps", flash_message="App created.", _id=aid)


@bp.post("/<resourceSlug>/forms/app/<appId>/edit")
@require_team(Permission.APP_MANAGE)
def edit_app(team: dict[str, Any], appId: str) -> Any:
    """Change an app's name, runner or settings."""
    aid = path_id(appId, "app")
    service.edit_app(team["_id"], aid, load_body(AppEditSchema()))
    return redirect_or_json(f"/{team['_id']}/apps", flash_message="App saved.", _id=str(aid))


def _delete(team: dict[str, Any], appId: str) -> Any:
    aid = path_id(appId, "app")
    service.delete_app(team["_id"], aid)
    return redirect_or_json(f"/{team['_id']}/apps", flash_message="App deleted.", _id=str(aid), ok=True)


@bp.delete("/<resourceSlug>/forms/app/<appId>")
@require_team(Permission.APP_MANAGE)
def delete_app(team: dict[str, Any], appId: str) -> Any:
    """Remove an app no live session depends on."""
    return _delete(team, appId)


@bp.post("/<resourceSlug>/forms/app/<appId>/delete")
@require_team(Permission.APP_MANAGE)
def delete_app_form(team: dict[str, Any], appId: str) -> Any:
    """The HTML-form twin of the DELETE route."""
    return _delete(team, appId)
