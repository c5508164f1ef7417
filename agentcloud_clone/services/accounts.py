"""Accounts, sign-ins, teams, memberships and API keys."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bson import ObjectId
from flask import current_app
from pymongo.errors import DuplicateKeyError
from werkzeug.security import check_password_hash, generate_password_hash

from .. import credentials
from ..access import ROLES
from ..errors import Conflict, InvalidInput, NotFound, PermissionDenied
from ..repositories import accounts as repo
from ..timeutil import utcnow

API_KEY_PREFIX = "ak_"
LAST_USED_GRANULARITY = timedelta(minutes=1)
# Sign-ins kept per account (each browser that signed in holds one); older ones are signed out.
SIGNINS_KEPT = 20
_dummy_hashes: dict[str, str] = {}


def _off_the_loop[R](function: Callable[..., R], *args: Any) -> R:
    """Run CPU-heavy work (password hashing) outside gevent's event loop when the app is served by gevent
    workers, so one sign-in does not stall every open live stream of the process."""
    try:
        from gevent import get_hub, monkey
    except ImportError:
        return function(*args)
    if not monkey.is_module_patched("threading"):
        return function(*args)
    result: R = get_hub().threadpool.apply(function, args)
    return result


def _password_method() -> str:
    return str(current_app.config["PASSWORD_HASH_METHOD"])


def _dummy_hash() -> str:
    """A hash to compare against when the email is unknown, so a miss costs as long as a wrong password."""
    method = _password_method()
    if method not in _dummy_hashes:
        _dummy_hashes[method] = generate_password_hash("not-a-real-password", method=method)
    return _dummy_hashes[method]


MIN_PASSWORD_LENGTH = 8


def _check_new_password(password: str, field: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"Password must be at least {MIN_PASSWORD_LENGTH} characters.", {field: ["Too short."]})


def create_account(email: str, password: str, name: str | None = None) -> dict[str, Any]:
    """A new account with a hashed password; Conflict when the email is taken."""
    _check_new_password(password, "password")
    try:
        password_hash = _off_the_loop(generate_password_hash, password, _password_method())
        return repo.insert_account(email, name or email.split("@")[0], password_hash)
    except DuplicateKeyError:
        raise Conflict(f"An account with email {email} already exists.") from None


def authenticate(email: str, password: str) -> dict[str, Any] | None:
    """The account when the password matches; None otherwise (same cost either way)."""
    doc = repo.find_account_by_email(email)
    if doc is None:
        _off_the_loop(check_password_hash, _dummy_hash(), password)
        return None
    return doc if _off_the_loop(check_password_hash, doc["passwordHash"], password) else None


def start_signin(account_id: ObjectId, remember: bool) -> str:
    """Record a new sign-in and return its id, which the session (and remember) cookie carries."""
    signin_id = secrets.token_urlsafe(16)
    repo.add_signin(account_id, {"id": signin_id, "at": utcnow(), "remember": remember}, SIGNINS_KEPT)
    return signin_id


def change_password(account_id: ObjectId, current: str, new: str, *, remember: bool) -> str:
    """Replace the account's password, given the current one, and sign out every browser: the sign-in that asked
    is replaced by a new one, whose id is returned. NotSignedIn-like refusal (PermissionDenied) for a wrong
    current password, so a borrowed unlocked browser cannot lock its owner out."""
    doc = repo.find_account(account_id)
    if doc is None or not _off_the_loop(check_password_hash, doc["passwordHash"], current):
        raise PermissionDenied("The current password is wrong.", {"currentPassword": ["Wrong password."]})
    _check_new_password(new, "newPassword")
    if new == current:
        raise InvalidInput("Choose a new password other than the current one.", {"newPassword": ["Unchanged."]})
    signin_id = secrets.token_urlsafe(16)
    password_hash = _off_the_loop(generate_password_hash, new, _password_method())
    repo.set_password(account_id, password_hash, {"id": signin_id, "at": utcnow(), "remember": remember})
    return signin_id


def end_signin(account_id: ObjectId, signin_id: str | None) -> None:
    """Sign out one browser: its cookies stop working everywhere, replayed or not."""
    if signin_id:
        repo.remove_signins(account_id, signin_id)


def end_all_signins(account_id: ObjectId) -> None:
    """Sign the account out of every browser (sign out everywhere, or after a password change)."""
    repo.remove_signins(account_id)


def signin_remembered(account_id: ObjectId, signin_id: str | None) -> bool:
    """Whether this sign-in asked to be kept ("Keep me signed in")."""
    doc = repo.find_account(account_id) or {}
    return any(s.get("id") == signin_id and s.get("remember") for s in doc.get("signins", []))


def account_for_signin(account_id: ObjectId, signin_id: str) -> dict[str, Any] | None:
    """The account, if this sign-in of it is still valid."""
    doc = _account(account_id)
    if doc is None or not any(s.get("id") == signin_id for s in doc.get("signins", [])):
        return None
    return doc


def _account(account_id: ObjectId) -> dict[str, Any] | None:
    """The account as authentication sees it: kept by this process while no credential changed (credentials.py)."""
    return credentials.lookup("account", str(account_id), lambda: repo.find_account(account_id))


# The teams' own turn slots, as this process last read them: (read at, slots or None for the default).
_turn_slots: dict[ObjectId, tuple[float, int | None]] = {}
TURN_SLOTS_KEPT_FOR = 30.0


def team_turn_slots(team_id: ObjectId) -> int:
    """How many of a team's turns may hold the workers at once: the team's own `maxActiveTurns`, set by an
    operator, else TEAM_MAX_ACTIVE_TURNS. Read at most every TURN_SLOTS_KEPT_FOR seconds per process."""
    now = time.monotonic()
    read_at, slots = _turn_slots.get(team_id, (float("-inf"), None))
    if now - read_at > TURN_SLOTS_KEPT_FOR:
        team = repo.find_team_fields(team_id, {"maxActiveTurns": 1}) or {}
        slots = team.get("maxActiveTurns")
        _turn_slots[team_id] = (now, slots)
    return int(slots) if slots else int(current_app.config["TEAM_MAX_ACTIVE_TURNS"])


def set_team_turn_slots(team_id: ObjectId, slots: int | None) -> dict[str, Any]:
    """The operator's setting of a team's turn slots (None: the deployment's default); not a team admin's."""
    if slots is not None and not 1 <= slots <= 10_000:
        raise InvalidInput("A team's turn slots are 1 to 10,000.")
    get_team(team_id)
    changes = {"maxActiveTurns": slots} if slots is not None else {}
    team = repo.update_team(team_id, changes) if changes else repo.unset_team_fields(team_id, ["maxActiveTurns"])
    _turn_slots.pop(team_id, None)
    assert team is not None
    return team


def get_team(team_id: ObjectId) -> dict[str, Any]:
    """The team; NotFound when there is none."""
    team = repo.find_team(team_id)
    if team is None:
        raise NotFound("No such team.")
    return team


def edit_team(team_id: ObjectId, changes: dict[str, Any]) -> dict[str, Any]:
    """Rename a team or set its default limits (each app's own limits win over them)."""
    if not changes:
        return get_team(team_id)
    team = repo.update_team(team_id, changes)
    if team is None:
        raise NotFound("No such team.")
    return team


def ensure_team(team_name: str) -> dict[str, Any]:
    """The team with this name, created with its own org when new."""
    return repo.find_team_by_name(team_name) or repo.insert_org_and_team(team_name)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidInput(f"Unknown role {role!r}; choose one of {', '.join(ROLES)}.", {"role": ["Unknown role."]})


def _check_role_on_team(team_id: ObjectId, role: str) -> None:
    """InvalidInput for an unknown role, NotFound for a team that is not there."""
    _check_role(role)
    if repo.find_team(team_id) is None:
        raise NotFound("No such team.")


def _check_grant(granted_by: str | None, current: str | None, new: str | None) -> None:
    """Only owners make, unmake or remove owners; anyone else managing the team handles the other roles.
    `granted_by` None is the operator (CLI), who may do anything."""
    if granted_by is not None and granted_by != "owner" and "owner" in (current, new):
        raise PermissionDenied("Only an owner can grant, change or remove the owner role.")


def add_member(team_id: ObjectId, email: str, role: str, *, granted_by: str | None = None) -> dict[str, Any]:
    """Give the account `role` on the team (or change its role there); takes effect on its next request.

    `granted_by` is the role of whoever grants it (None for the operator's CLI)."""
    _check_role_on_team(team_id, role)
    account = repo.find_account_by_email(email)
    if account is None:
        raise NotFound(f"No account with email {email}.")
    return set_member_role(team_id, account, role, granted_by=granted_by)


INVITATION_LIFETIME = timedelta(days=7)


def invite_member(
    team_id: ObjectId, email: str, role: str, *, granted_by: str | None, invited_by: ObjectId | None
) -> tuple[str, dict[str, Any]]:
    """Offer `email` a role on the team: ("invited", the invitation), which its account accepts or declines on
    its account page (valid INVITATION_LIFETIME). For an account already on the team the role changes at once:
    ("member", the account). Whether any account has the email is not told: the answer for an email nobody
    has is the same as for someone else's, so a team admin cannot learn who has an account here, nor put
    anyone on a team without their consent. `granted_by` is the inviter's role (only owners offer `owner`)."""
    _check_role_on_team(team_id, role)
    email = email.strip().lower()
    account = repo.find_account_by_email(email)
    if account is not None and account_role(account, team_id) is not None:
        return "member", set_member_role(team_id, account, role, granted_by=granted_by)
    _check_grant(granted_by, None, role)
    return "invited", repo.upsert_invitation(team_id, email, role, invited_by, utcnow(), INVITATION_LIFETIME)


def team_invitations(team_id: ObjectId) -> list[dict[str, Any]]:
    """The team's invitations waiting for an answer."""
    return repo.team_invitations(team_id, utcnow())


def invitations_for(email: str) -> list[dict[str, Any]]:
    """The invitations waiting for this account's email, each with its team's name."""
    invitations = repo.invitations_for(email, utcnow())
    if not invitations:
        return []  # the common case, on every account page: no second read
    names = {t["_id"]: t["name"] for t in repo.find_teams(list({i["teamId"] for i in invitations}))}
    return [{**i, "teamName": names[i["teamId"]]} for i in invitations if i["teamId"] in names]


def accept_invitation(account_id: ObjectId, email: str, invitation_id: ObjectId) -> dict[str, Any]:
    """Join the team an invitation for this account's email offers, with its role (an account already on the
    team keeps its role); returns the invitation. NotFound when there is no such invitation for the account."""
    invitation = repo.take_invitation(invitation_id, email, utcnow())
    if invitation is None or repo.find_team(invitation["teamId"]) is None:
        raise NotFound("No such invitation for you (it may have been withdrawn, or have expired).")
    account = repo.find_account(account_id)
    if account is not None and account_role(account, invitation["teamId"]) is None:
        repo.set_membership(account_id, invitation["teamId"], invitation["role"])
    return invitation


def decline_invitation(email: str, invitation_id: ObjectId) -> None:
    """Turn down an invitation for this account's email; NotFound when there is none."""
    if repo.take_invitation(invitation_id, email, utcnow()) is None:
        raise NotFound("No such invitation for you (it may have been withdrawn, or have expired).")


def withdraw_invitation(team_id: ObjectId, invitation_id: ObjectId) -> None:
    """Take back one of the team's invitations; NotFound when the team has no such invitation."""
    if repo.delete_team_invitation(team_id, invitation_id) is None:
        raise NotFound("No such invitation in this team.")


def set_member_role(
    team_id: ObjectId, account: dict[str, Any], role: str, *, granted_by: str | None = None
) -> dict[str, Any]:
    """Set an account's role on the team; a team keeps at least one owner."""
    _check_role(role)
    current = account_role(account, team_id)
    _check_grant(granted_by, current, role)
    if current == "owner" and role != "owner":
        _keep_an_owner(team_id)
    updated = repo.set_membership(account["_id"], team_id, role)
    if updated is None:
        raise NotFound("No such account.")
    return updated


def member(team_id: ObjectId, account_id: ObjectId) -> dict[str, Any]:
    """A member of the team; NotFound for anyone else."""
    account = repo.find_account(account_id)
    if account is None or account_role(account, team_id) is None:
        raise NotFound("No such member of this team.")
    return account


def remove_member(team_id: ObjectId, account: dict[str, Any], *, granted_by: str | None = None) -> dict[str, Any]:
    """Take the account off the team; takes effect on its next request. A team keeps at least one owner."""
    current = account_role(account, team_id)
    if current is None:
        raise NotFound("No such member of this team.")
    _check_grant(granted_by, current, None)
    if current == "owner":
        _keep_an_owner(team_id)
    updated = repo.remove_membership(account["_id"], team_id)
    if updated is None:
        raise NotFound("No such member of this team.")
    return updated


def account_role(account: dict[str, Any], team_id: ObjectId) -> str | None:
    """The account document's role on the team, or None."""
    return next((m["role"] for m in account.get("teams", []) if m["teamId"] == team_id), None)


def _keep_an_owner(team_id: ObjectId) -> None:
    if repo.count_team_owners(team_id) <= 1:
        raise Conflict("A team needs at least one owner; make someone else owner first.")


def team_members(team_id: ObjectId) -> list[dict[str, Any]]:
    """The team's members with their role there, by email."""
    return [{**doc, "role": account_role(doc, team_id)} for doc in repo.team_members(team_id)]


def _hash_key(key: str) -> str:
    # API keys carry 256 bits of randomness, so a fast hash suffices and keeps per-request checks cheap.
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(account_id: ObjectId, name: str) -> tuple[dict[str, Any], str]:
    """A new key for the account: the stored record and the key itself, which is shown only now."""
    lookup = secrets.token_hex(6)
    key = f"{API_KEY_PREFIX}{lookup}_{secrets.token_urlsafe(32)}"
    return repo.insert_api_key(account_id, name, lookup, _hash_key(key)), key


def verify_api_key(key: str) -> tuple[dict[str, Any], ObjectId] | None:
    """The owning account and the key's id for a valid, unrevoked key (recording its use), else None."""
    if not key.startswith(API_KEY_PREFIX):
        return None
    lookup = key[len(API_KEY_PREFIX) :].split("_", 1)[0]
    record = credentials.lookup("api_key", lookup, lambda: repo.find_api_key_by_lookup(lookup))
    if record is None or record.get("revokedAt") or not hmac.compare_digest(record["keyHash"], _hash_key(key)):
        return None
    now = utcnow()
    last_used = record.get("lastUsedAt")
    if last_used is None or now - last_used > LAST_USED_GRANULARITY:
        # Record use at most once a minute per key: a write on every request would cost more than it tells.
        repo.touch_api_key(record["_id"], now)
        credentials.remember("api_key", lookup, {**record, "lastUsedAt": now})
    account = _account(record["accountId"])
    return (account, record["_id"]) if account else None


def revoke_api_key(account_id: ObjectId, key_id: ObjectId) -> dict[str, Any]:
    """Revoke one of the account's keys (idempotent); NotFound when it has no such key."""
    record = repo.revoke_api_key(account_id, key_id)
    if record is None:
        raise NotFound("No such API key.")
    return record
