"""agentcloud_clone: long-running agent sessions for teams, stopped safely on request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from .config import Config


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the web app from the environment plus `config` overrides. Connects lazily, never at import."""
    app = Flask(__name__)
    app.config.update(Config(config).as_dict())
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["REDIS_URL"])
    app.config.setdefault("RATELIMIT_DEFAULT", app.config["DEFAULT_RATE_LIMIT"])
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    # When Redis is unreachable the limiter keeps serving, counting in process memory meanwhile.
    app.config.setdefault("RATELIMIT_SWALLOW_ERRORS", True)
    app.config.setdefault("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", True)
    app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", {"socket_connect_timeout": 1, "socket_timeout": 1})
    from . import auth, cli, db, ops, responses, web

    ops.configure_logging(app.config["LOG_LEVEL"], json_logs=app.config["LOG_FORMAT"] == "json")
    from .api import apps, docs, managed_agents, sessions
    from .api import auth as auth_api
    from .extensions import bind_rate_limits

    responses.init_app(app)
    auth.init_app(app)
    db.init_app(app)
    cli.init_app(app)
    for blueprint in (auth_api.bp, apps.bp, sessions.bp, managed_agents.bp, web.bp, ops.bp, docs.bp):
        app.register_blueprint(blueprint)
    # Registered before the limiter so their after-request hooks run after its own (Flask runs them in
    # reverse): the security-header hook must see the headers the limiter adds.
    ops.init_app(app)
    web.init_app(app)
    bind_rate_limits(app)
    return app
