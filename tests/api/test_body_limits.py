"""MAX_CONTENT_LENGTH holds however a body is framed: a chunked body (no Content-Length) over the limit is a 413 like
the same bytes with a Content-Length, and is never cut at the limit and read as if it were whole. Run here as a
server that de-chunks (gunicorn, Werkzeug's) hands it on: `wsgi.input_terminated` set, no Content-Length; the
integration tier sends real chunked requests to gunicorn."""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import urlencode

import pytest

LIMIT = 1024 * 1024
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


def _post(client: Any, path: str, body: bytes, content_type: str, *, chunked: bool, **headers: str) -> Any:
    if chunked:
        return client.post(
            path,
            input_stream=io.BytesIO(body),
            content_type=content_type,
            headers={"Transfer-Encoding": "chunked", "Accept": JSON, **headers},
            environ_overrides={"wsgi.input_terminated": True},
        )
    return client.post(path, data=body, content_type=content_type, headers={"Accept": JSON, **headers})


@pytest.fixture
def caller(factory: Any, app: Any) -> dict[str, Any]:
    user = factory.user("member", api_key=True)
    return {"user": user, "app_id": factory.app_record(user.team_id), "auth": f"Bearer {user.api_key}"}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_on_json_and_form_routes(app, caller, chunked):
    assert app.config["MAX_CONTENT_LENGTH"] == LIMIT
    team, auth = caller["user"].team_id, caller["auth"]
    four_mb = "x" * (4 * 1024 * 1024)
    cases = [
        ("/forms/account/login", json.dumps({"email": "a@b.example", "password": four_mb}), JSON, {}),
        ("/login", urlencode({"email": "a@b.example", "password": four_mb}), FORM, {}),
        (f"/{team}/forms/session/add", json.dumps({"appId": caller["app_id"], "message": four_mb}), JSON, auth),
        (f"/{team}/forms/session/add", urlencode({"appId": caller["app_id"], "message": four_mb}), FORM, auth),
        ("/api/managed-agents/cancel", json.dumps({"sessionId": "a" * 24, "reason": four_mb}), JSON, auth),
    ]
    for path, body, content_type, authorization in cases:
        headers = {"Authorization": authorization} if authorization else {}
        response = _post(app.test_client(), path, body.encode(), content_type, chunked=chunked, **headers)
        assert response.status_code == 413, (path, content_type, response.status_code, response.get_json())
        assert response.get_json() == {"message": "Request body too large.", "code": 413}


def test_a_chunked_body_is_never_cut_at_the_limit_and_read_as_whole(app, caller):
    """The fields after the first MiB must not silently vanish: here the message would, and the session would be
    started without it."""
    team = caller["user"].team_id
    padding = "p" * LIMIT  # csrf_token is ignored for API keys, so it pads without failing validation
    body = f"appId={caller['app_id']}&csrf_token={padding}&message=the+part+after+the+limit".encode()
    response = _post(
        app.test_client(), f"/{team}/forms/session/add", body, FORM, chunked=True, Authorization=caller["auth"]
    )
    assert response.status_code == 413, response.get_json()


def test_a_chunked_body_under_the_limit_is_read_whole(app, caller):
    team = caller["user"].team_id
    message = "m" * 90_000
    for body, content_type in (
        (json.dumps({"appId": caller["app_id"], "message": message}).encode(), JSON),
        (urlencode({"appId": caller["app_id"], "message": message}).encode(), FORM),
    ):
        response = _post(
            app.test_client(),
            f"/{team}/forms/session/add",
            body,
            content_type,
            chunked=True,
            Authorization=caller["auth"],
        )
        assert response.status_code == 200, response.get_json()
        sid = response.get_json()["_id"]
        events = (
            app.test_client()
            .get(f"/{team}/session/{sid}/messages.json", headers={"Authorization": caller["auth"]})
            .get_json()["messages"]
        )
        assert events[0]["text"] == message
