"""MongoDB access: one client per process, the database handle, and start-up indexes.

A MongoDB that hangs must not hang the product. Each operation has a short deadline (`MONGO_TIMEOUT`, 1 s, as
pymongo's `timeoutMS`: ordinary pymongo settings, so they work the same on a real MongoDB), operations known to
be long set their own (`pymongo.timeout`), and a per-process circuit breaker
(breakers.py) makes every `get_db()` fail at once after a failure that says the server is away, until a
background ping gets an answer.

What says "away": a refused or broken connection, or a server-selection timeout (pymongo found no server it could
use within the deadline), at once. An operation that timed out on a server that was reached says only "slow" or
"away": a large `$in`, a heartbeat of many sessions or a queue behind other clients on make run's embedded store
legitimately takes longer than a second, and opening the breaker for that would turn a busy server into 503s for
every request of the process. So a timeout opens it only when the server also fails a ping with its own short
deadline (LIVENESS_TIMEOUT). A ping needs no lock and no engine work, so a live server, however busy, answers it
in milliseconds (the embedded store answers it on its event loop while its engine thread works); a hung one
(SIGSTOP, a partition) does not, and the breaker opens after that one short wait, as before. (The alternative,
k timeouts in a window, would keep a hung server's first k requests waiting a full timeout each in every process,
and would still open on a steady stream of slow but successful work.)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import pymongo
from flask import Flask, current_app
from pymongo import monitoring
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, PyMongoError, ServerSelectionTimeoutError

from .breakers import Breaker, breaker_for

# mongomock stores live inside a client object; keep one per URI so the web app and in-process
# workers of the fast test tier see the same data.
_mongomock_clients: dict[str, Any] = {}
_clients: dict[tuple[int, str, float], Any] = {}
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


# The default of MONGO_TIMEOUT, for clients made outside an app (the CLI's own checks, tests).
MONGO_TIMEOUT = 1.0
# The deadline of the ping that tells a slow server from a hung one after an operation timed out.
LIVENESS_TIMEOUT = 0.5
# Operations that may legitimately take long (index builds, the reaper's sweep, bulk jobs) run under this deadline.
LONG_OPERATION = 30.0
# How long a long operation first waits to reach MongoDB at all: one that is not there fails in seconds.
REACH_TIMEOUT = 5.0


class SlowCommandLog(monitoring.CommandListener):
    """Logs every MongoDB command that took longer than `threshold_ms` (SLOW_COMMAND_MS; 0: none), with its
    collection and the server's address: what a request or a turn waited for, seen from the client (a busy
    store's queue shows as many of them at once). One per process, registered before any client exists."""

    def __init__(self) -> None:
        self.threshold_ms = 0.0
        self._collections: dict[tuple[int, Any], str] = {}
        self._lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.threshold_ms <= 0:
            return
        target = event.command.get(event.command_name)
        if isinstance(target, str):
            with self._lock:
                self._collections[(event.request_id, event.connection_id)] = target

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._finished(event, "")

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._finished(event, f" and failed ({event.failure.get('codeName') or event.failure.get('errmsg', '?')})")

    def _finished(self, event: Any, outcome: str) -> None:
        with self._lock:
            collection = self._collections.pop((event.request_id, event.connection_id), None)
        took_ms = event.duration_micros / 1000
        if 0 < self.threshold_ms < took_ms:
            where = f"{event.database_name}.{collection}" if collection else event.database_name
            host, port = event.connection_id[:2]
            log.warning("slow MongoDB command: %s on %s at %s:%s took %.0f ms%s", event.command_name, where, host,
                        port, took_ms, outcome)  # fmt: skip


slow_commands = SlowCommandLog()
monitoring.register(slow_commands)


class DatabaseUnavailableError(ServerSelectionTimeoutError):
    """Raised by `get_db()` at once, without touching the network, while this process's breaker for MongoDB is
    open (a ConnectionFailure, so it is answered like any other: 503)."""


