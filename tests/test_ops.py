"""Liveness, readiness, metrics, request ids and log context."""

from __future__ import annotations

import json
import logging
import re

from agentcloud_clone.logs import ContextFilter, set_job_context
from tests.support import run_queued_turn


def _sample(text: str, name: str, labels: str = "") -> float:
    """The value of one series in Prometheus text (0 when absent)."""
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_healthz_and_readyz(client):
    assert client.get("/healthz").get_json() == {"ok": True}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"mongo": "ok", "redis": "ok", "workers": "ok"}


def test_readyz_fails_while_no_worker_is_alive_where_workers_are_expected(make_app):
    from agentcloud_clone.jobs.reaper import beat_presence, leave_presence

    app = make_app(REQUIRE_WORKERS=True)
    client = app.test_client()
    idle = client.get("/readyz")
    assert idle.status_code == 503 and idle.get_json()["checks"]["workers"] == "none alive"
    beat_presence(app, "worker-1")
    ready = client.get("/readyz").get_json()
    assert ready["ok"] is True and ready["workers"] == 1
    leave_presence(app, "worker-1")
    assert client.get("/readyz").status_code == 503


def test_readyz_is_503_when_redis_is_unreachable(make_app):
    app = make_app(REDIS_URL="redis://127.0.0.1:1/0")
    response = app.test_client().get("/readyz")
    body = response.get_json()
    assert response.status_code == 503 and body["code"] == 503 and body["checks"]["redis"] == "unavailable"


def test_metrics_count_requests_sessions_and_polls(factory, login, client, app):
    me = login(factory.user("member"))
    for _ in range(3):
        me.client.get(f"/{me.user.team_id}/sessions.json")
    app_id = factory.app_record(me.user.team_id, steps=2, stepDelay=0)
    waiting = factory.session(me.user, app_id, "hello")
    run_queued_turn(app, waiting["_id"])
    factory.session(me.user, app_id)
    text = client.get("/metrics").get_data(as_text=True)
    labels = '{endpoint="/<resourceSlug>/sessions.json",method="GET",status="200"}'
    assert _sample(text, "agentcloud_http_request_duration_seconds_count", labels) == 3
    assert _sample(text, "agentcloud_sessions", '{status="waiting"}') == 1
    assert _sample(text, "agentcloud_sessions", '{status="started"}') == 1
    assert _sample(text, "agentcloud_sessions", '{status="running"}') == 0


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    assert len(client.get("/healthz").headers["X-Request-ID"]) == 32


def test_log_records_carry_request_and_job_ids(app):
    from pythonjsonlogger.json import JsonFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    with app.test_request_context("/", headers={"X-Request-ID": "req-1"}):
        app.preprocess_request()
        set_job_context(session_id="s1", job_id="j1")
        ContextFilter().filter(record)
        set_job_context()
    line = json.loads(JsonFormatter("%(message)s").format(record))
    assert line["request_id"] == "req-1" and line["session_id"] == "s1" and line["job_id"] == "j1"


def test_app_boots_while_mongodb_is_down_and_reports_not_ready(make_app):
    from devtools.servers import free_port

    dead = f"mongodb://127.0.0.1:{free_port()}/x?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    app = make_app(MONGO_URI=dead)
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["mongo"] == "unavailable"


def test_metrics_token_guards_the_scrape(make_app):
    app = make_app(METRICS_TOKEN="scrape-me")
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200


def test_metrics_of_deployments_sharing_a_redis_stay_apart(make_app):
    first, second = make_app(), make_app()
    for _ in range(3):
        first.test_client().get("/readyz")
    text = second.test_client().get("/metrics").get_data(as_text=True)
    assert 'endpoint="/readyz"' not in text
    assert 'endpoint="/readyz"' in first.test_client().get("/metrics").get_data(as_text=True)
