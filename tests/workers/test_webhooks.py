"""Signed webhooks: registration (with SSRF checks), one delivery per event, back-off retries, redelivery."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from rq import Queue
from standardwebhooks import Webhook

from agentcloud_clone import queueing
from agentcloud_clone.config import Config
from agentcloud_clone.db import get_db
from agentcloud_clone.queueing import get_redis
from agentcloud_clone.repositories import sessions as sessions_repo
from agentcloud_clone.services import sessions as session_service
from agentcloud_clone.services import webhooks
from agentcloud_clone.vocabulary import EndReason
from tests.fakes.receiver import Receiver
from tests.workers.harness import FAST, RUNNER_MODULES

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {
        **FAST,
        "PYTHON_RUNNER_MODULES": RUNNER_MODULES,
        "WEBHOOK_ALLOW_PRIVATE": True,  # the receiver is on loopback
        "WEBHOOK_RETRY_INTERVALS": ["0", "0", "0"],  # retry at once (the reaper's sweep queues retries when due)
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


def test_the_sweep_announces_a_start_it_missed_but_not_a_create_that_answered_an_error(
    app, harness, factory, login, receiver, monkeypatch
):
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    _register(admin, receiver.url, ["session.started"])
    monkeypatch.setattr(webhooks, "on_session_started", lambda session: None)  # the announcement is lost
    missed, failed = harness.start(), harness.start()
    with app.app_context():  # the second's create answered 503 after its insert: left for the reaper to remove
        get_db().sessions.update_one({"_id": failed["_id"]}, {"$set": {"unansweredSince": failed["startDate"]}})
    _drain(app)
    started = [json.loads(r["body"])["data"]["sessionId"] for r in receiver.received]
    assert started == [str(missed["_id"])]


@pytest.mark.parametrize("ended_by", ["the web's cancel", "its worker, after the web's cancel"])
def test_an_end_is_recorded_for_webhooks_at_its_commit_not_after_its_events_insert(
    app, harness, factory, login, receiver, monkeypatch, ended_by
):
    """The ending write's commit is what makes the session ended: its `session.ended` delivery is recorded from
    there, while the events' insert is still on its way (a store round trip sooner, under load hundreds of ms),
    and the transcript still gets every event. A worker's end follows the web's cancel, whose events it cannot
    know were stored (another process wrote them): it stores them first, and announces its own at commit still."""
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    _register(admin, receiver.url, ["session.ended"])
    by_worker = ended_by.startswith("its worker")
    session = harness.start(message="hello" if by_worker else None)
    if by_worker:
        with app.app_context():
            Queue(app.config["TURN_QUEUE"], connection=get_redis()).remove(f"turn-{session['activeTurnId']}")
            assert session_service.claim_turn(session["teamId"], session["_id"], session["activeTurnId"], "w:1")
        harness.cancel(session)  # stamps the running session; its worker ends it
        sessions_repo._confirmed.clear()  # as in the worker's own process, which did not write the cancel
    real = sessions_repo.insert_events
    recorded_first: list[bool] = []

    def after_the_delivery(events: Any, **kwargs: Any) -> Any:
        if any(event["type"] == "status" for event in events):
            with app.app_context():
                delivery = get_db().webhook_deliveries.count_documents({"type": "session.ended"})
                if not delivery and webhooks.settle(10):
                    delivery = get_db().webhook_deliveries.count_documents({"type": "session.ended"})
            recorded_first.append(delivery == 1)
        return real(events, **kwargs)

    monkeypatch.setattr(sessions_repo, "insert_events", after_the_delivery)
    if by_worker:
        with app.app_context():
            ended = session_service.end_turn(
                session["teamId"], session["_id"], session["activeTurnId"], EndReason.CANCELLED, "stopped"
            )
        assert ended is not None
    else:
        harness.cancel(session)
    assert recorded_first == [True]
    _drain(app)
    (ended_hook,) = [json.loads(r["body"]) for r in receiver.received]
    assert ended_hook["type"] == "session.ended" and ended_hook["data"]["sessionId"] == str(session["_id"])
    with app.app_context():
        kinds = [e["type"] for e in get_db().session_events.find({"sessionId": session["_id"]}).sort("seq", 1)]
    assert kinds == (["message", "cancel", "status"] if by_worker else ["cancel", "status"])


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
    harness.start(message=None)  # a delivery first: this process keeps a copy of the endpoint
    _drain(app)
    Webhook(hook["secret"]).verify(
        receiver.received[-1]["body"], {k.lower(): v for k, v in receiver.received[-1]["headers"].items()}
    )
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


def _deliveries(app: Any) -> list[dict[str, Any]]:
    with app.app_context():
        return list(get_db().webhook_deliveries.find().sort("_id", 1))


def _queue_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """Webhook jobs go to a Redis that is not there (refused connections), as while redis-server is down."""

    def unreachable() -> Queue:
        return Queue("turns.webhooks", connection=redis.Redis.from_url(UNREACHABLE_REDIS, socket_timeout=0.5))

    monkeypatch.setattr(queueing, "webhook_queue", unreachable)


def _later(monkeypatch: pytest.MonkeyPatch, minutes: float = 5) -> None:
    """The webhook service's clock moves on (past any lease just given), without waiting for it."""
    real = webhooks.utcnow
    monkeypatch.setattr(webhooks, "utcnow", lambda: real() + timedelta(minutes=minutes))


def _ids(receiver: Receiver) -> set[str]:
    return {r["headers"]["webhook-id"] for r in receiver.received}


