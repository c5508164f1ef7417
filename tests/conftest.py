"""Fixtures shared by every tier: real servers on loopback, one app per test on its own database, and users
who sign in like users do. Helpers live in tests/support.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from pymongo.errors import PyMongoError

from agentcloud_clone import create_app
from agentcloud_clone.db import client_for, database_name, ensure_indexes_once
from agentcloud_clone.jobs.watcher import stop_watchers
from agentcloud_clone.notices import stop_dispatchers
from devtools.servers import ManagedProcess, start_mongo, start_redis
from tests.support import Client, Factory, User, make_mongomock_atomic, make_test_config

make_mongomock_atomic()


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


@pytest.fixture(params=["mongomock"])
def mongo_uri_template(request: pytest.FixtureRequest) -> str:
    """Which MongoDB the app talks to; API test modules parametrise this to add the wire server."""
    if request.param == "mongomock":
        return "mongomock://localhost/{db}"
    server = request.getfixturevalue("mongo_server")
    return server.url.rstrip("/") + "/{db}"


@pytest.fixture
def app_settings() -> dict[str, Any]:
    """Extra settings for this module's apps; override the fixture in a module to change them."""
    return {}


@pytest.fixture
def make_app(redis_server: ManagedProcess, mongo_uri_template: str) -> Iterator[Callable[..., Flask]]:
    """`make_app(**settings)` → a fresh app on its own database, dropped (with its watchers) afterwards."""
    made: list[Flask] = []

    def _make(**settings: Any) -> Flask:
        app = create_app(make_test_config(redis_server.url, mongo_uri_template, **settings))
        made.append(app)
        with contextlib.suppress(PyMongoError):  # as a served app does before its first request
            ensure_indexes_once(app)
        return app

    yield _make
    stop_watchers()
    stop_dispatchers()
    for app in made:
        uri = app.config["MONGO_URI"]
        with contextlib.suppress(PyMongoError):  # some tests point an app at a server that is not there
            client_for(uri).drop_database(database_name(uri))


@pytest.fixture
def app(make_app: Callable[..., Flask], app_settings: dict[str, Any]) -> Flask:
    """The test's app."""
    return make_app(**app_settings)


@pytest.fixture
def client(app: Flask) -> Any:
    return app.test_client()


@pytest.fixture
def factory(app: Flask) -> Factory:
    return Factory(app)


@pytest.fixture
def login(app: Flask) -> Callable[..., Client]:
    """`login(user)` → a signed-in client of its own (cookies are per client)."""

    def _login(user: User, **extra: Any) -> Client:
        return Client(app.test_client(), user).login(**extra)

    return _login


@pytest.fixture
def api_key_client(app: Flask) -> Callable[[User], Callable[..., Any]]:
    """`api_key_client(user)` → a callable making requests with the user's API key and no cookies."""

    def _make(user: User) -> Callable[..., Any]:
        assert user.api_key, "create the user with api_key=True"
        test_client = app.test_client()

        def request(method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
            headers = {"Authorization": f"Bearer {user.api_key}", **kwargs.pop("headers", {})}
            return test_client.open(path, method=method, json=body, headers=headers, **kwargs)

        return request

    return _make
