"""Every process sees a team's first webhook endpoint at its next announcement, not after its list's refresh."""

from __future__ import annotations

import time
from typing import Any

import pytest

from agentcloud_clone.repositories import webhooks as repo
from agentcloud_clone.services import webhooks
from tests.workers.harness import FAST, RUNNER_MODULES


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {**FAST, "PYTHON_RUNNER_MODULES": RUNNER_MODULES, "WEBHOOK_ALLOW_PRIVATE": True}


def _deliveries(app, team_id) -> list[dict[str, Any]]:
    with app.app_context():
        assert webhooks.settle(20)
        return list(repo.get_db().webhook_deliveries.find({"teamId": team_id}))


def test_a_process_that_read_the_endpoints_before_a_change_sees_it_at_once(app, harness, factory, login):
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    harness.start(steps=1, stepDelay=0)  # this process's emitter reads which teams have endpoints: none
    assert _deliveries(app, harness.user.team_oid) == []
    with app.app_context():
        before = webhooks._endpoints_version()
    added = admin.json("POST", f"/{admin.user.team_id}/forms/webhook/add", {"url": "http://127.0.0.1:9/"})
    assert added.status_code == 201, added.get_json()
    # As in another process, which read the list just now (before the change) and was not told directly.
    webhooks._emitter.teams = (time.monotonic(), before, set())
    session = harness.start(steps=1, stepDelay=0)
    started = [d for d in _deliveries(app, harness.user.team_oid) if d["type"] == "session.started"]
    assert [d["payload"]["data"]["sessionId"] for d in started] == [str(session["_id"])]


def test_a_fork_mode_worker_reads_the_teams_with_endpoints_before_it_forks_a_work_horse(app, monkeypatch):
    """The horse starts with the worker's list, read under the endpoints' current version, and so reads none
    itself when its turn ends (within ENDPOINTS_TRUSTED_FOR of the read): before, every turn in fork mode read it."""
    import rq

    from workers.__main__ import ForkWorker

    team = object()
    reads: list[int] = []
    lists_at_fork: list[set[Any]] = []
    monkeypatch.setattr(repo, "teams_with_endpoints", lambda: reads.append(1) or [team])
    monkeypatch.setattr(
        rq.Worker, "execute_job", lambda self, job, queue: lists_at_fork.append(webhooks._emitter.teams[2])
    )
    worker = ForkWorker.__new__(ForkWorker)  # only its execute_job is used: RQ's own (the fork) is the stand-in above
    with app.app_context():
        webhooks._emitter.forget_teams()
        worker.execute_job(None, None)
        worker.execute_job(None, None)  # the list is current: not read again
        assert webhooks._emitter.teams_with_endpoints() == {team}
    assert lists_at_fork == [{team}, {team}] and reads == [1]
    ForkWorker.execute_job(worker, None, None)  # outside an app (as RQ's tests run it): nothing is read
    assert reads == [1]


def test_what_a_process_read_of_endpoints_stands_while_their_version_does_and_a_minute_at_most(app, monkeypatch):
    """Under an unchanged version a process keeps what it read (a turn that ends half a minute after its fork
    reads nothing), but not past ENDPOINTS_TRUSTED_FOR: a change whose move of the version was lost to a Redis
    outage (a rotated secret, a new endpoint) reaches every process within that."""
    team, endpoint = object(), object()
    lists: list[int] = []
    endpoints: list[int] = []
    monkeypatch.setattr(repo, "teams_with_endpoints", lambda: lists.append(1) or [team])
    monkeypatch.setattr(repo, "find_endpoint", lambda *args, **kwargs: endpoints.append(1) or {"url": "x"})
    copies = webhooks._EndpointCopies()
    with app.app_context():
        version = webhooks._endpoints_version()
        assert version is not None
        webhooks._emitter.teams = (time.monotonic() - 30, version, {team})
        assert webhooks._emitter.teams_with_endpoints() == {team} and lists == []
        webhooks._emitter.teams = (time.monotonic() - webhooks.ENDPOINTS_TRUSTED_FOR - 1, version, {team})
        assert webhooks._emitter.teams_with_endpoints() == {team} and lists == [1]
        assert copies.get(team, endpoint) == copies.get(team, endpoint) == {"url": "x"} and endpoints == [1]
        copies.since -= webhooks.ENDPOINTS_TRUSTED_FOR + 1
        assert copies.get(team, endpoint) == {"url": "x"} and endpoints == [1, 1]
