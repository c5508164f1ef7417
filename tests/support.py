"""What tests share besides fixtures: isolated settings, real users made through the services, clients that sign
in like users do, and the one helper that waits for a condition."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bson import ObjectId
from flask import Flask
from flask.testing import FlaskClient

from agentcloud_clone.access import Account
from agentcloud_clone.repositories.accounts import find_account, find_team
from agentcloud_clone.schemas import SharingConfigSchema
from agentcloud_clone.services import accounts as accounts_service
from agentcloud_clone.services import apps as apps_service
from agentcloud_clone.services import sessions as sessions_service


def make_mongomock_atomic() -> None:
    """Give mongomock what MongoDB guarantees and the product relies on: each operation atomic on a document.

    mongomock locks a collection's table of documents, but updates a stored document in place: a thread matching
    or copying a document while another updates it fails ("dictionary changed size during iteration"), and two
    find-and-modifies can both match what only one may. One lock over mongomock's reads and writes makes each
    operation whole, as on a server. (The fast tier is not about mongomock's speed; once per process.)"""
    import mongomock.collection

    if getattr(mongomock.collection, "_made_atomic", False):
        return
    lock = threading.RLock()

    def atomic(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def whole(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return method(*args, **kwargs)

        return whole

    writes = ("_insert", "_update", "_delete", "_find_and_modify", "bulk_write")
    reads = ("count_documents", "distinct", "aggregate")
    for name in (*writes, *reads):
        setattr(mongomock.collection.Collection, name, atomic(getattr(mongomock.collection.Collection, name)))
    # A find's documents are matched and copied when its cursor is first read.
    cursor = mongomock.collection.Cursor
    cursor._compute_results = atomic(cursor._compute_results)  # type: ignore[method-assign]
    mongomock.collection._made_atomic = True  # type: ignore[attr-defined]


PASSWORD = "correct horse battery"
# werkzeug's hashing at a test-only cost: the suite signs in hundreds of times.
TEST_PASSWORD_HASH = "pbkdf2:sha256:1000"


def make_test_config(redis_url: str, mongo_uri: str, **overrides: Any) -> dict[str, Any]:
    """Settings for one isolated app: its own database, queue, Redis prefix and limiter counters; limits on."""
    tag = uuid.uuid4().hex[:12]
    return {
        "TESTING": True,
        "MONGO_URI": mongo_uri.replace("{db}", f"test_{tag}"),
        "REDIS_URL": redis_url,
        "TURN_QUEUE": f"turns-{tag}",
        "REDIS_PREFIX": f"ac-{tag}",
        "LOGIN_RATE_LIMIT": "1000 per minute",
        "LOGIN_ADDRESS_RATE_LIMIT": "1000 per minute",
        "SECRET_KEY": "test-secret",
        "PASSWORD_HASH_METHOD": TEST_PASSWORD_HASH,
        "LOG_LEVEL": "WARNING",
        # In-process apps come and go with each test: no background reaper, no workers to wait for.
        "WEB_REAPER": False,
        "REQUIRE_WORKERS": False,
        **overrides,
    }


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "the condition") -> Any:
    """The predicate's first truthy value within `timeout` seconds; exceptions count as not yet.

    The deadline is generous on purpose: it bounds a hang, it does not measure speed."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    pause = 0.02  # quick at first, then gentler (a long wait polling over HTTP must not trip rate limits)
    while True:
        try:
            value = predicate()
        except Exception as exc:  # a request or query that fails now may succeed a moment later
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.25)


@dataclass
class User:
    """A user created through the services, with what a test needs to act as them."""

    email: str
    account_id: str
    team_id: str
    role: str
    password: str = PASSWORD
    api_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def oid(self) -> ObjectId:
        return ObjectId(self.account_id)

    @property
    def team_oid(self) -> ObjectId:
        return ObjectId(self.team_id)


class Factory:
    """Creates real accounts, teams, apps and sessions through the services."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def team(self, name: str | None = None) -> dict[str, Any]:
        with self.app.app_context():
            return accounts_service.ensure_team(name or f"team-{uuid.uuid4().hex[:8]}")

    def user(self, role: str = "member", team: dict[str, Any] | None = None, *, api_key: bool = False) -> User:
        team = team or self.team()
        email = f"{role}-{uuid.uuid4().hex[:8]}@example.com"
        with self.app.app_context():
            account = accounts_service.create_account(email, PASSWORD, role.title())
            accounts_service.add_member(team["_id"], email, role)
            key = accounts_service.create_api_key(account["_id"], "test")[1] if api_key else None
        return User(email, str(account["_id"]), str(team["_id"]), role, api_key=key)

    def app_record(
        self,
        team_id: str,
        runner: str = "scripted",
        *,
        limits: dict[str, Any] | None = None,
        sharing: dict[str, Any] | None = None,
        required_variables: list[str] | None = None,
        **config: Any,
    ) -> str:
        return str(
            self.shared_app(
                team_id, runner, limits=limits, sharing=sharing, required_variables=required_variables, **config
            )["_id"]
        )

    def shared_app(
        self,
        team_id: str,
        runner: str = "scripted",
        *,
        limits: dict[str, Any] | None = None,
        sharing: dict[str, Any] | None = None,
        required_variables: list[str] | None = None,
        **config: Any,
    ) -> dict[str, Any]:
        """An app as the service stores it (with `shareId`, its share link, when its mode has one)."""
        with self.app.app_context():
            team = find_team(ObjectId(team_id))
            assert team is not None
            settings = config or {"steps": 3, "stepDelay": 0.01}
            name = f"app-{uuid.uuid4().hex[:6]}"
            if sharing is not None:
                sharing = SharingConfigSchema().load(sharing)  # as the app routes take it
            return apps_service.create_app_record(
                team,
                name,
                runner,
                settings,
                None,
                limits,
                sharing_config=sharing,
                required_variables=required_variables,
            )

    def session(self, user: User, app_id: str, message: str | None = None, **options: Any) -> dict[str, Any]:
        """A session started by `user`, as the API would start it (`options`: skip_run, variables)."""
        with self.app.app_context():
            team = find_team(user.team_oid)
            app = apps_service.get_app(user.team_oid, ObjectId(app_id))
            return sessions_service.create_session(team, self.actor(user), app, None, message, **options)

    def actor(self, user: User) -> Any:
        with self.app.app_context():
            doc = find_account(user.oid)
            assert doc is not None
            return Account(doc).actor


class Client:
    """A signed-in browser-like or JSON client for one user."""

    def __init__(self, client: FlaskClient, user: User) -> None:
        self.client = client
        self.user = user
        self.csrf: str | None = None

    def login(self, **extra: Any) -> Client:
        body = {"email": self.user.email, "password": self.user.password, **extra}
        response = self.client.post("/forms/account/login", json=body)
        assert response.status_code == 200, response.get_json()
        self.csrf = response.get_json()["csrf"]
        return self

    def json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """A JSON request carrying the CSRF header, as the web UI's scripts send it."""
        headers = {"X-CSRFToken": self.csrf or "", "Accept": "application/json", **kwargs.pop("headers", {})}
        return self.client.open(path, method=method, json=body, headers=headers, **kwargs)

    def form(self, path: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """An HTML form post with the CSRF field, as a browser sends it."""
        return self.client.post(path, data={"csrf_token": self.csrf or "", **(data or {})}, **kwargs)

    def session_cookie(self, app: Flask) -> str:
        """What the browser's session cookie holds, decoded (it is signed, so anyone holding it can read it)."""
        cookie = self.client.get_cookie(app.config.get("SESSION_COOKIE_NAME", "session"))
        if cookie is None:
            return ""
        serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
        return str(serializer.loads(cookie.value))


def run_queued_turn(app: Flask, session_id: str | ObjectId) -> dict[str, Any]:
    """Run the session's queued turn in this process, the way a worker would, and return its outcome."""
    from agentcloud_clone.db import get_db
    from agentcloud_clone.jobs.turns import run_turn

    with app.app_context():
        doc = get_db().sessions.find_one({"_id": ObjectId(session_id)})
        assert doc is not None and doc.get("activeTurnId"), "the session has no queued turn"
        return run_turn(str(doc["teamId"]), str(doc["_id"]), str(doc["activeTurnId"]))


def reply_was_cut_off(events: list[dict[str, Any]], turn_id: Any = None) -> bool:
    """Whether a turn's reply is marked interrupted: on its last output event, or (when nothing was left to
    write) on the event that closed the turn. The transcript is append-only, so it is one or the other."""
    turn = str(turn_id) if turn_id is not None else next(e["turnId"] for e in events if e["type"] == "output")
    outputs = [e for e in events if e["type"] == "output" and e.get("turnId") == turn]
    closers = [e for e in events if e["type"] in ("status", "turn_end") and e.get("turnId") == turn]
    return bool(outputs) and (bool(outputs[-1].get("interrupted")) or any(e.get("interrupted") for e in closers))
