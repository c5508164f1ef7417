"""What schemathesis cannot check from a generated request: the frames of a live stream, followed to the end of a
session, and the webhooks the service sends. Both are checked here against `openapi.yaml`'s own schemas, on a real
stack (gunicorn's gevent workers, a worker process) with webhooks delivered to a receiver on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from openapi_schema_validator import OAS31Validator
from standardwebhooks import Webhook

from devtools import contract
from devtools.servers import ManagedProcess
from devtools.stack import Stack
from tests.fakes.receiver import Receiver
from tests.support import wait_until

from .specs import spec_operations

pytestmark = pytest.mark.contract

STREAM_OPERATIONS = ("sessionEventStream", "managedSessionStream")
# A turn of three quick steps, and the session ends on its own after it (a stream of it closes by itself).
ONE_TURN = {"name": "live contract: one turn", "runner": "scripted", "config": {"steps": 3, "stepDelay": 0.05}}


@pytest.fixture(scope="module")
def stack(mongo_server: ManagedProcess, redis_server: ManagedProcess) -> Iterator[Stack]:
    settings = {**contract.STACK_SETTINGS, "SSE_HEARTBEAT": "0.2", "REAPER_INTERVAL": "0.5"}
    stack = Stack(mongo_server.url, redis_server.url, **settings)
    try:
        yield stack.start(webs=1, workers=1)
    finally:
        stack.stop()


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> OAS31Validator:
    """A validator of `schema` (which may name the spec's components) with formats checked."""
    return OAS31Validator({**schema, "components": spec["components"]}, format_checker=OAS31Validator.FORMAT_CHECKER)


def component(spec: dict[str, Any], name: str) -> OAS31Validator:
    return validator(spec, {"$ref": f"#/components/schemas/{name}"})


def assert_valid(check: OAS31Validator, value: Any) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in check.iter_errors(value)]
    assert not errors, (value, errors)


def operation(spec: dict[str, Any], operation_id: str) -> tuple[str, dict[str, Any]]:
    return next((path, op) for (_, path), op in spec_operations(spec).items() if op["operationId"] == operation_id)


def stream_url(stack: Stack, operation_id: str, sid: str) -> str:
    path = {
        "sessionEventStream": f"/{stack.demo['teamId']}/session/{sid}/events",
        "managedSessionStream": f"/api/managed-agents/sessions/{sid}/stream",
    }[operation_id]
    return stack.url + path


def open_stream(stack: Stack, operation_id: str, sid: str, **headers: str) -> requests.Response:
    auth = {"Authorization": f"Bearer {stack.demo['apiKey']}", "Accept": "text/event-stream", **headers}
    return requests.get(stream_url(stack, operation_id, sid), headers=auth, stream=True, timeout=30)


