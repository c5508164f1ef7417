"""Signed webhooks: registration (with SSRF checks), one delivery per event, back-off retries, redelivery."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from rq import Queue
from standardwebhooks import Webhook

from agentcloud_clone.queueing import get_redis
from agentcloud_clone.services import webhooks
from tests.fakes.receiver import Receiver
from tests.workers.harness import FAST, RUNNER_MODULES


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {
        **FAST,
        "PYTHON_RUNNER_MODULES": RUNNER_MODULES,
        "WEBHOOK_ALLOW_PRIVATE": True,  # the receiver is on loopback
        "WEBHOOK_RETRY_INTERVALS": ["0", "0", "0"],  # retry at once: the back-off itself is RQ's scheduler's
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def _drain(app) -> None:
    """Let the emitter record what was announced, then run the queued webhook jobs as a worker would, and the
    retries the reaper's sweep queues once their back-off is over, until none is left."""
    with app.app_context():
        assert webhooks.settle(20)
        queue = Queue(app.config["WEBHOOK_QUEUE"], connection=get_redis())
        while True:
            jobs = queue.get_jobs()
            if not jobs and not webhooks.sweep_missed():
                return
            for job in jobs:
                queue.remove(job)
                job.perform()


def _register(admin, url: str, events: list[str] | None = None) -> dict[str, Any]:
    response = admin.json("POST", f"/{admin.user.team_id}/forms/webhook/add", {"url": url, "eventTypes": events or []})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_session_lifecycle_is_delivered_signed_and_once(app, harness, factory, login, receiver):
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    created = _register(admin, receiver.url)
    assert created["secret"].startswith("whsec_")
    assert "secret" not in json.dumps(admin.client.get(f"/{admin.user.team_id}/webhooks.json").get_json())
    session = harness.start(steps=2, stepDelay=0)
    harness.run(session)
    harness.cancel(session, reason="done")
    _drain(app)
    types = [json.loads(r["body"])["type"] for r in receiver.received]
    assert types == ["session.started", "turn.completed", "session.cancel_requested", "session.ended"]
    verifier = Webhook(created["secret"])
    for request in receiver.received:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        payload = verifier.verify(request["body"], headers)
        assert payload["data"]["sessionId"] == str(session["_id"])
    ended = json.loads(receiver.received[-1]["body"])["data"]
    assert ended["status"] == "terminated" and ended["endReason"] == "cancelled"
    assert set(ended) <= {"sessionId", "teamId", "status", "endReason", "seq", "turnId"}  # thin: no transcript text
    with app.app_context():
        assert webhooks.sweep_missed() == 0  # the sweep finds nothing new to deliver


def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt(app, harness, factory, login):
    failing = Receiver([500, 503]).start()
    try:
        admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
        hook = _register(admin, failing.url, ["session.started"])
        harness.start(message=None)
        _drain(app)
    finally:
        failing.stop()
    assert [r["status"] for r in failing.received] == [500, 503, 200]
    ids = {r["headers"]["webhook-id"] for r in failing.received}
    assert len(ids) == 1  # the same delivery, signed afresh each time
    deliveries = admin.client.get(f"/{admin.user.team_id}/webhook/{hook['_id']}/deliveries.json").get_json()
    (delivery,) = deliveries["deliveries"]
    assert delivery["status"] == "delivered" and [a["statusCode"] for a in delivery["attempts"]] == [500, 503, 200]


def test_a_delivery_that_keeps_failing_is_given_up_and_can_be_redelivered(app, harness, factory, login):
    failing = Receiver([500] * 4).start()
    try:
        admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
        hook = _register(admin, failing.url, ["session.started"])
        harness.start(message=None)
        _drain(app)
        path = f"/{admin.user.team_id}/webhook/{hook['_id']}/deliveries.json"
        (delivery,) = admin.client.get(path).get_json()["deliveries"]
        assert delivery["status"] == "failed" and delivery["attemptCount"] == 4
        again = admin.json(
            "POST", f"/{admin.user.team_id}/forms/webhook/{hook['_id']}/delivery/{delivery['_id']}/redeliver"
        )
        assert again.status_code == 202
        _drain(app)
    finally:
        failing.stop()
    (delivery,) = admin.client.get(path).get_json()["deliveries"]
    assert delivery["status"] == "delivered"


def test_rotating_the_secret_signs_with_the_new_one(app, harness, factory, login, receiver):
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    hook = _register(admin, receiver.url, ["session.started"])
    rotated = admin.json("POST", f"/{admin.user.team_id}/forms/webhook/{hook['_id']}/rotate").get_json()
    assert rotated["secret"] != hook["secret"]
    harness.start(message=None)
    _drain(app)
    request = receiver.received[-1]
    headers = {k.lower(): v for k, v in request["headers"].items()}
    Webhook(rotated["secret"]).verify(request["body"], headers)
    with pytest.raises(Exception):  # noqa: B017 - any verification error
        Webhook(hook["secret"]).verify(request["body"], headers)


def test_endpoints_on_loopback_or_private_addresses_are_refused_unless_allowed(make_app):
    from tests.support import Client, Factory

    strict = make_app(WEBHOOK_ALLOW_PRIVATE=False, WEBHOOK_REQUIRE_HTTPS=True)
    maker = Factory(strict)
    admin = Client(strict.test_client(), maker.user("admin")).login()
    path = f"/{admin.user.team_id}/forms/webhook/add"
    for url in (
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://10.0.0.5/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "http://example.com/hook",  # https only here
        "https://user:pw@example.com/hook",
        "ftp://example.com/hook",
    ):
        response = admin.json("POST", path, {"url": url})
        assert response.status_code == 400 and response.get_json()["code"] == 400, url


def test_a_destination_is_checked_again_when_sending(app, harness, factory, login, receiver):
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    _register(admin, receiver.url, ["session.started"])
    app.config["WEBHOOK_ALLOW_PRIVATE"] = False  # the operator closes private addresses after registration
    harness.start(message=None)
    _drain(app)
    assert receiver.received == []
