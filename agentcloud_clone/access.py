"""Who may do what: roles and their permissions, the signed-in account, and the loaders every route uses.

The rule order is the same on every route of both API families and on the pages: not signed in → 401;
a team slug that is not one of the caller's teams, or a role without the permission → 403; a malformed id
→ 400; an id that is not in the caller's team(s) → 404, the same whether it exists elsewhere or nowhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

from bson import ObjectId
from flask import g
from flask_login import current_user

from .errors import InvalidInput, NotFound, NotSignedIn, PermissionDenied
from .ids import parse_object_id
from .repositories import apps as apps_repo
from .repositories import sessions as sessions_repo
from .vocabulary import ActorKind, SharingMode


class Permission(IntFlag):
    """What a team member may do; a role is a set of these."""

    SESSION_VIEW = 1 << 0
    SESSION_CREATE = 1 << 1
    SESSION_CANCEL = 1 << 2
    SESSION_DELETE = 1 << 3
    APP_VIEW = 1 << 4
    APP_MANAGE = 1 << 5
    TEAM_MANAGE = 1 << 6
    SESSION_BULK_CANCEL = 1 << 7


_VIEWER = Permission.SESSION_VIEW | Permission.APP_VIEW
_MEMBER = _VIEWER | Permission.SESSION_CREATE | Permission.SESSION_CANCEL | Permission.SESSION_DELETE
_ADMIN = _MEMBER | Permission.APP_MANAGE | Permission.TEAM_MANAGE | Permission.SESSION_BULK_CANCEL

ROLE_PERMISSIONS: dict[str, Permission] = {
    "viewer": _VIEWER,
    "member": _MEMBER,
    "admin": _ADMIN,
    "owner": _ADMIN,
}
ROLES: tuple[str, ...] = tuple(ROLE_PERMISSIONS)


def permissions_for(role: str | None) -> Permission:
    """The permission bits of `role`; an unknown role (or none) grants nothing."""
    return ROLE_PERMISSIONS.get(role or "", Permission(0))


@dataclass(frozen=True)
class Actor:
    """Who did something, as recorded on what they did (a cancellation, say)."""

    kind: ActorKind
    account_id: ObjectId | None = None
    api_key_id: ObjectId | None = None

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Actor:
        """The actor from its stored form."""
        return cls(ActorKind(doc["kind"]), doc.get("accountId"), doc.get("apiKeyId"))

    def as_doc(self) -> dict[str, Any]:
        """The stored form: `{kind, accountId?, apiKeyId?}`."""
        doc: dict[str, Any] = {"kind": str(self.kind)}
        if self.account_id is not None:
            doc["accountId"] = self.account_id
        if self.api_key_id is not None:
            doc["apiKeyId"] = self.api_key_id
        return doc


SYSTEM = Actor(ActorKind.SYSTEM)


class Account:
    """A signed-in account, its team memberships, and the API key it came with (if any).

    It is flask-login's user object too: `is_authenticated`, `is_active`, `is_anonymous` and `get_id`."""

    is_authenticated = True
    is_active = True
    is_anonymous = False

    def __init__(
        self, doc: dict[str, Any], *, api_key_id: ObjectId | None = None, signin_id: str | None = None
    ) -> None:
        self.doc = doc
        self.id = str(doc["_id"])
        self.object_id: ObjectId = doc["_id"]
        self.email: str = doc["email"]
        self.name: str = doc.get("name") or doc["email"]
        self.roles: dict[ObjectId, str] = {m["teamId"]: m["role"] for m in doc.get("teams", [])}
        self.api_key_id = api_key_id
        self.signin_id = signin_id

    def get_id(self) -> str:
        """flask-login's cookie value: the account and the sign-in it belongs to (revoked at sign-out)."""
        return f"{self.id}:{self.signin_id}"

    @property
    def team_ids(self) -> list[ObjectId]:
        return list(self.roles)

    @property
    def actor(self) -> Actor:
        """This caller as the actor of what it does."""
        if self.api_key_id is not None:
            return Actor(ActorKind.API_KEY, self.object_id, self.api_key_id)
        return Actor(ActorKind.ACCOUNT, self.object_id)

    def role_in(self, team_id: ObjectId) -> str | None:
        """The account's role on the team, or None when not a member."""
        return self.roles.get(team_id)

    def can(self, team_id: ObjectId, permission: Permission) -> bool:
        """Whether the account holds `permission` on the team."""
        return bool(permissions_for(self.role_in(team_id)) & permission)

    def teams_with(self, permission: Permission) -> list[ObjectId]:
        """The teams on which the account holds `permission`."""
        return [team_id for team_id in self.roles if self.can(team_id, permission)]