def frames(response: requests.Response) -> Iterator[dict[str, Any]]:
    """Every frame of an SSE response as its fields (comments under `comment`), as a client parses them."""
    fields: dict[str, Any] = {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            fields.setdefault("comment", []).append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def read_to_the_end(response: requests.Response) -> list[dict[str, Any]]:
    received = []
    for frame in frames(response):
        received.append(frame)
        if frame.get("event") == "session.ended":
            break
    response.close()
    return received


def turn_done(stack: Stack, sid: str) -> bool:
    return not stack.api("GET", f"/api/managed-agents/sessions/{sid}").json()["session"]["turnInFlight"]


def one_turn_session(stack: Stack, end_after_turn: bool = True) -> str:
    config = {**ONE_TURN["config"], **({"endAfterTurns": 1} if end_after_turn else {})}
    app = stack.api("POST", f"/{stack.demo['teamId']}/forms/app/add", {**ONE_TURN, "config": config}).json()
    body = {"appId": app["_id"], "message": "Hello from the live contract test."}
    return str(stack.api("POST", "/api/managed-agents/sessions", body).json()["session"]["_id"])


@pytest.mark.parametrize("operation_id", STREAM_OPERATIONS)
def test_a_live_stream_sends_the_frames_the_spec_describes(stack, spec, operation_id):
    _, op = operation(spec, operation_id)
    event, ended = component(spec, "Event"), component(spec, "SessionEndedFrame")
    sid = one_turn_session(stack)
    response = open_stream(stack, operation_id, sid)  # opened while the turn runs: the stream follows it live
    assert response.status_code == 200 and "200" in op["responses"]
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    received = read_to_the_end(response)

    assert received[0] == {"retry": "2000", "comment": ["connected"]}
    events = [f for f in received if "data" in f and "event" not in f]
    for frame in events:
        data = json.loads(frame["data"])
        assert_valid(event, data)
        assert frame["id"] == str(data["seq"])
    assert [int(f["id"]) for f in events] == list(range(1, len(events) + 1)), "seq order, none skipped or repeated"
    closing = json.loads(events[-1]["data"])
    assert closing["type"] == "status" and closing["endReason"] == "completed"
    final = received[-1]
    data = json.loads(final["data"])
    assert_valid(ended, data)
    assert final["id"] == events[-1]["id"] and data["lastSeq"] == closing["seq"]
    assert (data["sessionId"], data["status"], data["endReason"]) == (sid, closing["status"], closing["endReason"])
    # The same events as the transcript reads give.
    transcript = stack.api("GET", f"/api/managed-agents/sessions/{sid}/events").json()["events"]
    assert [json.loads(f["data"]) for f in events] == transcript


@pytest.mark.parametrize("operation_id", STREAM_OPERATIONS)
def test_a_stream_resumes_after_last_event_id_or_after(stack, spec, operation_id):
    sid = one_turn_session(stack)
    everything = [f for f in read_to_the_end(open_stream(stack, operation_id, sid)) if "id" in f]
    middle = everything[len(everything) // 2]["id"]
    by_header = read_to_the_end(open_stream(stack, operation_id, sid, **{"Last-Event-ID": middle}))
    by_query = requests.get(
        stream_url(stack, operation_id, sid) + f"?after={middle}",
        headers={"Authorization": f"Bearer {stack.demo['apiKey']}"},
        stream=True,
        timeout=30,
    )
    expected = [f for f in everything if int(f["id"]) > int(middle) or f.get("event") == "session.ended"]
    for resumed in (by_header, read_to_the_end(by_query)):
        assert [f for f in resumed if "id" in f] == expected
    # The header wins over the query.
    wins = requests.get(
        stream_url(stack, operation_id, sid) + "?after=0",
        headers={"Authorization": f"Bearer {stack.demo['apiKey']}", "Last-Event-ID": middle},
        stream=True,
        timeout=30,
    )
    assert [f for f in read_to_the_end(wins) if "id" in f] == expected


@pytest.mark.parametrize("operation_id", STREAM_OPERATIONS)
@pytest.mark.parametrize("cursor", ["x", "-1", "1.5", "9223372036854775808", "١"])
def test_a_cursor_that_is_not_a_seq_is_a_documented_400(stack, spec, operation_id, cursor):
    _, op = operation(spec, operation_id)
    sid = one_turn_session(stack)
    response = open_stream(stack, operation_id, sid, **{"Last-Event-ID": cursor.encode().decode("latin-1")})
    assert response.status_code == 400 and "400" in op["responses"]
    assert_valid(component(spec, "dynamicResponse"), response.json())


def test_a_quiet_stream_sends_heartbeats_until_the_session_ends(stack):
    sid = one_turn_session(stack, end_after_turn=False)
    wait_until(lambda: turn_done(stack, sid))
    response = open_stream(stack, "managedSessionStream", sid)
    heartbeats = 0
    for frame in frames(response):
        heartbeats += frame.get("comment", []).count("heartbeat")
        if heartbeats == 2:
            stack.api("POST", "/api/managed-agents/cancel", {"sessionId": sid})
        if frame.get("event") == "session.ended":
            break
    response.close()
    assert heartbeats >= 2 and json.loads(frame["data"])["endReason"] == "cancelled"


def test_webhook_deliveries_match_the_spec_s_webhooks(stack, spec):
    team = stack.demo["teamId"]
    receiver = Receiver().start()
    created = stack.api("POST", f"/{team}/forms/webhook/add", {"url": receiver.url, "eventTypes": []})
    assert created.status_code == 201
    hook = created.json()
    try:
        sid = one_turn_session(stack, end_after_turn=False)
        wait_until(lambda: turn_done(stack, sid))
        stack.api("POST", f"/{team}/forms/session/{sid}/cancel", {"reason": "live contract test"})
        types = ["session.started", "turn.completed", "session.cancel_requested", "session.ended"]

        def mine() -> list[dict[str, Any]]:
            bodies = [(r, json.loads(r["body"])) for r in receiver.received]
            return [(r, body) for r, body in bodies if body["data"]["sessionId"] == sid]

        try:
            wait_until(lambda: sorted(body["type"] for _, body in mine()) == sorted(types), 60, "every webhook")
        except AssertionError as exc:
            got = [json.loads(r["body"]) for r in receiver.received]
            raise AssertionError(f"{exc}; received {got}") from None
        for request, body in mine():
            webhook = spec["webhooks"][body["type"]]["post"]
            schema = webhook["requestBody"]["content"]["application/json"]["schema"]
            assert_valid(validator(spec, schema), body)
            headers = {k.lower(): v for k, v in request["headers"].items()}
            for parameter in webhook["parameters"]:
                declared = spec["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[-1]]
                value: Any = headers[declared["name"]]
                if declared["schema"].get("type") == "integer":
                    value = int(value)
                assert_valid(validator(spec, declared["schema"]), value)
            assert Webhook(hook["secret"]).verify(request["body"], headers) == body
        _, op = operation(spec, "listWebhookDeliveries")
        deliveries = stack.api("GET", f"/{team}/webhook/{hook['_id']}/deliveries.json")
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert_valid(validator(spec, schema), deliveries.json())
        delivered = [d for d in deliveries.json()["deliveries"] if d["payload"]["data"]["sessionId"] == sid]
        assert {d["type"] for d in delivered} == set(types) and {d["status"] for d in delivered} == {"delivered"}
    finally:
        stack.api("DELETE", f"/{team}/forms/webhook/{hook['_id']}")
        receiver.stop()
