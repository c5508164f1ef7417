"""MongoDB access: one client per process, the database handle, and start-up indexes."""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import urlsplit

import pymongo
from flask import Flask, current_app
from pymongo.database import Database

# mongomock stores live inside a client object; keep one per URI so the web app and in-process
# workers of the fast test tier see the same data.
_mongomock_clients: dict[str, Any] = {}
_clients: dict[tuple[int, str], Any] = {}
_lock = threading.Lock()


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
            client = pymongo.MongoClient(
                uri, tz_aware=True, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000, appname="agentcloud"
            )
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
    """Create indexes once at start-up unless the config says the caller will."""
    if app.config.get("CREATE_INDEXES", True):
        uri = app.config["MONGO_URI"]
        ensure_indexes(client_for(uri)[database_name(uri)])
