"""What `make contract` found the server doing other than `openapi.yaml` says, pinned in-process so it stays fixed:
requests the spec calls invalid are refused, requests it calls valid are taken, and no route answers for another."""

from __future__ import annotations

from typing import Any

import pytest

from .specs import spec_operations


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {"WEBHOOK_ALLOW_PRIVATE": True}  # registrations below name loopback, and nothing is ever delivered


def _documented(spec: dict[str, Any], method: str, path: str, status: int) -> bool:
    return str(status) in spec_operations(spec)[(method, path)]["responses"]


def test_numbers_in_settings_and_limits_are_json_numbers(factory, api_key_client):
    admin = factory.user("admin", api_key=True)
    call = api_key_client(admin)
    add = f"/{admin.team_id}/forms/app/add"
    refused = [
        {"config": {"steps": "3"}},  # numeric text
        {"config": {"steps": 3.5}},  # marshmallow's Integer cut this to 3
        {"config": {"steps": True}},
        {"config": {"stepDelay": "0.5"}},
        {"limits": {"queueTtl": "60"}},
        {"limits": {"tokenBudget": "1000"}},
        {"limits": {"tokenBudget": 10.5}},
    ]
    for body in refused:
        assert call("POST", add, {"name": "x", **body}).status_code == 400, body
    # JSON Schema counts 3.0 as an integer, and so does the server now.
    taken = call("POST", add, {"name": "x", "config": {"steps": 3.0, "stepDelay": 1}, "limits": {"tokenBudget": 98.0}})
    assert taken.status_code == 200, taken.get_json()
    app = call("GET", f"/{admin.team_id}/app/{taken.get_json()['_id']}.json").get_json()["app"]
    assert app["config"]["steps"] == 3 and app["limits"] == {"tokenBudget": 98}


def test_json_bodies_carry_json_booleans_objects_and_lists(factory, api_key_client, login):
    admin = factory.user("admin", api_key=True)
    call = api_key_client(admin)
    team = admin.team_id
    app_id = factory.app_record(team)
    refused = [
        ("/forms/session/add", {"appId": app_id, "skipRun": 1}),
        ("/forms/session/add", {"appId": app_id, "skipRun": "true"}),
        ("/forms/session/bulk-cancel", {"all": True, "dryRun": 0}),
        ("/forms/session/bulk-cancel", {"all": "true"}),
        ("/forms/app/add", {"name": "x", "requiredVariables": "a,b"}),
        ("/forms/app/add", {"name": "x", "config": "{}"}),
        ("/forms/app/add", {"name": "x", "limits": ""}),
        ("/forms/team/edit", {"limits": "{}"}),
    ]
    for path, body in refused:
        response = call("POST", f"/{team}{path}", body)
        assert response.status_code == 400, (path, body, response.get_json())
    # HTML forms send all of these as text, and still may.
    browser = login(admin)
    form = {"name": "a form", "config": '{"steps": 2}', "limits": '{"idleTimeout": 60}', "requiredVariables": "a, b"}
    assert browser.form(f"/{team}/forms/app/add", form).status_code == 302
    assert browser.form(f"/{team}/forms/session/add", {"appId": app_id, "skipRun": "on"}).status_code == 302


def test_the_routes_beside_a_collection_s_items_are_not_items(spec, factory, api_key_client):
    """`/sessions/bulk-cancel` is not a session id: only its POST is served there (`405` with `Allow`), while a
    malformed id elsewhere is still a `400`."""
    user = factory.user("admin", api_key=True)
    call = api_key_client(user)
    for method, path in [
        ("GET", "/api/managed-agents/sessions/bulk-cancel"),
        ("DELETE", "/api/managed-agents/sessions/bulk-cancel"),
        ("DELETE", f"/{user.team_id}/forms/session/bulk-cancel"),
        ("DELETE", f"/{user.team_id}/forms/session/add"),
    ]:
        response = call(method, path)
        assert response.status_code == 405 and set(response.headers["Allow"].split(", ")) == {"OPTIONS", "POST"}, path
    assert call("GET", "/api/managed-agents/sessions/add").status_code == 400
    assert _documented(spec, "GET", "/api/managed-agents/sessions/{sessionId}", 400)


def test_webhook_registration_refuses_what_the_spec_says(spec, factory, api_key_client):
    admin = factory.user("admin", api_key=True)
    call = api_key_client(admin)
    add = f"/{admin.team_id}/forms/webhook/add"
    for url in ("http://[::1/x", "http://a]b/x", "http://[nope]/x"):  # urlsplit raised: a 500 before
        assert call("POST", add, {"url": url}).status_code == 400, url
    for n in range(20):
        assert call("POST", add, {"url": f"http://127.0.0.1:9/{n}"}).status_code == 201
    # A schema-valid registration the team's state refuses: a 409, not a 400.
    full = call("POST", add, {"url": "http://127.0.0.1:9/one-too-many"})
    assert full.status_code == 409 and _documented(spec, "POST", "/{resourceSlug}/forms/webhook/add", 409)


@pytest.mark.parametrize("operation", ["team", "managed"])
def test_every_stream_cursor_sent_is_checked(spec, factory, api_key_client, operation):
    user = factory.user("member", api_key=True)
    sid = str(factory.session(user, factory.app_record(user.team_id))["_id"])
    path = {
        "team": f"/{user.team_id}/session/{sid}/events",
        "managed": f"/api/managed-agents/sessions/{sid}/stream",
    }[operation]
    call = api_key_client(user)
    for query, headers in [
        ("?after=9223372036854775808", {"Last-Event-ID": "0"}),  # the header wins, but the query is still checked
        ("?after=", {}),
        ("", {"Last-Event-ID": ""}),
        ("?after=1", {"Last-Event-ID": "x"}),
    ]:
        response = call("GET", path + query, headers=headers, buffered=False)
        response.close()
        assert response.status_code == 400, (query, headers)


def test_a_dry_run_checks_its_idempotency_key(spec, factory, api_key_client):
    admin = factory.user("admin", api_key=True)
    path = f"/{admin.team_id}/forms/session/bulk-cancel"
    body = {"all": True, "dryRun": True}
    call = api_key_client(admin)
    for key in ("", "x" * 256, "caf\u00e9"):
        response = call("POST", path, body, headers={"Idempotency-Key": key.encode().decode("latin-1")})
        assert response.status_code == 400, key
    assert call("POST", path, body, headers={"Idempotency-Key": "k1"}).status_code == 200
