"""Live streams over real HTTP (gunicorn's gevent workers) and signed webhooks sent by worker processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from standardwebhooks import Webhook

from devtools.stack import Stack
from tests.fakes.receiver import Receiver
from tests.integration.common import events_of, session_of, start_running
from tests.support import wait_until

pytestmark = pytest.mark.integration
SLOW = '{"steps": 400, "stepDelay": 0.02}'


@pytest.fixture
def stack(mongo_server, redis_server) -> Iterator[Stack]:
    stack = Stack(
        mongo_server.url,
        redis_server.url,
        CANCEL_POLL_INTERVAL=0.2,
        OUTPUT_FLUSH_INTERVAL=0.05,
        SSE_HEARTBEAT=1,
        WEBHOOK_ALLOW_PRIVATE="true",
        WEBHOOK_RETRY_INTERVALS="1,1,1",
        REAPER_INTERVAL=0.5,  # the reaper queues retries whose back-off is over
    )
    try:
        yield stack.start(webs=1, workers=1)
    finally:
        stack.stop()


def sse(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The frames of a live SSE response as {id, event, data}."""
    fields: dict[str, str] = {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if "data" in fields:
                yield {
                    "id": fields.get("id"),
                    "event": fields.get("event", "message"),
                    "data": json.loads(fields["data"]),
                }
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def _open(stack: Stack, sid: str, last_id: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {stack.demo['apiKey']}", "Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    path = f"{stack.url}/{stack.demo['teamId']}/session/{sid}/events"
    response = requests.get(path, headers=headers, stream=True, timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    return response


def test_a_client_that_disconnects_mid_turn_resumes_with_no_gap_and_no_duplicate(stack):
    team = stack.demo["teamId"]
    app_id = stack.cli("apps", "create", team, "--name", "slow", "--config", SLOW)["appId"]
    sid = start_running(stack, app_id)
    first = _open(stack, sid)
    received: list[dict[str, Any]] = []
    for frame in sse(first):
        received.append(frame)
        if len(received) == 4:
            break
    first.close()  # the client goes away mid-turn
    stack.api("POST", f"/{team}/forms/session/{sid}/cancel")
    second = _open(stack, sid, received[-1]["id"])
    for frame in sse(second):
        received.append(frame)
        if frame["event"] == "session.ended":
            break
    second.close()
    assert received[-1]["data"]["endReason"] == "cancelled"
    transcript = events_of(stack, sid)
    assert [f["data"] for f in received[:-1]] == transcript
    assert [int(f["id"]) for f in received[:-1]] == list(range(1, len(transcript) + 1))


def test_another_teams_viewer_gets_no_stream(stack):
    team = stack.demo["teamId"]
    sid = stack.api("POST", f"/{team}/forms/session/add", {"appId": stack.demo["appId"]}).json()["_id"]
    outsider = stack.cli("users", "create", "outsider@example.com", "--password", "longenough", "--team", "Other")
    key = stack.cli("apikeys", "create", "outsider@example.com")["key"]
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    own_slug = requests.get(f"{stack.url}/{outsider['teamId']}/session/{sid}/events", headers=headers, timeout=10)
    their_slug = requests.get(f"{stack.url}/{team}/session/{sid}/events", headers=headers, timeout=10)
    assert (own_slug.status_code, their_slug.status_code) == (404, 403)


def test_a_receiver_failing_twice_gets_the_end_signed_on_the_third_attempt(stack):
    receiver = Receiver([500, 502]).start()
    try:
        team = stack.demo["teamId"]
        created = stack.api(
            "POST", f"/{team}/forms/webhook/add", {"url": receiver.url, "eventTypes": ["session.ended"]}
        ).json()
        sid = stack.api("POST", f"/{team}/forms/session/add", {"appId": stack.demo["appId"]}).json()["_id"]
        stack.api("POST", f"/{team}/forms/session/{sid}/cancel", {"reason": "done"})
        wait_until(lambda: len(receiver.received) >= 3, 60, "three delivery attempts")
    finally:
        receiver.stop()
    assert [r["status"] for r in receiver.received[:3]] == [500, 502, 200]
    last = receiver.received[2]
    payload = Webhook(created["secret"]).verify(last["body"], {k.lower(): v for k, v in last["headers"].items()})
    assert payload["type"] == "session.ended" and payload["data"]["sessionId"] == sid
    assert payload["data"]["endReason"] == "cancelled" and session_of(stack, sid)["endReason"] == "cancelled"


def test_a_webhook_on_loopback_is_refused_unless_allowed(mongo_server, redis_server):
    stack = Stack(mongo_server.url, redis_server.url, REQUIRE_WORKERS="false")
    try:
        stack.start(webs=1, workers=0)
        response = stack.api("POST", f"/{stack.demo['teamId']}/forms/webhook/add", {"url": "http://127.0.0.1:9/x"})
        assert response.status_code == 400 and "not a public address" in response.json()["message"]
    finally:
        stack.stop()
