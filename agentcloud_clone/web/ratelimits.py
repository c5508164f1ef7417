"""Rate limits: the limiter, whose counters live in Redis so every web instance shares them, the keys
requests are counted by, and the markers views carry. Every setting comes through Config.

- Cancel: CANCEL_RATE_LIMIT per user, one budget shared by every cancel route of both API families.
- Sign-in: only failed attempts count, per address and target account together (LOGIN_RATE_LIMIT) and per
  address over all accounts (LOGIN_ADDRESS_RATE_LIMIT), so a stranger cannot lock an owner out from
  elsewhere, and a successful sign-in never uses up the budget. A password change's wrong current passwords
  count the same way (LOGIN_RATE_LIMIT per user).
- Shared routes (`/s/<team>/...`, open to anyone holding a public app's link): SHARE_RATE_LIMIT per address for
  every request, and SHARE_START_RATE_LIMIT per address for those that start a turn.
- Everything else: DEFAULT_RATE_LIMIT per user, or per address for anonymous callers. Probes are exempt.

flask-limiter keeps its storage on the Limiter itself, so each app gets its own: two apps in one process
(tests, or a web app beside a worker) must not share counters or settings.

When Redis is unreachable the limiter counts in process memory (flask-limiter's fallback) until Redis answers
again. Its connections are the product's guarded ones (queueing.limiter_pool): while this process knows Redis is
away they fail without touching the network, so the switch to memory costs a request nothing, not a timeout.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from flask_limiter import Limiter
from flask_login import current_user

from ..errors import Unavailable
from ..queueing import limiter_pool
from . import probes

LIMITER_EXTENSION = "agentcloud_limiter"


def user_key() -> str:
    """Limits count per signed-in user (cookie or API key), per address otherwise."""
    try:
        if current_user.is_authenticated:
            return f"user:{current_user.id}"
    except Unavailable:
        pass  # the caller cannot be known right now (database down); the view will answer that
    return f"ip:{client_address()}"


def client_address() -> str:
    """The client's address as limits count it: an IPv6 client by its /64 (one subscriber's network, whose
    addresses it may change at will), an IPv4 one by its address. Behind the operator's proxies, the address they
    saw (TRUSTED_PROXY_HOPS)."""
    address = request.remote_addr or ""
    try:
        ip = ipaddress.ip_address(_without_port(address).split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _without_port(address: str) -> str:
    """`203.0.113.5:4711` or `[2001:db8::1]:4711` (some proxies add the client's port) without the port."""
    if address.startswith("[") and "]" in address:
        return address[1 : address.index("]")]
    host, colon, port = address.rpartition(":")
    return host if colon and port.isdigit() and "." in host and ":" not in host else address


def address_key() -> str:
    """Per client address."""
    return f"ip:{client_address()}"


def login_target_key() -> str:
    """Sign-in attempts per address and target account together."""
    data: Any = request.get_json(silent=True) if request.is_json else request.form
    email = data.get("email") if isinstance(data, dict) or hasattr(data, "getlist") else None
    return f"login:{client_address()}:{str(email or '').strip().lower()[:320]}"


def _failed_sign_in(response: Response) -> bool:
    return response.status_code in (400, 401)


def rate_limited[F: Callable[..., Any]](
    setting: str,
    *,
    scope: str,
    key_func: Callable[[], str] | None = None,
    deduct_when: Callable[[Response], bool] | None = None,
    methods: tuple[str, ...] = ("POST",),
) -> Callable[[F], F]:
    """Mark a view as limited by `app.config[setting]` (for `methods`); views marked with the same scope share one
    budget."""

    def decorator(view: F) -> F:
        limits = list(getattr(view, "rate_limits", []))
        limits.append((setting, scope, key_func, deduct_when, methods))
        view.rate_limits = limits  # type: ignore[attr-defined]
        return view

    return decorator


# One budget for every cancel route, both API families, per user.
cancel_limit = rate_limited("CANCEL_RATE_LIMIT", scope="cancel")
# Bulk cancels, per user, both families: each request may cancel thousands of sessions.
bulk_cancel_limit = rate_limited("BULK_CANCEL_RATE_LIMIT", scope="bulk-cancel")
# Every shared route, per address, reads included; and, tighter, those that start a turn.
share_limit = rate_limited("SHARE_RATE_LIMIT", scope="share", key_func=address_key, methods=("GET", "POST"))
share_start_limit = rate_limited("SHARE_START_RATE_LIMIT", scope="share-start", key_func=address_key)


def _wrong_password(response: Response) -> bool:
    return response.status_code == 403


# Wrong current passwords on a password change, per user: a borrowed signed-in browser cannot guess its way.
password_change_limit = rate_limited(
    "LOGIN_RATE_LIMIT", scope="password-change", key_func=user_key, deduct_when=_wrong_password
)


def sign_in_limits[F: Callable[..., Any]](view: F) -> F:
    """Failed sign-ins: per address and account together, and per address over all accounts."""
    view = rate_limited("LOGIN_RATE_LIMIT", scope="login", key_func=login_target_key, deduct_when=_failed_sign_in)(view)
    return rate_limited(
        "LOGIN_ADDRESS_RATE_LIMIT", scope="login-address", key_func=address_key, deduct_when=_failed_sign_in
    )(view)


def init_app(app: Flask) -> Limiter:
    """Create the app's limiter and apply every view's `rate_limited` markers (call after the blueprints)."""
    uri = str(app.config.get("RATELIMIT_STORAGE_URI", ""))
    if uri.startswith(("redis://", "rediss://")):
        app.config["RATELIMIT_STORAGE_OPTIONS"] = {"connection_pool": limiter_pool(uri)}
    limiter = Limiter(key_func=user_key, app=app)
    # Probes and scrapes are not users: no limit, and no sign-in lookups on their hot path.
    limiter.exempt(probes.bp)
    shared: dict[str, Callable[[Any], Any]] = {}

    def setting_of(name: str) -> Callable[[], str]:
        return lambda: str(app.config[name])

    for endpoint, view in list(app.view_functions.items()):
        wrapped = view
        for setting, scope, key_func, deduct_when, methods in getattr(view, "rate_limits", []):
            if scope not in shared:
                shared[scope] = limiter.shared_limit(
                    setting_of(setting),
                    scope=scope,
                    key_func=key_func,
                    methods=list(methods),
                    deduct_when=deduct_when,
                )
            wrapped = shared[scope](wrapped)
        app.view_functions[endpoint] = wrapped
    app.extensions[LIMITER_EXTENSION] = limiter
    return limiter
