"""MongoDB access: one client per process, the database handle, and start-up indexes."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
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
# Longest `$in` list sent in one query. MongoDB itself takes far more; the embedded server's SQLite engine
# refuses expression trees of about 490 ids, so longer lists go in several queries.
IN_CHUNK = 200


def chunked[T](items: Sequence[T], size: int = IN_CHUNK) -> Iterator[list[T]]:
    """`items` in lists of at most `size`, for `$in` queries of any length."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


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
            if "TimeoutMS" in uri:
                client = pymongo.MongoClient(uri, tz_aware=True, appname="agentcloud")
            else:
                client = pymongo.MongoClient(
                    uri, tz_aware=True, appname="agentcloud", serverSelectionTimeoutMS=3000, connectTimeoutMS=3000
                )
            _clients[key] = client
        return client


def get_db() -> Database[Any]:
    """The app's database handle for the current process."""
    uri = current_app.config["MONGO_URI"]
    database: Database[Any] = client_for(uri)[database_name(uri)]
    return database


def ensure_indexes(db: Database[Any]) -> None:
    """Create every index the queries rely on; safe to run on every start."""
    asc, desc = pymongo.ASCENDING, pymongo.DESCENDING
    db.accounts.create_index([("email", asc)], unique=True, name="email_unique")
    db.accounts.create_index([("teams.teamId", asc)], name="team_members")
    db.teams.create_index([("orgId", asc)], name="org")
    db.api_keys.create_index([("lookup", asc)], unique=True, name="lookup_unique")
    db.api_keys.create_index([("accountId", asc), ("_id", desc)], name="account_keys")
    db.apps.create_index([("teamId", asc), ("_id", desc)], name="team_apps")
    db.sessions.create_index([("teamId", asc), ("_id", desc)], name="team_sessions")
    db.sessions.create_index([("teamId", asc), ("status", asc), ("_id", desc)], name="team_status_sessions")
    # The reaper's query: live sessions by heartbeat age.
    db.sessions.create_index([("status", asc), ("heartbeatAt", asc)], name="status_heartbeat")
    # The reaper's limit sweep (queue TTL, turn duration, idle timeout) and its re-queue of lost jobs.
    db.sessions.create_index([("deadline", asc)], name="deadline", sparse=True)
    db.sessions.create_index([("turnQueuedAt", asc)], name="turn_queued", sparse=True)
    # Tombstones of deleted sessions, found by the reaper's purge.
    db.sessions.create_index([("deletedAt", asc)], name="deleted", sparse=True)
    db.session_events.create_index([("sessionId", asc), ("seq", asc)], unique=True, name="session_seq")
    db.idempotency_keys.create_index([("accountId", asc), ("key", asc)], unique=True, name="account_key")
    db.idempotency_keys.create_index([("sessionId", asc)], name="session", sparse=True)
    db.idempotency_keys.create_index([("createdAt", asc)], expireAfterSeconds=48 * 3600, name="expiry")
    db.webhook_endpoints.create_index([("teamId", asc), ("_id", desc)], name="team_endpoints")
    db.webhook_deliveries.create_index([("endpointId", asc), ("eventKey", asc)], unique=True, name="once_per_event")
    db.webhook_deliveries.create_index([("endpointId", asc), ("_id", desc)], name="endpoint_deliveries")
    db.webhook_deliveries.create_index([("status", asc), ("nextAttemptAt", asc)], name="due_retries")


INDEXES_READY = "agentcloud_indexes_ready"


def ensure_indexes_once(app: Flask) -> None:
    """Create the indexes the first time this app needs MongoDB; raises PyMongoError while it is unreachable
    (and tries again on the next call)."""
    if app.extensions.get(INDEXES_READY) or not app.config.get("CREATE_INDEXES", True):
        return
    uri = app.config["MONGO_URI"]
    ensure_indexes(client_for(uri)[database_name(uri)])
    app.extensions[INDEXES_READY] = True


def init_app(app: Flask) -> None:
    """Indexes are created before the first request rather than at start-up, so a MongoDB that is down does not
    stop the app from booting (it answers 503 meanwhile) and commands that need no database never wait on it."""

    @app.before_request
    def _ensure_indexes() -> None:
        try:
            ensure_indexes_once(app)
        except PyMongoError as exc:
            log.warning("indexes not ensured yet (MongoDB unavailable: %s); will retry", exc)
