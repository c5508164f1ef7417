"""Apps: the agent configurations sessions are started from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument

from ..db import get_db
from ..timeutil import utcnow


def insert_app(team: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Store a new app in the team: `fields` are its own (name, runner, config, limits, sharing...), validated."""
    now = utcnow()
    doc = {**fields, "orgId": team["orgId"], "teamId": team["_id"], "createdAt": now, "updatedAt": now}
    doc["_id"] = get_db().apps.insert_one(doc).inserted_id
    return doc


def find_app(team_id: ObjectId, app_id: ObjectId) -> dict[str, Any] | None:
    """The app, only if it belongs to the team."""
    return get_db().apps.find_one({"_id": app_id, "teamId": team_id})


def find_app_by_share_link(team_id: ObjectId, link_hash: str) -> dict[str, Any] | None:
    """The team's app whose current share link has this hash (served by the `(teamId, _id)` index)."""
    return get_db().apps.find_one({"teamId": team_id, "shareLink.hash": link_hash})


def sharing_mode(team_id: ObjectId, app_id: ObjectId) -> str | None:
    """The app's sharing mode as stored now (None: the app has no `sharingConfig`, or is gone)."""
    found = get_db().apps.find_one({"_id": app_id, "teamId": team_id}, {"sharingConfig.mode": 1})
    return ((found or {}).get("sharingConfig") or {}).get("mode")


def list_apps(team_id: ObjectId) -> list[dict[str, Any]]:
    """The team's apps, newest first."""
    return list(get_db().apps.find({"teamId": team_id}).sort("_id", -1).limit(1000))


def update_app(team_id: ObjectId, app_id: ObjectId, changes: dict[str, Any]) -> dict[str, Any] | None:
    """Apply `changes` to the team's app; None when it is not in the team."""
    return get_db().apps.find_one_and_update(
        {"_id": app_id, "teamId": team_id},
        {"$set": {**changes, "updatedAt": utcnow()}},
        return_document=ReturnDocument.AFTER,
    )


def delete_app(team_id: ObjectId, app_id: ObjectId) -> bool:
    """Remove the team's app; False when it was not there."""
    return get_db().apps.delete_one({"_id": app_id, "teamId": team_id}).deleted_count == 1


def stored_api_keys() -> Iterator[tuple[ObjectId, ObjectId, str]]:
    """(team id, app id, stored key) of every app, in every team, holding an upstream key (operators' resealing)."""
    query = {"config.apiKey": {"$type": "string"}}
    for doc in get_db().apps.find(query, {"teamId": 1, "config.apiKey": 1}):
        yield doc["teamId"], doc["_id"], doc["config"]["apiKey"]


def replace_api_key(team_id: ObjectId, app_id: ObjectId, was: str, now: str) -> bool:
    """Store `now` in place of `was` (unless the key changed meanwhile)."""
    query = {"_id": app_id, "teamId": team_id, "config.apiKey": was}
    return get_db().apps.update_one(query, {"$set": {"config.apiKey": now}}).modified_count == 1