def client_for(uri: str, timeout: float = MONGO_TIMEOUT) -> Any:
    """A client for `uri`, created once per process (pymongo clients must not cross a fork)."""
    if uri.startswith("mongomock://"):
        import mongomock

        with _lock:
            if uri not in _mongomock_clients:
                _mongomock_clients[uri] = mongomock.MongoClient(tz_aware=True)
            return _mongomock_clients[uri]
    key = (os.getpid(), uri, timeout)
    with _lock:
        client = _clients.get(key)
        if client is None:
            # Fail fast when MongoDB is away or hangs (the API answers 503); a URI may set its own timeouts.
            if "TimeoutMS" in uri:
                client = pymongo.MongoClient(uri, tz_aware=True, appname="agentcloud")
            else:
                # timeoutMS bounds each operation as a whole (server selection, a connection, the round trip, and
                # the one retry of a retryable read or write): a socket timeout alone lets a read on a hung server
                # take three times as long. The monitor's checks get a little more, so a busy server is not taken
                # for a lost one.
                ms = int(timeout * 1000)
                client = pymongo.MongoClient(
                    uri,
                    tz_aware=True,
                    appname="agentcloud",
                    timeoutMS=ms,
                    serverSelectionTimeoutMS=ms,
                    connectTimeoutMS=max(2 * ms, 2000),
                )
            _clients[key] = client
        return client


def _server_of(uri: str) -> str:
    """The servers part of a URI, without credentials or database (one breaker per deployment, not per db)."""
    netloc = urlsplit(uri).netloc
    return netloc.rpartition("@")[2]


def breaker(uri: str, timeout: float = MONGO_TIMEOUT) -> Breaker:
    """This process's breaker for the MongoDB of `uri`."""
    client = client_for(uri, timeout)

    def ping() -> None:
        with pymongo.timeout(max(timeout, 0.5)):
            client.admin.command("ping")

    return breaker_for(f"mongodb {_server_of(uri)}", ping)


def is_unavailable(exc: BaseException) -> bool:
    """Whether a pymongo error says the server is away, hangs or was too slow (rather than refusing this
    operation): the caller's answer is the same (503, or try again)."""
    return isinstance(exc, ConnectionFailure) or bool(getattr(exc, "timeout", False))


def is_operation_timeout(exc: BaseException) -> bool:
    """Whether a pymongo error is an operation that ran out of time on a server pymongo had selected (which a
    busy server does too), rather than no server to be had."""
    return bool(getattr(exc, "timeout", False)) and not isinstance(exc, ServerSelectionTimeoutError)


def alive(uri: str, timeout: float = MONGO_TIMEOUT) -> bool:
    """Whether the MongoDB of `uri` answers a ping within LIVENESS_TIMEOUT."""
    try:
        with pymongo.timeout(LIVENESS_TIMEOUT):
            client_for(uri, timeout).admin.command("ping")
    except PyMongoError:
        return False
    return True


def note_failure(exc: BaseException, uri: str | None = None) -> None:
    """Open this process's breaker when `exc` says MongoDB is away: a connection failure or no server within the
    deadline at once, an operation timeout only when the server fails a quick ping too (see the module's notes).
    No-op for other errors and for mongomock."""
    uri = uri or current_app.config["MONGO_URI"]
    if uri.startswith("mongomock://") or isinstance(exc, DatabaseUnavailableError) or not is_unavailable(exc):
        return
    timeout = float(current_app.config.get("MONGO_TIMEOUT", MONGO_TIMEOUT))
    if is_operation_timeout(exc):
        breaker(uri, timeout).trip_unless_alive(exc, lambda: alive(uri, timeout))
    else:
        breaker(uri, timeout).trip(exc)


