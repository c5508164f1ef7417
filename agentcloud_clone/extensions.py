"""Extension objects and the rate-limit markers views carry.

flask-login and flask-wtf keep their state on the app, so one module-level instance serves every app.
flask-limiter keeps its storage on the Limiter itself, so each app gets its own (see `bind_rate_limits`):
two apps in one process (tests, or a web app beside a worker) must not share counters or settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, g, request
from flask_limiter import Limiter
from flask_login import LoginManager, current_user
from flask_wtf.csrf import CSRFProtect

F = TypeVar("F", bound=Callable[..., Any])

login_manager = LoginManager()
csrf = CSRFProtect()


def rate_limit_key() -> str:
    """Limits count per signed-in user (cookie or API key), per address otherwise."""
    from .responses import ApiError

    try:
        if current_user.is_authenticated:
            return f"user:{current_user.id}"
    except ApiError:
        pass  # the caller cannot be known right now (database down); the view will answer that
    return f"ip:{request.remote_addr}"


def login_rate_limit_key() -> str:
    """Login attempts count per target account, so spreading them over addresses does not help."""
    data: Any = request.get_json(silent=True) if request.is_json else request.form
    email = data.get("email") if isinstance(data, dict) or hasattr(data, "getlist") else None
    return f"login:{str(email or '').strip().lower()[:320]}"


def address_key() -> str:
    return f"ip:{request.remote_addr}"


def rate_limited(setting: str, *, scope: str, key_func: Callable[[], str] | None = None) -> Callable[[F], F]:
    """Mark a view as limited by `app.config[setting]`; views marked with the same scope share one budget."""

    def decorator(view: F) -> F:
        limits = list(getattr(view, "rate_limits", []))
        limits.append((setting, scope, key_func))
        view.rate_limits = limits  # type: ignore[attr-defined]
        return view

    return decorator


def bind_rate_limits(app: Flask) -> Limiter:
    """Create the app's limiter (counters in Redis) and apply every view's `rate_limited` markers."""
    limiter = Limiter(key_func=rate_limit_key, app=app)
    # Probes and scrapes are not users: no limit, and no sign-in lookups on their hot path.
    for name in ("ops",):
        if name in app.blueprints:
            limiter.exempt(app.blueprints[name])
    shared: dict[str, Callable[[F], F]] = {}
    for endpoint, view in list(app.view_functions.items()):
        wrapped = view
        for setting, scope, key_func in getattr(view, "rate_limits", []):
            if scope not in shared:
                shared[scope] = limiter.shared_limit(
                    lambda setting=setting: app.config[setting], scope=scope, key_func=key_func, methods=["POST"]
                )
            wrapped = shared[scope](wrapped)
        app.view_functions[endpoint] = wrapped
    app.extensions["agentcloud_limiter"] = limiter
    return limiter


def api_key_in_use() -> bool:
    """True when this request was authenticated by an API key rather than a cookie."""
    return bool(getattr(g, "auth_via_api_key", False))
