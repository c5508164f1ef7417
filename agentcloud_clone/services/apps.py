"""Apps: validated runner settings, team-scoped."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from marshmallow import ValidationError

from ..repositories import apps as repo
from ..repositories import sessions as sessions_repo
from ..responses import ApiError
from ..schemas import MASKED_SECRET, validate_runner_config


def _checked_config(runner: str, config: dict[str, Any]) -> dict[str, Any]:
    try:
        return validate_runner_config(runner, config)
    except ValidationError as exc:
        raise ApiError(400, "Invalid runner settings.", exc.messages) from None  # type: ignore[arg-type]


def create_app_record(
    team: dict[str, Any], name: str, runner: str, config: dict[str, Any], created_by: ObjectId | None
) -> dict[str, Any]:
    """Store an app whose runner settings passed validation."""
    return repo.insert_app(team, name, runner, _checked_config(runner, config), created_by)


def get_app(team_id: ObjectId, app_id: ObjectId) -> dict[str, Any]:
    """The team's app; 404 when it is not in the team."""
    app = repo.find_app(team_id, app_id)
    if app is None:
        raise ApiError(404, "No such app in this team.")
    return app


def edit_app(team_id: ObjectId, app_id: ObjectId, changes: dict[str, Any]) -> dict[str, Any]:
    """Apply validated changes; the settings are checked against the (possibly new) runner."""
    current = get_app(team_id, app_id)
    runner = changes.get("runner", current["runner"])
    if "config" in changes or "runner" in changes:
        config = dict(changes.get("config", current.get("config", {})))
        if "config" not in changes and runner != current["runner"]:
            config = {}
        if config.get("apiKey") == MASKED_SECRET:
            # The form showed the mask, not the key: keep the stored key rather than saving the mask.
            config["apiKey"] = (current.get("config") or {}).get("apiKey")
        changes["config"] = _checked_config(runner, config)
    updated = repo.update_app(team_id, app_id, changes)
    if updated is None:
        raise ApiError(404, "No such app in this team.")
    return updated


def delete_app(team_id: ObjectId, app_id: ObjectId) -> None:
    """Remove the app; 409 while live sessions still run from it."""
    get_app(team_id, app_id)
    if sessions_repo.count_live_sessions_for_app(team_id, app_id):
        raise ApiError(409, "Sessions started from this app are still live; cancel them first.")
    if not repo.delete_app(team_id, app_id):
        raise ApiError(404, "No such app in this team.")
