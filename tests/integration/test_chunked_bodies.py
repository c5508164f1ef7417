"""MAX_CONTENT_LENGTH under real gunicorn, however the body is framed: `Transfer-Encoding: chunked` bodies over the
limit get the same 413 as the same bytes with a Content-Length, on JSON and form routes, signed in or not."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from urllib.parse import urlencode, urlsplit

import pytest

from devtools.stack import Stack

pytestmark = pytest.mark.integration
FOUR_MB = "x" * (4 * 1024 * 1024)
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def stack(mongo_server, redis_server) -> Iterator[Stack]:
    product = Stack(mongo_server.url, redis_server.url)
    try:
        yield product.start(webs=1, workers=0)
    finally:
        product.stop()


def _post(url: str, path: str, body: bytes, content_type: str, *, chunked: bool, headers: dict[str, str]) -> tuple:
    """POST over a raw socket, as any client may frame it; the status and JSON body of the answer.

    The server may answer before it has read the whole body and close, so a failed send still reads the answer."""
    parts = urlsplit(url)
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"Content-Type: {content_type}",
        "Accept: application/json",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        step = 64 * 1024
        payload = b"".join(
            f"{len(body[i : i + step]):x}\r\n".encode() + body[i : i + step] + b"\r\n"
            for i in range(0, len(body), step)
        )
        payload += b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        with contextlib.suppress(OSError):  # answered and closed before the whole body was sent
            conn.sendall(payload)
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except OSError:
            pass
    head, _, rest = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = rest.partition(b"\r\n")
        rest = rest[: int(size, 16)]
    return status, json.loads(rest or b"null")


def test_chunked_bodies_over_the_limit_are_413_like_the_same_bytes_with_a_content_length(stack):
    team, key = stack.demo["teamId"], {"Authorization": f"Bearer {stack.demo['apiKey']}"}
    app_id = stack.demo["appId"]
    cases = [
        ("/forms/account/login", json.dumps({"email": "a@b.example", "password": FOUR_MB}), JSON, {}),
        ("/login", urlencode({"email": "a@b.example", "password": FOUR_MB}), FORM, {}),
        (f"/{team}/forms/session/add", json.dumps({"appId": app_id, "message": FOUR_MB}), JSON, key),
        (f"/{team}/forms/session/add", urlencode({"appId": app_id, "message": FOUR_MB}), FORM, key),
        ("/api/managed-agents/sessions", json.dumps({"appId": app_id, "message": FOUR_MB}), JSON, key),
    ]
    answers = {}
    for path, body, content_type, headers in cases:
        for chunked in (False, True):
            answers[(path, content_type, chunked)] = _post(
                stack.url, path, body.encode(), content_type, chunked=chunked, headers=headers
            )
    wrong = {case: answer for case, answer in answers.items() if answer[0] != 413}
    assert not wrong, wrong
    assert {json.dumps(body) for _, body in answers.values()} == {
        json.dumps({"code": 413, "message": "Request body too large."})
    }


def test_a_chunked_body_past_the_limit_is_not_cut_and_accepted(stack):
    team, key = stack.demo["teamId"], {"Authorization": f"Bearer {stack.demo['apiKey']}"}
    body = f"appId={stack.demo['appId']}&csrf_token={'p' * 1024 * 1024}&message=after+the+limit".encode()
    status, answer = _post(stack.url, f"/{team}/forms/session/add", body, FORM, chunked=True, headers=key)
    assert status == 413, answer


def test_a_chunked_body_under_the_limit_is_served(stack):
    team, key = stack.demo["teamId"], {"Authorization": f"Bearer {stack.demo['apiKey']}"}
    for body, content_type in (
        (json.dumps({"appId": stack.demo["appId"], "name": "chunked json"}), JSON),
        (urlencode({"appId": stack.demo["appId"], "name": "chunked form"}), FORM),
    ):
        status, answer = _post(
            stack.url, f"/{team}/forms/session/add", body.encode(), content_type, chunked=True, headers=key
        )
        assert status == 200, answer
        assert stack.api("GET", f"/{team}/session/{answer['_id']}.json").json()["session"]["name"].startswith("chunked")
