"""Liveness, readiness, metrics, request ids and log context."""

from __future__ import annotations

import json
import logging

from agentcloud_clone import create_app
from agentcloud_clone.ops import ContextFilter
from tests.conftest import make_test_config


def test_healthz_and_readyz(client):
    assert client.get("/healthz").get_json() == {"ok": True}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"] == {"mongo": "ok", "redis": "ok"}


def test_readyz_is_503_when_redis_is_unreachable(redis_server):
    app = create_app(make_test_config("redis://127.0.0.1:1/0", "mongomock://localhost/{db}"))
    response = app.test_client().get("/readyz")
    body = response.get_json()
    assert response.status_code == 503 and body["code"] == 503 and body["checks"]["redis"] == "unavailable"


def test_metrics_exposes_the_shared_series(factory, login, client):
    me = login(factory.user("member"))
    me.client.get(f"/{me.user.team_id}/sessions.json")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'agentcloud_http_request_duration_seconds_count{endpoint="/<resourceSlug>/sessions.json"' in text
    assert "agentcloud_cancel_to_stop_seconds" in text
    assert 'agentcloud_sessions{status="running"}' in text
    assert "agentcloud_cancel_poll_queries_total" in text


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    assert len(client.get("/healthz").headers["X-Request-ID"]) == 32


def test_log_records_carry_request_and_job_ids(app):
    from pythonjsonlogger.json import JsonFormatter

    from agentcloud_clone.jobs.context import set_job_context

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    with app.test_request_context("/", headers={"X-Request-ID": "req-1"}):
        app.preprocess_request()
        set_job_context(session_id="s1", job_id="j1")
        ContextFilter().filter(record)
        set_job_context()
    line = json.loads(JsonFormatter("%(message)s").format(record))
    assert line["request_id"] == "req-1" and line["session_id"] == "s1" and line["job_id"] == "j1"


def test_app_boots_while_mongodb_is_down_and_reports_not_ready(redis_server):
    from devtools.servers import free_port

    dead = f"mongodb://127.0.0.1:{free_port()}/x?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    app = create_app(make_test_config(redis_server.url, dead))
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["mongo"] == "unavailable"


def test_metrics_token_guards_the_scrape(redis_server):
    app = create_app(make_test_config(redis_server.url, "mongomock://localhost/{db}", METRICS_TOKEN="scrape-me"))
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200


def test_metrics_of_deployments_sharing_a_redis_stay_apart(redis_server):
    first = create_app(make_test_config(redis_server.url, "mongomock://localhost/{db}"))
    second = create_app(make_test_config(redis_server.url, "mongomock://localhost/{db}"))
    for _ in range(3):
        first.test_client().get("/readyz")
    text = second.test_client().get("/metrics").get_data(as_text=True)
    assert 'endpoint="/readyz"' not in text
    assert 'endpoint="/readyz"' in first.test_client().get("/metrics").get_data(as_text=True)