def current_account() -> Account:
    """The signed-in account; NotSignedIn when there is none (or the credential was wrong)."""
    if not current_user.is_authenticated:
        if getattr(g, "bad_api_key", False):
            raise NotSignedIn("Invalid or revoked API key.")
        raise NotSignedIn("Sign in required.")
    return current_user  # type: ignore[no-any-return]


def has_permission(team_id: ObjectId, permission: Permission) -> bool:
    """Whether the signed-in account (if any) holds `permission` on the team (for templates)."""
    return bool(current_user.is_authenticated and current_user.can(team_id, permission))


def parse_id(value: Any, what: str) -> ObjectId:
    """The ObjectId spelled by `value` (or `value` itself when already one); InvalidInput naming `what` otherwise
    (never a route-miss 404)."""
    oid = value if isinstance(value, ObjectId) else parse_object_id(value)
    if oid is None:
        raise InvalidInput(f"Invalid {what} id: expected 24 hexadecimal characters.")
    return oid


def check_team(account: Account, resource_slug: Any, permission: Permission) -> ObjectId:
    """The team id in a `resourceSlug`, once the account is a member holding `permission` there."""
    team_id = parse_id(resource_slug, "team")
    role = account.role_in(team_id)
    if role is None:
        raise PermissionDenied("You are not a member of this team.")
    if not permissions_for(role) & permission:
        raise PermissionDenied(f"Your role ({role}) does not allow this.")
    return team_id


def _check_role(account: Account, team_id: ObjectId, permission: Permission) -> None:
    if not account.can(team_id, permission):
        raise PermissionDenied(f"Your role ({account.role_in(team_id)}) does not allow this.")


def may_see(account: Account, session: dict[str, Any]) -> bool:
    """Whether a member of the session's team may see it: a session of an `owner`-mode app only its creator."""
    mode = (session.get("sharingConfig") or {}).get("mode")
    return mode != SharingMode.OWNER or session.get("createdBy") == account.object_id


def session_for(
    account: Account, session_id: Any, permission: Permission, *, team_id: ObjectId | None = None
) -> dict[str, Any]:
    """The session, scoped to `team_id` (team routes) or to the account's teams, with the role checked; another
    member's session of an `owner`-mode app is not found."""
    sid = parse_id(session_id, "session")
    if team_id is not None:
        session = sessions_repo.find_session(team_id, sid)
        if session is None:
            raise NotFound("No such session in this team.")
    else:
        session = sessions_repo.find_session_in_teams(account.team_ids, sid)
        if session is None:
            raise NotFound("No session with this id in your teams.")
    if not may_see(account, session):
        raise NotFound(
            "No such session in this team." if team_id is not None else "No session with this id in your teams."
        )
    _check_role(account, session["teamId"], permission)
    return session


def app_for(
    account: Account, app_id: Any, permission: Permission, *, team_id: ObjectId | None = None
) -> dict[str, Any]:
    """The app, scoped to `team_id` or to the account's teams, with the role checked."""
    aid = parse_id(app_id, "app")
    teams = [team_id] if team_id is not None else account.team_ids
    app = next((found for team in teams if (found := apps_repo.find_app(team, aid))), None)
    if app is None:
        raise NotFound("No such app in this team." if team_id is not None else "No app with this id in your teams.")
    _check_role(account, app["teamId"], permission)
    return app


def require_team[F: Callable[..., Any]](permission: Permission) -> Callable[[F], F]:
    """Views under `/<resourceSlug>/`: the caller must be a member holding `permission`; passes `team_id`."""

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, resourceSlug: str, **kwargs: Any) -> Any:
            team_id = check_team(current_account(), resourceSlug, permission)
            g.team_id = team_id
            return view(*args, team_id=team_id, **kwargs)

        wrapper.required_permission = permission  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


def declares_permission[F: Callable[..., Any]](permission: Permission) -> Callable[[F], F]:
    """Views outside a team slug check their permission through the loaders; this records which one, for
    the security matrix and audits."""

    def decorator(view: F) -> F:
        view.required_permission = permission  # type: ignore[attr-defined]
        return view

    return decorator
