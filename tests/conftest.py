"""Fixtures shared by every tier: real servers on loopback, apps, and users who sign in like users do."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from agentcloud_clone import create_app
from agentcloud_clone.services import accounts as accounts_service
from agentcloud_clone.services import apps as apps_service
from devtools.servers import ManagedProcess, start_mongo, start_redis

PASSWORD = "correct horse battery"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ManagedProcess]:
    """A real redis-server on a free loopback port for the whole run."""
    with start_redis() as server:
        yield server


@pytest.fixture(scope="session")
def mongo_server() -> Iterator[ManagedProcess]:
    """A MongoDB-wire server (mongoeco) on a free loopback port, started only when a test asks for it."""
    with start_mongo() as server:
        yield server


def make_test_config(redis_url: str, mongo_uri: str, **overrides: Any) -> dict[str, Any]:
    """Settings for one isolated app: its own database, queue and rate-limit counters; limits stay on."""
    tag = uuid.uuid4().hex[:12]
    return {
        "TESTING": True,
        "MONGO_URI": mongo_uri.replace("{db}", f"test_{tag}"),
        "REDIS_URL": redis_url,
        "TURN_QUEUE": f"turns-{tag}",
        "RATELIMIT_KEY_PREFIX": f"rl-{tag}",
        "REDIS_PREFIX": f"ac-{tag}",
        "LOGIN_RATE_LIMIT": "1000 per minute",
        "SECRET_KEY": "test-secret",
        **overrides,
    }


@pytest.fixture(params=["mongomock"])
def mongo_uri_template(request: pytest.FixtureRequest) -> str:
    """Which MongoDB the app talks to; API test modules parametrise this to add the wire server."""
    if request.param == "mongomock":
        return "mongomock://localhost/{db}"
    server = request.getfixturevalue("mongo_server")
    return server.url.rstrip("/") + "/{db}"


@pytest.fixture
def app(redis_server: ManagedProcess, mongo_uri_template: str) -> Flask:
    """A fresh app on its own database."""
    return create_app(make_test_config(redis_server.url, mongo_uri_template))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


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


class Factory:
    """Creates real accounts, teams and apps through the services."""

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

    def app_record(self, team_id: str, runner: str = "scripted", **config: Any) -> str:
        from bson import ObjectId

        with self.app.app_context():
            from agentcloud_clone.repositories.accounts import find_team

            team = find_team(ObjectId(team_id))
            assert team is not None
            settings = config or {"steps": 3, "stepDelay": 0.01}
            return str(
                apps_service.create_app_record(team, f"app-{uuid.uuid4().hex[:6]}", runner, settings, None)["_id"]
            )


@pytest.fixture
def factory(app: Flask) -> Factory:
    return Factory(app)


class Session:
    """A signed-in browser-like or JSON client for one user."""

    def __init__(self, client: FlaskClient, user: User) -> None:
        self.client = client
        self.user = user
        self.csrf: str | None = None

    def login(self) -> Session:
        response = self.client.post(
            "/forms/account/login", json={"email": self.user.email, "password": self.user.password}
        )
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


@pytest.fixture
def login(app: Flask):
    """`login(user)` → a signed-in client of its own (cookies are per client)."""

    def _login(user: User) -> Session:
        return Session(app.test_client(), user).login()

    return _login


@pytest.fixture
def api_key_client(app: Flask):
    """`api_key_client(user)` → a callable making requests with the user's API key and no cookies."""

    def _make(user: User):
        assert user.api_key, "create the user with api_key=True"
        test_client = app.test_client()

        def request(method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
            headers = {"Authorization": f"Bearer {user.api_key}", **kwargs.pop("headers", {})}
            return test_client.open(path, method=method, json=body, headers=headers, **kwargs)

        return request

    return _make
