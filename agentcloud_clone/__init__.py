"""agentcloud_clone: long-running agent sessions for teams, stopped safely on request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from .config import Config


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the web app from the environment plus `config` overrides. Connects lazily, never at import."""
    app = Flask(__name__)
    app.config.update(Config(config).as_dict())
    from . import cli, db, logs, web

    logs.configure_logging(app.config["LOG_LEVEL"], json_logs=app.config["LOG_FORMAT"] == "json")
    db.init_app(app)
    web.init_app(app)
    cli.init_app(app)
    hops = int(app.config["TRUSTED_PROXY_HOPS"])
    if hops:
        # The client's address and scheme as the operator's own proxies saw them (the address limits count per
        # client, not per proxy); what the client itself sends in those headers is never believed.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    return app