def get_db() -> Database[Any]:
    """The app's database handle for the current process; DatabaseUnavailableError at once while MongoDB is known to be
    away."""
    config = current_app.config
    uri = config["MONGO_URI"]
    timeout = float(config.get("MONGO_TIMEOUT", MONGO_TIMEOUT))
    if not uri.startswith("mongomock://") and not breaker(uri, timeout).allow():
        raise DatabaseUnavailableError("MongoDB is unavailable (failing fast until it answers again)")
    database: Database[Any] = client_for(uri, timeout)[database_name(uri)]
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
    db.invitations.create_index([("teamId", asc), ("email", asc)], unique=True, name="team_email")
    db.invitations.create_index([("email", asc), ("_id", desc)], name="email_invitations")
    db.invitations.create_index([("expiresAt", asc)], expireAfterSeconds=0, name="expiry")
    db.sessions.create_index([("teamId", asc), ("_id", desc)], name="team_sessions")
    db.sessions.create_index([("teamId", asc), ("status", asc), ("_id", desc)], name="team_status_sessions")
    # The reaper's query: live sessions by heartbeat age.
    db.sessions.create_index([("status", asc), ("heartbeatAt", asc)], name="status_heartbeat")
    # The reaper's limit sweep (queue TTL, turn duration, idle timeout) and its re-queue of lost jobs.
    db.sessions.create_index([("deadline", asc)], name="deadline", sparse=True)
    db.sessions.create_index([("turnQueuedAt", asc)], name="turn_queued", sparse=True)
    # The reaper's sweep for transcript writes whose second half never landed: sessions by their last write.
    db.sessions.create_index([("lastUpdatedDate", asc)], name="last_updated")
    # Tombstones of deleted sessions, found by the reaper's purge.
    db.sessions.create_index([("deletedAt", asc)], name="deleted", sparse=True)
    # New sessions whose create has not answered yet, found by the reaper's removal of those that never will.
    db.sessions.create_index([("unansweredSince", asc)], name="unanswered", sparse=True)
    db.session_events.create_index([("sessionId", asc), ("seq", asc)], unique=True, name="session_seq")
    # Sessions purged for good, whose late events the reaper removes (kept longer than REPAIR_WINDOW can be).
    db.purged_sessions.create_index([("purgedAt", asc)], expireAfterSeconds=8 * 86400, name="expiry")
    db.idempotency_keys.create_index([("accountId", asc), ("key", asc)], unique=True, name="account_key")
    db.idempotency_keys.create_index([("sessionId", asc)], name="session", sparse=True)
    db.idempotency_keys.create_index([("createdAt", asc)], expireAfterSeconds=48 * 3600, name="expiry")
    # The reaper's sweep for keys whose request never finished.
    db.idempotency_keys.create_index([("pendingSince", asc)], name="pending", sparse=True)
    db.webhook_endpoints.create_index([("teamId", asc), ("_id", desc)], name="team_endpoints")
    db.webhook_deliveries.create_index([("endpointId", asc), ("eventKey", asc)], unique=True, name="once_per_event")
    db.webhook_deliveries.create_index([("endpointId", asc), ("_id", desc)], name="endpoint_deliveries")
    db.webhook_deliveries.create_index([("status", asc), ("nextAttemptAt", asc)], name="due_retries")


INDEXES_READY = "agentcloud_indexes_ready"
_creating: set[int] = set()


def ensure_indexes_once(app: Flask, deadline: float | None = LONG_OPERATION) -> None:
    """Create the indexes the first time this app needs MongoDB; raises PyMongoError while it is unreachable
    (and tries again on the next call). `deadline` bounds the whole of it (None: each operation's own timeout)."""
    if app.extensions.get(INDEXES_READY) or not app.config.get("CREATE_INDEXES", True):
        return
    uri = app.config["MONGO_URI"]
    database = client_for(uri, float(app.config.get("MONGO_TIMEOUT", MONGO_TIMEOUT)))[database_name(uri)]
    if deadline is None:
        ensure_indexes(database)
    else:
        # The whole deadline is for building indexes on a live server, not for looking for an absent one (the
        # CLI would wait half a minute to say MongoDB is unreachable).
        with pymongo.timeout(min(deadline, REACH_TIMEOUT)):
            database.command("ping")
        with pymongo.timeout(deadline):
            ensure_indexes(database)
    app.extensions[INDEXES_READY] = True


def init_app(app: Flask) -> None:
    """Indexes are created before the first request rather than at start-up, so a MongoDB that is down does not
    stop the app from booting (it answers 503 meanwhile) and commands that need no database never wait on it.
    While MongoDB is known to be away, or another request of this process is creating them, requests go on.
    Also sets this process's threshold for logging slow commands (SLOW_COMMAND_MS)."""
    slow_commands.threshold_ms = float(app.config.get("SLOW_COMMAND_MS", 0))

    @app.before_request
    def _ensure_indexes() -> None:
        if app.extensions.get(INDEXES_READY) or id(app) in _creating:
            return
        uri = app.config["MONGO_URI"]
        if not uri.startswith("mongomock://") and not breaker(uri, float(app.config["MONGO_TIMEOUT"])).allow():
            return
        _creating.add(id(app))
        try:
            ensure_indexes_once(app, deadline=None)
        except PyMongoError as exc:
            note_failure(exc)
            log.warning("indexes not ensured yet (MongoDB unavailable: %s); will retry", exc)
        finally:
            _creating.discard(id(app))
