"""A slow store is not a dead one: an operation that outlives MONGO_TIMEOUT on a server that still answers gets
its own 503, and every other request of the process goes on; a server that stops answering altogether still
makes the process fail fast. The server is the wire server behind a proxy that holds back answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agentcloud_clone.db import breaker
from devtools.servers import ManagedProcess
from tests.fakes.slow_proxy import SlowProxy
from tests.support import wait_until


@pytest.fixture
def proxy(mongo_server: ManagedProcess) -> Iterator[SlowProxy]:
    port = int(mongo_server.url.rstrip("/").rsplit(":", 1)[1])
    server = SlowProxy(port).start()
    yield server
    server.stop()


@pytest.fixture
def mongo_uri_template(proxy: SlowProxy) -> str:
    return f"mongodb://127.0.0.1:{proxy.port}/{{db}}"


def _sessions(member: Any) -> Any:
    return member.client.get(f"/{member.user.team_id}/sessions.json")


def test_an_operation_slower_than_its_deadline_does_not_make_the_store_look_down(app, factory, login, proxy):
    slow, other = login(factory.user("member")), login(factory.user("member"))
    assert _sessions(slow).status_code == 200 and _sessions(other).status_code == 200
    mongo = breaker(app.config["MONGO_URI"], float(app.config["MONGO_TIMEOUT"]))
    # The next operation that names the first team's id is held past its deadline (a large `$in`, a long
    # heartbeat, a queue behind other clients): the server itself keeps answering everything else.
    proxy.slow_next(slow.user.team_oid.binary)
    answers: list[Any] = []
    waiting = threading.Thread(target=lambda: answers.append(_sessions(slow)))
    waiting.start()
    try:
        assert proxy.held.wait(10)
        during = [_sessions(other).status_code for _ in range(3)]
        waiting.join(30)
    finally:
        proxy.release()
    (timed_out,) = answers
    assert timed_out.status_code == 503 and timed_out.get_json()["code"] == 503  # that request did run out of time
    after = [_sessions(member).status_code for member in (other, slow, other)]
    assert during == [200, 200, 200] and after == [200, 200, 200]
    assert mongo.trips == 0 and not mongo.is_open  # never taken for a server that is away


def test_a_store_that_stops_answering_still_fails_fast_and_recovers(app, factory, login, proxy):
    member = login(factory.user("member"))
    assert _sessions(member).status_code == 200
    mongo = breaker(app.config["MONGO_URI"], float(app.config["MONGO_TIMEOUT"]))
    proxy.hang()
    try:
        first = _sessions(member)
        assert first.status_code == 503
        assert mongo.is_open and mongo.trips == 1  # the ping after the timeout got no answer either
        assert _sessions(member).status_code == 503  # at once, without touching the server
    finally:
        proxy.release()
    wait_until(lambda: _sessions(member).status_code == 200, 20, "recovery")
