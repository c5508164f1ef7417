"""Accounts, teams, memberships and API keys."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any

from bson import ObjectId
from pymongo.errors import DuplicateKeyError
from werkzeug.security import check_password_hash, generate_password_hash

from ..permissions import ROLES
from ..repositories import accounts as repo
from ..responses import ApiError
from ..timeutil import utcnow

API_KEY_PREFIX = "ak_"
LAST_USED_GRANULARITY = timedelta(minutes=1)
# A hash to compare against when the email is unknown, so a miss costs as long as a wrong password.
_DUMMY_HASH = generate_password_hash("not-a-real-password")


def create_account(email: str, password: str, name: str | None = None) -> dict[str, Any]:
    """A new account with a hashed password; 409 when the email is taken."""
    if len(password) < 8:
        raise ApiError(400, "Password must be at least 8 characters.", {"password": ["Too short."]})
    try:
        return repo.insert_account(email, name or email.split("@")[0], generate_password_hash(password))
    except DuplicateKeyError:
        raise ApiError(409, f"An account with email {email} already exists.") from None


def authenticate(email: str, password: str) -> dict[str, Any] | None:
    """The account when the password matches; None otherwise (same cost either way)."""
    doc = repo.find_account_by_email(email)
    if doc is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    return doc if check_password_hash(doc["passwordHash"], password) else None


def ensure_team(team_name: str) -> dict[str, Any]:
    """The team with this name, created with its own org when new."""
    return repo.find_team_by_name(team_name) or repo.insert_org_and_team(team_name)


def add_member(team_id: ObjectId, email: str, role: str) -> dict[str, Any]:
    """Give the account `role` on the team; 400 for an unknown role, 404 for an unknown account or team."""
    if role not in ROLES:
        raise ApiError(400, f"Unknown role {role!r}; choose one of {', '.join(ROLES)}.")
    if repo.find_team(team_id) is None:
        raise ApiError(404, "No such team.")
    account = repo.find_account_by_email(email)
    if account is None:
        raise ApiError(404, f"No account with email {email}.")
    updated = repo.set_membership(account["_id"], team_id, role)
    assert updated is not None
    return updated


def _hash_key(key: str) -> str:
    # API keys carry 256 bits of randomness, so a fast hash suffices and keeps per-request checks cheap.
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(account_id: ObjectId, name: str) -> tuple[dict[str, Any], str]:
    """A new key for the account: the stored record and the key itself, which is shown only now."""
    lookup = secrets.token_hex(6)
    key = f"{API_KEY_PREFIX}{lookup}_{secrets.token_urlsafe(32)}"
    return repo.insert_api_key(account_id, name, lookup, _hash_key(key)), key


def verify_api_key(key: str) -> dict[str, Any] | None:
    """The owning account for a valid, unrevoked key (recording its use), else None."""
    if not key.startswith(API_KEY_PREFIX):
        return None
    lookup = key[len(API_KEY_PREFIX) :].split("_", 1)[0]
    record = repo.find_api_key_by_lookup(lookup)
    if record is None or record.get("revokedAt") or not hmac.compare_digest(record["keyHash"], _hash_key(key)):
        return None
    now = utcnow()
    last_used = record.get("lastUsedAt")
    if last_used is None or now - last_used > LAST_USED_GRANULARITY:
        # Record use at most once a minute per key: a write on every request would cost more than it tells.
        repo.touch_api_key(record["_id"], now)
    return repo.find_account(record["accountId"])


def revoke_api_key(account_id: ObjectId, key_id: ObjectId) -> dict[str, Any]:
    """Revoke one of the account's keys (idempotent); 404 when it has no such key."""
    record = repo.revoke_api_key(account_id, key_id)
    if record is None:
        raise ApiError(404, "No such API key.")
    return record
