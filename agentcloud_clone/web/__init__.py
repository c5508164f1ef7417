"""The HTTP layer: blueprints parse the request, call a service and shape the response. Nothing else."""

from __future__ import annotations

from flask import Flask

from . import (
    account,
    apps,
    docs,
    errors,
    hooks,
    identity,
    managed_agents,
    pages,
    probes,
    ratelimits,
    sessions,
    share,
    streams,
    teams,
    webhooks,
)
from .parsing import BoundedBody, BoundedJSONProvider, use_path_converters

BLUEPRINTS = (account, apps, sessions, streams, share, managed_agents, teams, webhooks, pages, probes, docs)


def init_app(app: Flask) -> None:
    """Register the blueprints, the error handlers, identity and CSRF, the request hooks and the limiter."""
    app.json = BoundedJSONProvider(app)
    app.wsgi_app = BoundedBody(app)  # type: ignore[method-assign]
    use_path_converters(app.url_map)  # before the blueprints add their rules
    errors.init_app(app)
    identity.init_app(app)
    for module in BLUEPRINTS:
        app.register_blueprint(module.bp)
    hooks.init_app(app)
    pages.init_app(app)
    # Last: it wraps the views registered above with their rate-limit markers.
    ratelimits.init_app(app)
