"""Who is calling: cookie sign-in (flask-login), API keys, and the CSRF policy for cookie-authenticated posts.

A sign-in is recorded on the account (`signins`), and its id travels in the session and remember cookies:
signing out removes it, so a cookie captured before sign-out no longer authenticates anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, current_app, g, request
from flask_login import LoginManager, current_user
from flask_wtf.csrf import CSRFError, CSRFProtect, validate_csrf
from flask_wtf.csrf import ValidationError as CSRFTokenInvalid
from pymongo.errors import PyMongoError

from ..access import Account, Permission, has_permission
from ..db import note_failure
from ..errors import NotSignedIn, Unavailable
from ..ids import parse_object_id
from ..services import accounts as accounts_service

login_manager = LoginManager()
csrf = CSRFProtect()
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sign-in forms are checked even though nobody is signed in yet, against login CSRF.
LOGIN_ENDPOINTS = frozenset({"account.login", "account.login_json"})
DATABASE_DOWN = "The database is unavailable; try again shortly."
HOW_TO_SEND_TOKEN = (
    "send the X-CSRFToken header with the csrf value of any .json response (or the csrf_token field of a form)"
)


def _fail_fast_when_database_is_down[F: Callable[..., Any]](loader: F) -> F:
    """Turn a MongoDB outage into one quick 503: the first failed lookup is remembered for the request, so
    later `current_user` reads (CSRF, rate limit, view) do not each wait out the server-selection timeout."""

    @functools.wraps(loader)
    def wrapper(*args: Any) -> Any:
        if getattr(g, "auth_database_down", False):
            raise Unavailable(DATABASE_DOWN)
        try:
            return loader(*args)
        except PyMongoError as exc:
            g.auth_database_down = True
            note_failure(exc)  # the next requests of this process fail at once, until MongoDB answers again
            raise Unavailable(DATABASE_DOWN) from None

    return wrapper  # type: ignore[return-value]


@login_manager.user_loader
@_fail_fast_when_database_is_down
def _load_user(cookie_id: str) -> Account | None:
    account_id, _, signin_id = str(cookie_id).partition(":")
    oid = parse_object_id(account_id)
    doc = accounts_service.account_for_signin(oid, signin_id) if oid and signin_id else None
    return Account(doc, signin_id=signin_id) if doc else None


@login_manager.request_loader
@_fail_fast_when_database_is_down
def _load_user_from_api_key(req: Any) -> Account | None:
    header = req.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    found = accounts_service.verify_api_key(key.strip())
    if found is None:
        # A wrong key is an error of its own, not a fall-back to anonymous.
        g.bad_api_key = True
        return None
    doc, key_id = found
    g.auth_via_api_key = True
    return Account(doc, api_key_id=key_id)


@login_manager.unauthorized_handler
def _unauthorized() -> Any:
    if getattr(g, "bad_api_key", False):
        raise NotSignedIn("Invalid or revoked API key.")
    raise NotSignedIn("Sign in required.")


def api_key_in_use() -> bool:
    """True when this request was authenticated by an API key rather than a cookie."""
    return bool(getattr(g, "auth_via_api_key", False))


def _same_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    own = urlsplit(request.host_url)
    if (parts.scheme, parts.netloc) == (own.scheme, own.netloc):
        return True
    return origin.rstrip("/") in {o.rstrip("/") for o in current_app.config["TRUSTED_ORIGINS"]}


def _agentcloud_token() -> str | None:
    """Agentcloud's UI sends the CSRF token as a `_csrf` field of the body (JSON or form)."""
    if request.is_json:
        body = request.get_json(silent=True)
        token = body.get("_csrf") if isinstance(body, dict) else None
    else:
        token = request.form.get("_csrf")
    return token if isinstance(token, str) and token else None


def _enforce_csrf() -> None:
    """Cookie-authenticated unsafe requests need a token; JSON from our own origin may use the Origin check.

    A refusal says which of the three (token, Origin, JSON content type) was missing and how to send it."""
    if request.method in SAFE_METHODS:
        return
    authenticated = current_user.is_authenticated  # runs the loaders, so API keys are known here
    if api_key_in_use():
        return
    if not authenticated and request.endpoint not in LOGIN_ENDPOINTS:
        return  # nothing to forge without a session; the view answers 401
    require_csrf(authenticated)


def require_csrf(authenticated: bool = True) -> None:
    """The CSRF check of a request that carries an ambient credential (a cookie): a token (header, form field, or
    Agentcloud's `_csrf` body field), or JSON whose Origin is this site."""
    if g.get("csrf_valid"):
        return
    token = request.headers.get("X-CSRFToken") or request.headers.get("X-CSRF-Token")
    if token or (not request.is_json and "csrf_token" in request.form):
        csrf.protect()
        return
    agentcloud_token = _agentcloud_token()
    if agentcloud_token is not None:
        try:
            validate_csrf(agentcloud_token)
        except CSRFTokenInvalid as exc:
            raise CSRFError(f"the _csrf field is not valid ({exc.args[0]}); {HOW_TO_SEND_TOKEN}.") from None
        g.csrf_valid = True
        return
    origin = request.headers.get("Origin")
    if request.is_json:
        if not authenticated or (origin and _same_origin(origin)):
            # A cross-site page cannot send a JSON body without a CORS preflight, which this app never grants.
            return
        if origin:
            raise CSRFError(f"the Origin {origin} is not this site; {HOW_TO_SEND_TOKEN}, or call from this site.")
        raise CSRFError(f"the CSRF token is missing; {HOW_TO_SEND_TOKEN}, or send an Origin header naming this site.")
    raise CSRFError(
        f"the CSRF token is missing; {HOW_TO_SEND_TOKEN}, or send a JSON body "
        "(Content-Type: application/json) with an Origin header naming this site."
    )


def init_app(app: Flask) -> None:
    """Bind flask-login and the CSRF policy."""
    login_manager.init_app(app)
    login_manager.login_view = "account.login"
    app.config.setdefault("WTF_CSRF_CHECK_DEFAULT", False)
    app.config.setdefault("WTF_CSRF_TIME_LIMIT", None)
    csrf.init_app(app)
    app.before_request(_enforce_csrf)

    @app.context_processor
    def _template_helpers() -> dict[str, Any]:
        return {"has_permission": has_permission, "Permission": Permission}