def test_the_default_retry_schedule_spans_at_least_a_day_and_backs_off():
    intervals = [float(v) for v in Config({"SECRET_KEY": "x"}).values["WEBHOOK_RETRY_INTERVALS"]]
    assert sum(intervals) >= 24 * 3600
    assert intervals == sorted(intervals) and intervals[0] < intervals[-1]


def test_a_delivery_whose_job_could_not_be_queued_while_redis_was_down_is_sent_by_the_reaper(
    app, harness, factory, login, receiver, monkeypatch
):
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    _register(admin, receiver.url, ["session.started"])
    with monkeypatch.context() as patch:
        _queue_away(patch)
        harness.start(message=None)
        with app.app_context():
            assert webhooks.settle(20)
            (delivery,) = _deliveries(app)
            assert delivery["status"] == "pending" and receiver.received == []
            assert webhooks.sweep_missed() == 0  # the queue is still away: it stays pending, and due
        assert _deliveries(app)[0]["status"] == "pending"
    _drain(app)  # Redis is back: the reaper's next pass queues it
    assert [r["status"] for r in receiver.received] == [200]
    assert _ids(receiver) == {str(delivery["_id"])}
    assert _deliveries(app)[0]["status"] == "delivered"


def test_a_delivery_whose_job_was_lost_is_queued_again_once_its_lease_runs_out(
    app, harness, factory, login, receiver, monkeypatch
):
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    _register(admin, receiver.url, ["session.started"])
    harness.start(message=None)
    with app.app_context():
        assert webhooks.settle(20)
        queue = Queue(app.config["WEBHOOK_QUEUE"], connection=get_redis())
        assert len(queue.get_job_ids()) == 1
        assert webhooks.sweep_missed() == 0  # its job is queued and its lease is not over: nothing to do
        queue.empty()  # the job is lost (Redis restarted without its data)
        (delivery,) = _deliveries(app)
        assert delivery["status"] == "queued"
        _later(monkeypatch)  # WEBHOOK_LEASE (2 min) later
        assert webhooks.sweep_missed() == 1
    _drain(app)
    assert [r["status"] for r in receiver.received] == [200]
    assert _ids(receiver) == {str(delivery["_id"])}
    (done,) = _deliveries(app)
    assert done["status"] == "delivered" and done["attemptCount"] == 2  # the lost job's claimed attempt counts


class WorkerKilled(BaseException):
    """Stands for a worker killed (or failed by MongoDB) in the middle of an attempt."""


def test_an_attempt_whose_job_died_counts_and_the_delivery_is_retried_with_the_same_id(
    app, harness, factory, login, receiver, monkeypatch
):
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    _register(admin, receiver.url, ["session.started"])
    real_post = webhooks._post
    with monkeypatch.context() as patch:

        def killed(*args: Any) -> int:
            real_post(*args)  # the receiver got it; the worker died before recording the answer
            raise WorkerKilled

        patch.setattr(webhooks, "_post", killed)
        harness.start(message=None)
        with app.app_context():
            assert webhooks.settle(20)
            queue = Queue(app.config["WEBHOOK_QUEUE"], connection=get_redis())
            (job,) = queue.get_jobs()
            queue.remove(job)  # a worker took it
            with pytest.raises(WorkerKilled):
                job.perform()
    (delivery,) = _deliveries(app)
    # The first attempt was claimed as the delivery was recorded (it still says queued), every later one as it
    # starts (`sending`): each counts, leased to its job.
    assert delivery["status"] == "queued" and delivery["attemptCount"] == 1
    with app.app_context():
        assert webhooks.sweep_missed() == 0  # leased to the dead job for now
        _later(monkeypatch)
        assert webhooks.sweep_missed() == 1
    _drain(app)
    assert len(receiver.received) == 2 and _ids(receiver) == {str(delivery["_id"])}  # the receiver deduplicates
    (done,) = _deliveries(app)
    assert done["status"] == "delivered" and done["attemptCount"] == 2


def test_a_redelivery_asked_for_while_redis_is_down_is_sent_by_the_reaper(
    app, harness, factory, login, receiver, monkeypatch
):
    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    hook = _register(admin, receiver.url, ["session.started"])
    harness.start(message=None)
    _drain(app)
    (delivery,) = _deliveries(app)
    path = f"/{admin.user.team_id}/forms/webhook/{hook['_id']}/delivery/{delivery['_id']}/redeliver"
    with monkeypatch.context() as patch:
        _queue_away(patch)
        again = admin.json("POST", path)
        assert again.status_code == 202 and again.get_json()["delivery"]["status"] == "pending"
    _drain(app)
    assert len(receiver.received) == 2 and _ids(receiver) == {str(delivery["_id"])}
    assert _deliveries(app)[0]["status"] == "delivered"


def test_a_turn_handed_back_by_a_shutdown_announces_no_completion(app, harness, factory, login, receiver):
    from agentcloud_clone.services import sessions as sessions_service

    admin = login(factory.user("admin", {"_id": harness.user.team_oid}))
    _register(admin, receiver.url, ["turn.completed"])
    session = harness.start(steps=2, stepDelay=0)
    with app.app_context():
        claimed = sessions_service.claim_turn(session["teamId"], session["_id"], session["activeTurnId"], "test:1")
        assert claimed
        outcome = sessions_service.requeue_interrupted_turn(
            session["teamId"], session["_id"], session["activeTurnId"], 2, interrupted=True
        )
    assert outcome == "requeued"
    _drain(app)
    assert receiver.received == []  # the turn runs again; its completion is announced then
    harness.run(session)
    _drain(app)
    assert [json.loads(r["body"])["type"] for r in receiver.received] == ["turn.completed"]
