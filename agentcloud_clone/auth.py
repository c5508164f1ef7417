"""Who is calling: cookie sign-in, API keys, CSRF policy, and the team permission check."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from bson import ObjectId
from flask import Flask, current_app, g, request
from flask_login import UserMixin, current_user
from flask_wtf.csrf import CSRFError
from pymongo.errors import PyMongoError

from .extensions import api_key_in_use, csrf, login_manager
from .permissions import Permission, permissions_for
from .repositories import accounts as accounts_repo
from .responses import ApiError
from .schemas import parse_object_id

F = TypeVar("F", bound=Callable[..., Any])
DATABASE_DOWN = "The database is unavailable; try again shortly."
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sign-in forms are checked even though nobody is signed in yet, against login CSRF.
LOGIN_ENDPOINTS = frozenset({"auth.login", "auth.login_json"})


class Account(UserMixin):
    """A signed-in account and its team memberships."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.id = str(doc["_id"])
        self.object_id: ObjectId = doc["_id"]
        self.email: str = doc["email"]
        self.name: str = doc.get("name") or doc["email"]
        self.roles: dict[ObjectId, str] = {m["teamId"]: m["role"] for m in doc.get("teams", [])}

    @property
    def team_ids(self) -> list[ObjectId]:
        return list(self.roles)

    def role_in(self, team_id: ObjectId) -> str | None:
        """The account's role on the team, or None when not a member."""
        return self.roles.get(team_id)


def _fail_fast_when_database_is_down[F: Callable[..., Any]](loader: F) -> F:
    """Turn a MongoDB outage into one quick 503: the first failed lookup is remembered for the request, so
    later `current_user` reads (CSRF, rate limit, view) do not each wait out the server-selection timeout."""

    @functools.wraps(loader)
    def wrapper(*args: Any) -> Any:
        if getattr(g, "auth_database_down", False):
            raise ApiError(503, DATABASE_DOWN)
        try:
            return loader(*args)
        except PyMongoError:
            g.auth_database_down = True
            raise ApiError(503, DATABASE_DOWN) from None

    return wrapper  # type: ignore[return-value]


@login_manager.user_loader
@_fail_fast_when_database_is_down
def _load_user(account_id: str) -> Account | None:
    oid = parse_object_id(account_id)
    doc = accounts_repo.find_account(oid) if oid else None
    return Account(doc) if doc else None


@login_manager.request_loader
@_fail_fast_when_database_is_down
def _load_user_from_api_key(req: Any) -> Account | None:
    header = req.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    from .services.accounts import verify_api_key

    doc = verify_api_key(key.strip())
    if doc is None:
        # A wrong key is an error of its own, not a fall-back to anonymous.
        g.bad_api_key = True
        return None
    g.auth_via_api_key = True
    return Account(doc)


@login_manager.unauthorized_handler
def _unauthorized() -> Any:
    if getattr(g, "bad_api_key", False):
        raise ApiError(401, "Invalid or revoked API key.")
    raise ApiError(401, "Sign in required.")


def current_account() -> Account:
    """The signed-in account; raises 401 when there is none."""
    if not current_user.is_authenticated:
        _unauthorized()
    return current_user  # type: ignore[return-value]


def _same_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    own = urlsplit(request.host_url)
    if (parts.scheme, parts.netloc) == (own.scheme, own.netloc):
        return True
    return origin.rstrip("/") in {o.rstrip("/") for o in current_app.config["TRUSTED_ORIGINS"]}


def _enforce_csrf() -> None:
    """Cookie-authenticated unsafe requests need a token; JSON from our own origin may use the Origin check."""
    if request.method in SAFE_METHODS:
        return
    authenticated = current_user.is_authenticated  # runs the loaders, so API keys are known here
    if api_key_in_use():
        return
    if not authenticated and request.endpoint not in LOGIN_ENDPOINTS:
        return  # nothing to forge without a session; the view answers 401
    token = request.headers.get("X-CSRFToken") or request.headers.get("X-CSRF-Token")
    if token or (not request.is_json and "csrf_token" in request.form):
        csrf.protect()
        return
    origin = request.headers.get("Origin")
    if request.is_json and (not authenticated or (origin and _same_origin(origin))):
        # A cross-site page cannot send a JSON body without a CORS preflight, which this app never grants.
        return
    raise CSRFError("The CSRF token is missing.")


def require_team(permission: Permission) -> Callable[[F], F]:
    """Resolve `resourceSlug` to a team the caller belongs to and holds `permission` on; passes `team`."""

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, resourceSlug: str, **kwargs: Any) -> Any:
            team_id = parse_object_id(resourceSlug)
            if team_id is None:
                raise ApiError(400, "Invalid team id: expected 24 hexadecimal characters.")
            account = current_account()
            role = account.role_in(team_id)
            team = accounts_repo.find_team(team_id) if role else None
            if team is None:
                raise ApiError(403, "You are not a member of this team.")
            if not permissions_for(role) & permission:
                raise ApiError(403, f"Your role ({role}) does not allow this.")
            g.team, g.role = team, role
            return view(*args, team=team, **kwargs)

        wrapper.required_permission = permission  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


def declares_permission(permission: Permission) -> Callable[[F], F]:
    """Record the permission a view checks itself (for views not under a team slug), for audits and tests."""

    def decorator(view: F) -> F:
        view.required_permission = permission  # type: ignore[attr-defined]
        return view

    return decorator


def has_permission(team_id: ObjectId, permission: Permission) -> bool:
    """Whether the signed-in account holds `permission` on the team (for templates and services)."""
    if not current_user.is_authenticated:
        return False
    role = current_user.role_in(team_id)
    return bool(role and permissions_for(role) & permission)


def init_app(app: Flask) -> None:
    """Bind flask-login and the CSRF policy."""
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    app.config.setdefault("WTF_CSRF_CHECK_DEFAULT", False)
    app.config.setdefault("WTF_CSRF_TIME_LIMIT", None)
    csrf.init_app(app)
    app.before_request(_enforce_csrf)

    @app.errorhandler(CSRFError)
    def _csrf_error(exc: CSRFError) -> Any:
        from .responses import error_response

        return error_response(403, f"CSRF check failed: {exc.description}")

    @app.context_processor
    def _template_helpers() -> dict[str, Any]:
        return {"has_permission": has_permission, "Permission": Permission}
