"""MongoDB access: one client per process, the database handle, and start-up indexes."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any
from urllib.parse import urlsplit

import pymongo
from flask import Flask, current_app
from pymongo.database import Database
from pymongo.errors import PyMongoError

# mongomock stores live inside a client object; keep one per URI so the web app and in-process
# workers of the fast test tier see the same data.
_mongomock_clients: dict[str, Any] = {}
_clients: dict[tuple[int, str], Any] = {}
_lock = threading.Lock()
log = logging.getLogger(__name__)


def database_name(uri: str) -> str:
    """The database named in the URI path, or `agentcloud`."""
    path = urlsplit(uri).path.lstrip("/")
    return path.split("?")[0] or "agentcloud"


def client_for(uri: str) -> Any:
    """A client for `uri`, created once per process (pymongo clients must not cross a fork)."""
    if uri.startswith("mongomock://"):
        import mongomock

        with _lock:
            if uri not in _mongomock_clients:
                _mongomock_clients[uri] = mongomock.MongoClient(tz_aware=True)
            return _mongomock_clients[uri]
    key = (os.getpid(), uri)
    with _lock:
        client = _clients.get(key)
        if client is None:
            # Fail fast when MongoDB is away (the API answers 503); a URI may set its own timeouts.
            timeouts = {} if "TimeoutMS" in uri else {"serverSelectionTimeoutMS": 3000, "connectTimeoutMS": 3000}
            client = pymongo.MongoClient(uri, tz_aware=True, appname="agentcloud", **timeouts)
            _clients[key] = client
        return client


def get_db() -> Database:
    """The app's database handle for the current process."""
    uri = current_app.config["MONGO_URI"]
    return client_for(uri)[database_name(uri)]


def ensure_indexes(db: Database) -> None:
    """Create every index the queries rely on; safe to run on every start."""
    asc, desc = pymongo.ASCENDING, pymongo.DESCENDING
    db.accounts.create_index([("email", asc)], unique=True, name="email_unique")
    db.teams.create_index([("orgId", asc)], name="org")
    db.api_keys.create_index([("lookup", asc)], unique=True, name="lookup_unique")
    db.api_keys.create_index([("accountId", asc), ("_id", desc)], name="account_keys")
    db.apps.create_index([("teamId", asc), ("_id", desc)], name="team_apps")
    db.sessions.create_index([("teamId", asc), ("_id", desc)], name="team_sessions")
    db.sessions.create_index([("teamId", asc), ("status", asc), ("_id", desc)], name="team_status_sessions")
    # The reaper's query: live sessions by heartbeat age.
    db.sessions.create_index([("status", asc), ("heartbeatAt", asc)], name="status_heartbeat")
    db.session_events.create_index([("sessionId", asc), ("seq", asc)], unique=True, name="session_seq")
    db.idempotency_keys.create_index([("accountId", asc), ("key", asc)], unique=True, name="account_key")
    db.idempotency_keys.create_index([("createdAt", asc)], expireAfterSeconds=48 * 3600, name="expiry")


def init_app(app: Flask) -> None:
    """Create indexes at start-up. A MongoDB that is down then must not stop the app from booting (it would
    answer 503 meanwhile): the indexes are tried again before requests until they are in place."""
    if not app.config.get("CREATE_INDEXES", True):
        return
    state = {"done": False}

    def ensure() -> None:
        uri = app.config["MONGO_URI"]
        try:
            ensure_indexes(client_for(uri)[database_name(uri)])
            state["done"] = True
        except PyMongoError as exc:
            log.warning("indexes not ensured yet (MongoDB unavailable: %s); will retry", exc)

    ensure()

    @app.before_request
    def _ensure_indexes_after_outage() -> None:
        if not state["done"]:
            ensure()
