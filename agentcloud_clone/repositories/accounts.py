"""Accounts, orgs, teams and API keys."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from .. import credentials
from ..db import get_db
from ..timeutil import utcnow


def _changes_credentials[F: Callable[..., Any]](write: F) -> F:
    """A write to an account or an API key: every process's kept sign-in lookups are out of date once it returns
    (credentials.py), whatever it returns."""

    @functools.wraps(write)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return write(*args, **kwargs)
        finally:
            credentials.credentials_changed()

    return wrapper  # type: ignore[return-value]


def find_account_by_email(email: str) -> dict[str, Any] | None:
    """The account with this (normalised) email, if any."""
    return get_db().accounts.find_one({"email": email.strip().lower()})


def find_account(account_id: ObjectId) -> dict[str, Any] | None:
    """The account with this id, if any."""
    return get_db().accounts.find_one({"_id": account_id})


@_changes_credentials
def insert_account(email: str, name: str, password_hash: str) -> dict[str, Any]:
    """Store a new account with no team memberships; raises DuplicateKeyError for a taken email."""
    doc = {
        "email": email.strip().lower(),
        "name": name,
        "passwordHash": password_hash,
        "teams": [],
        "createdAt": utcnow(),
    }
    doc["_id"] = get_db().accounts.insert_one(doc).inserted_id
    return doc


@_changes_credentials
def set_membership(account_id: ObjectId, team_id: ObjectId, role: str) -> dict[str, Any] | None:
    """Give the account `role` on the team, replacing any earlier role there."""
    accounts = get_db().accounts
    updated = accounts.find_one_and_update(
        {"_id": account_id, "teams.teamId": team_id},
        {"$set": {"teams.$.role": role}},
        return_document=ReturnDocument.AFTER,
    )
    if updated is None:
        updated = accounts.find_one_and_update(
            {"_id": account_id},
            {"$push": {"teams": {"teamId": team_id, "role": role}}},
            return_document=ReturnDocument.AFTER,
        )
    return updated


@_changes_credentials
def remove_membership(account_id: ObjectId, team_id: ObjectId) -> dict[str, Any] | None:
    """Take the account off the team; the account after, or None when it was not a member."""
    return get_db().accounts.find_one_and_update(
        {"_id": account_id, "teams.teamId": team_id},
        {"$pull": {"teams": {"teamId": team_id}}},
        return_document=ReturnDocument.AFTER,
    )


def count_team_owners(team_id: ObjectId) -> int:
    """How many accounts own the team."""
    return get_db().accounts.count_documents({"teams": {"$elemMatch": {"teamId": team_id, "role": "owner"}}})


@_changes_credentials
def add_signin(account_id: ObjectId, signin: dict[str, Any], keep: int) -> None:
    """Record a sign-in on the account, keeping only the `keep` most recent ones."""
    get_db().accounts.update_one({"_id": account_id}, {"$push": {"signins": {"$each": [signin], "$slice": -keep}}})


@_changes_credentials
def set_password(account_id: ObjectId, password_hash: str, keep_signin: dict[str, Any] | None) -> bool:
    """Store a new password hash and revoke every sign-in of the account but `keep_signin` (which may be None);
    True when the account exists. One write, so no sign-in made with the old password survives it."""
    signins = [keep_signin] if keep_signin else []
    result = get_db().accounts.update_one(
        {"_id": account_id}, {"$set": {"passwordHash": password_hash, "signins": signins}}
    )
    return result.matched_count == 1


@_changes_credentials
def remove_signins(account_id: ObjectId, signin_id: str | None = None) -> None:
    """Revoke one sign-in of the account, or all of them when `signin_id` is None."""
    update: dict[str, Any] = {"$pull": {"signins": {"id": signin_id}}} if signin_id else {"$set": {"signins": []}}
    get_db().accounts.update_one({"_id": account_id}, update)


def find_team(team_id: ObjectId) -> dict[str, Any] | None:
    """The team with this id, if any."""
    return get_db().teams.find_one({"_id": team_id})


def update_team(team_id: ObjectId, changes: dict[str, Any]) -> dict[str, Any] | None:
    """Apply `changes` to the team; the team after, or None when there is no such team."""
    return get_db().teams.find_one_and_update({"_id": team_id}, {"$set": changes}, return_document=ReturnDocument.AFTER)


def find_team_fields(team_id: ObjectId, projection: dict[str, Any]) -> dict[str, Any] | None:
    """These fields of the team, if there is one."""
    return get_db().teams.find_one({"_id": team_id}, projection)


def unset_team_fields(team_id: ObjectId, fields: list[str]) -> dict[str, Any] | None:
    """Remove these fields from the team; the team after, or None when there is no such team."""
    return get_db().teams.find_one_and_update(
        {"_id": team_id}, {"$unset": {name: "" for name in fields}}, return_document=ReturnDocument.AFTER
    )


def find_teams(team_ids: list[ObjectId]) -> list[dict[str, Any]]:
    """The teams with these ids, by name."""
    return list(get_db().teams.find({"_id": {"$in": team_ids}}).sort("name", 1))


def find_team_by_name(name: str) -> dict[str, Any] | None:
    """The team with this name, if any (names are unique per installation for the CLI's sake)."""
    return get_db().teams.find_one({"name": name})


def insert_org_and_team(team_name: str) -> dict[str, Any]:
    """Create an org and its first team, both named `team_name`."""
    db = get_db()
    now = utcnow()
    org_id = db.orgs.insert_one({"name": team_name, "createdAt": now}).inserted_id
    team = {"orgId": org_id, "name": team_name, "createdAt": now}
    team["_id"] = db.teams.insert_one(team).inserted_id
    return team


def team_members(team_id: ObjectId) -> list[dict[str, Any]]:
    """Accounts belonging to the team, without secrets."""
    projection = {"passwordHash": 0, "signins": 0}
    return list(get_db().accounts.find({"teams.teamId": team_id}, projection).sort("email", 1).limit(1000))


@_changes_credentials
def insert_api_key(account_id: ObjectId, name: str, lookup: str, key_hash: str) -> dict[str, Any]:
    """Store an API key by its lookup prefix and hash; the key itself is never stored."""
    doc = {
        "accountId": account_id,
        "name": name,
        "lookup": lookup,
        "keyHash": key_hash,
        "createdAt": utcnow(),
        "lastUsedAt": None,
        "revokedAt": None,
    }
    doc["_id"] = get_db().api_keys.insert_one(doc).inserted_id
    return doc


def find_api_key_by_lookup(lookup: str) -> dict[str, Any] | None:
    """The API key with this lookup prefix, revoked or not."""
    return get_db().api_keys.find_one({"lookup": lookup})


def touch_api_key(key_id: ObjectId, when: datetime) -> None:
    """Record a use of the key."""
    get_db().api_keys.update_one({"_id": key_id}, {"$set": {"lastUsedAt": when}})


def list_api_keys(account_id: ObjectId) -> list[dict[str, Any]]:
    """The account's keys, newest first, without hashes."""
    cursor = get_db().api_keys.find({"accountId": account_id}, {"keyHash": 0}).sort("_id", -1)
    return list(cursor)


@_changes_credentials
def revoke_api_key(account_id: ObjectId, key_id: ObjectId) -> dict[str, Any] | None:
    """Mark the account's key revoked (once); None when the account has no such key."""
    db = get_db()
    revoked = db.api_keys.find_one_and_update(
        {"_id": key_id, "accountId": account_id, "revokedAt": None},
        {"$set": {"revokedAt": utcnow()}},
        projection={"keyHash": 0},
        return_document=ReturnDocument.AFTER,
    )
    return revoked or db.api_keys.find_one({"_id": key_id, "accountId": account_id}, {"keyHash": 0})


# --- invitations: a team's offer of a role to an email, until its account accepts it ---------------------------


def upsert_invitation(
    team_id: ObjectId, email: str, role: str, invited_by: ObjectId | None, now: datetime, lifetime: timedelta
) -> dict[str, Any]:
    """The team's invitation for `email` (one per team and email), made or renewed with this role."""
    invitations = get_db().invitations
    query = {"teamId": team_id, "email": email}
    update = {"$set": {"role": role, "invitedBy": invited_by, "invitedAt": now, "expiresAt": now + lifetime}}
    try:
        found = invitations.find_one_and_update(query, update, upsert=True, return_document=ReturnDocument.AFTER)
    except DuplicateKeyError:
        # Two upserts raced and the other inserted first: this one now updates what it inserted.
        found = invitations.find_one_and_update(query, update, upsert=True, return_document=ReturnDocument.AFTER)
    assert found is not None  # an upsert returning the document after it always has one
    return dict(found)


def team_invitations(team_id: ObjectId, now: datetime) -> list[dict[str, Any]]:
    """The team's invitations not yet accepted, declined, withdrawn or expired, by email."""
    query = {"teamId": team_id, "expiresAt": {"$gt": now}}
    return list(get_db().invitations.find(query).sort("email", 1).limit(1000))


def invitations_for(email: str, now: datetime) -> list[dict[str, Any]]:
    """The invitations waiting for this email, newest first."""
    query = {"email": email.strip().lower(), "expiresAt": {"$gt": now}}
    return list(get_db().invitations.find(query).sort("_id", -1).limit(100))


def take_invitation(invitation_id: ObjectId, email: str, now: datetime) -> dict[str, Any] | None:
    """Remove and return the invitation if it is for this email and has not expired."""
    query = {"_id": invitation_id, "email": email.strip().lower(), "expiresAt": {"$gt": now}}
    return get_db().invitations.find_one_and_delete(query)


def delete_team_invitation(team_id: ObjectId, invitation_id: ObjectId) -> dict[str, Any] | None:
    """Withdraw one of the team's invitations; None when the team has no such invitation."""
    return get_db().invitations.find_one_and_delete({"_id": invitation_id, "teamId": team_id})
