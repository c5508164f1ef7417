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
    from . import cli, db, logs, web

    logs.configure_logging(app.config["LOG_LEVEL"], json_logs=app.config["LOG_FORMAT"] == "json")
    db.init_app(app)
    web.init_app(app)
    cli.init_app(app)
    return app
