"""Every bad input gets a clear 4xx: ids with anything after them, JSON nested to exhaust a parser, text that is
not Unicode, numbers MongoDB cannot store, digits of other scripts. Never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest

# A route of each kind of id, in the path, for an admin of the team (`{team}`, `{sid}`, `{app}` are filled in).
ID_PATHS = [
    ("GET", "/{team}/session/{id}.json"),
    ("GET", "/{team}/session/{id}/messages.json"),
    ("POST", "/{team}/forms/session/{id}/cancel"),
    ("DELETE", "/{team}/forms/session/{id}"),
    ("GET", "/{team}/app/{id}.json"),
    ("POST", "/{team}/forms/app/{id}/edit"),
    ("GET", "/{team}/operation/{id}.json"),
    ("POST", "/{team}/forms/member/{id}/edit"),
    ("GET", "/api/managed-agents/sessions/{id}"),
    ("GET", "/api/managed-agents/sessions/{id}/events"),
    ("POST", "/forms/account/apikey/{id}/revoke"),
]


def _error(response: Any, status: int = 400) -> dict[str, Any]:
    body = response.get_json()
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:200])
    assert isinstance(body, dict) and body["code"] == status and body["message"], body
    return body


@pytest.fixture
def admin(factory: Any, login: Any) -> Any:
    return login(factory.user("admin"))


# What follows the id, as a URL spells it and as a JSON string holds it (a client percent-encodes a newline in a
# path; Werkzeug's test client, like urllib, would silently drop a raw one).
SUFFIXES = [
    ("%0a", "\n"),
    ("%0A", "\n"),
    ("%0d%0a", "\r\n"),
    ("%00", "\x00"),
    ("%20", " "),
    ("%09", "\t"),
    ("%e2%80%a8", "\u2028"),
    ("%0a" * 3, "\n" * 3),
]


@pytest.mark.parametrize(("in_path", "in_body"), SUFFIXES)
def test_an_id_with_anything_after_it_is_400_in_paths_and_bodies(admin, factory, in_path, in_body):
    team = admin.user.team_id
    session_id = str(factory.session(admin.user, factory.app_record(team), None)["_id"])
    for method, path in ID_PATHS:
        # The real id with the suffix: a lenient parser would find the session.
        _error(admin.json(method, path.format(team=team, id=session_id + in_path), {}))
    _error(admin.json("GET", f"/{team + in_path}/sessions.json"))
    for path, body in (
        (f"/{team}/forms/session/add", {"appId": factory.app_record(team) + in_body}),
        ("/api/managed-agents/cancel", {"sessionId": session_id + in_body}),
        ("/api/managed-agents/sessions", {"appId": factory.app_record(team), "teamId": team + in_body}),
        (f"/{team}/forms/session/bulk-cancel", {"ids": [session_id + in_body]}),
        (f"/{team}/forms/session/{session_id}/cancel", {"sessionId": session_id + in_body}),
    ):
        _error(admin.json("POST", path, body))
    # A form field too.
    form = admin.form(f"/{team}/forms/session/add", {"appId": factory.app_record(team) + in_body})
    assert form.status_code == 400


# Routes that would sign the cookie caller out (they read no body).
SIGN_OUT_PATHS = {"/logout", "/forms/account/signout-all"}


def _json_post_routes(app: Any) -> list[str]:
    """Every route taking a body (POST or DELETE), with its path filled with ids of the right shape."""
    paths = []
    for rule in app.url_map.iter_rules():
        if rule.methods & {"POST", "DELETE"} and rule.endpoint != "static":
            path = rule.rule
            for argument in rule.arguments:
                path = path.replace(f"<{argument}>", "{team}" if argument == "resourceSlug" else "a" * 24)
            paths.append(path)
    return sorted(set(paths))


def test_100000_brackets_are_400_on_every_json_route_including_sign_in(app, admin):
    routes = _json_post_routes(app)
    assert "/forms/account/login" in routes and "/login" in routes and len(routes) > 20
    anonymous = app.test_client()
    for path in routes:
        path = path.format(team=admin.user.team_id)
        for opening in ("[" * 100_000, '{"a":' * 100_000, "[" * 100_000 + "]" * 100_000):
            for method in ("POST", "DELETE"):
                callers = [(anonymous, {})]
                if path not in SIGN_OUT_PATHS:
                    callers.append((admin.client, {"X-CSRFToken": admin.csrf}))
                for client, headers in callers:
                    response = client.open(
                        path,
                        method=method,
                        data=opening,
                        content_type="application/json",
                        headers={"Accept": "application/json", **headers},
                    )
                    assert response.status_code < 500, (method, path, response.status_code)
                    if response.status_code >= 400:
                        assert response.get_json()["code"] == response.status_code, (method, path)
    # Where the body is read, the nesting itself is what is refused.
    for path in ("/forms/account/login", "/login"):
        assert "nested" in _error(anonymous.post(path, data="[" * 100_000, content_type="application/json"))["message"]
    as_admin = admin.client.post(
        f"/{admin.user.team_id}/forms/app/add",
        data="[" * 100_000,
        content_type="application/json",
        headers={"X-CSRFToken": admin.csrf},
    )
    assert "nested" in _error(as_admin)["message"]


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("levels", [40, 101, 500])
def test_runner_options_nested_too_deep_are_400_as_json_and_as_form_text(admin, levels):
    path = f"/{admin.user.team_id}/forms/app/add"
    config = {"callable": "agentcloud_clone.examples:echo", "options": _nested(levels)}
    _error(admin.json("POST", path, {"name": "deep", "runner": "python", "config": config}))
    as_form = admin.form(
        path, {"name": "deep", "runner": "python", "config": json.dumps(config)}, headers={"Accept": "application/json"}
    )
    assert "config" in _error(as_form)["errors"]


def test_config_text_of_100000_brackets_is_400(admin):
    path = f"/{admin.user.team_id}/forms/app/add"
    # (As form fields these are 300 and 650 KB, under the body limit.)
    for text in ("[" * 100_000, '{"a":' * 50_000):
        response = admin.form(path, {"name": "x", "config": text}, headers={"Accept": "application/json"})
        assert "config" in _error(response)["errors"]


def test_text_that_is_not_unicode_is_400_never_a_500(admin, factory, api_key_client):
    team = admin.user.team_id
    user = factory.user("admin", factory.team(), api_key=True)
    call = api_key_client(user)
    lone = ["\ud800", "a\udfffb", "\udc00\ud800"]
    for text in lone:
        for method, path, body in (
            ("POST", f"/{team}/forms/app/add", {"name": text}),
            ("POST", f"/{team}/forms/session/add", {"appId": factory.app_record(team), "message": text}),
            ("POST", f"/{team}/forms/session/add", {"appId": factory.app_record(team), "name": text}),
            ("POST", "/api/managed-agents/cancel", {"sessionId": "a" * 24, "reason": text}),
            ("POST", f"/{team}/forms/team/edit", {"name": text}),
            ("POST", "/forms/account/apikey/add", {"name": text}),
        ):
            _error(admin.json(method, path, body))
        config = {"callable": "agentcloud_clone.examples:echo", "options": {"note": text}}
        _error(call("POST", f"/{user.team_id}/forms/app/add", {"name": "n", "runner": "python", "config": config}))
        # JSON text inside a form field can spell one too.
        as_form = admin.form(
            f"/{team}/forms/app/add",
            {"name": "n", "runner": "python", "config": json.dumps(config)},
            headers={"Accept": "application/json"},
        )
        _error(as_form)
        _error(factory.app.test_client().post("/forms/account/login", json={"email": "a@b.example", "password": text}))


@pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 2**64, 10**300])
def test_settings_numbers_mongodb_cannot_store_are_400(admin, number):
    path = f"/{admin.user.team_id}/forms/app/add"
    for options in ({"n": number}, {"list": [1, number]}, {"deep": {"n": number}}):
        config = {"callable": "agentcloud_clone.examples:echo", "options": options}
        body = _error(admin.json("POST", path, {"name": "n", "runner": "python", "config": config}))
        assert "config" in body["errors"], options
    # The largest that MongoDB stores is fine.
    config = {"callable": "agentcloud_clone.examples:echo", "options": {"n": 2**63 - 1, "m": -(2**63)}}
    assert admin.json("POST", path, {"name": "n", "runner": "python", "config": config}).status_code == 200


def test_numbers_beyond_the_parser_are_400(admin):
    path = f"/{admin.user.team_id}/forms/app/add"
    huge = '{"name": "n", "runner": "scripted", "config": {"steps": ' + "9" * 5000 + "}}"
    response = admin.client.post(path, data=huge, content_type="application/json", headers={"X-CSRFToken": admin.csrf})
    _error(response)


@pytest.mark.parametrize("digits", ["\u0663", "\u0661\u0660", "\u00b2", "\uff15", "\u09e7", "+5", "5 ", "0x10", "1e3"])
def test_query_integers_are_ascii_digits_only(admin, factory, digits):
    team = admin.user.team_id
    sid = factory.session(admin.user, factory.app_record(team), None)["_id"]
    for path in (
        f"/{team}/sessions.json?limit={digits}",
        f"/{team}/session/{sid}/messages.json?after={digits}",
        f"/{team}/session/{sid}/messages.json?limit={digits}",
        f"/api/managed-agents/sessions?limit={digits}",
        f"/api/managed-agents/sessions/{sid}/events?after={digits}",
    ):
        assert _error(admin.client.get(path))["errors"], path


def test_a_stream_cursor_of_any_length_is_400(admin, factory):
    team = admin.user.team_id
    sid = factory.session(admin.user, factory.app_record(team), None)["_id"]
    for path in (f"/{team}/session/{sid}/events", f"/api/managed-agents/sessions/{sid}/stream"):
        for cursor in ("9" * 5000, "9" * 20, str(2**63), "\u0663", "-1"):
            for query, headers in (({"after": cursor}, {}), ({}, {"Last-Event-ID": cursor})):
                if headers and not cursor.isascii():
                    continue  # not a header value
                response = admin.client.get(
                    path, query_string=query, headers={"Accept": "application/json", **headers}, buffered=False
                )
                try:
                    _error(response)
                finally:
                    response.close()


def _route_paths_with_one_empty_id(app: Any, team: str) -> list[tuple[str, str, str]]:
    """(method, path, parameter) for every route and every id in its path, that id left empty, the others set."""
    import re

    from bson import ObjectId

    cases = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        method = sorted(rule.methods - {"HEAD", "OPTIONS"})[0]
        for empty in sorted(rule.arguments):

            def fill(match: re.Match[str], empty: str = empty) -> str:
                name = match.group(1)
                return "" if name == empty else team if name == "resourceSlug" else str(ObjectId())

            cases.append((method, re.sub(r"<(?:\w+:)?(\w+)>", fill, rule.rule), empty))
    return cases


def test_an_empty_id_anywhere_in_a_path_is_400_on_every_route(app, admin):
    # `POST /<team>/forms/session//cancel` was a 405 (and `//sessions.json` a 404) saying nothing of the id.
    cases = _route_paths_with_one_empty_id(app, admin.user.team_id)
    assert len(cases) > 60 and ("POST", f"/{admin.user.team_id}/forms/session//cancel", "sessionId") in cases
    for method, path, empty in cases:
        response = admin.json(method, "/", {}, environ_overrides={"PATH_INFO": path})
        assert response.status_code == 400, (method, path, response.status_code)
        body = _error(response)
        assert empty in body["message"] or "id" in body["message"].lower(), (method, path, body)
    # Signed out, the sign-in check still comes first wherever it does for a malformed id.
    stranger = app.test_client()
    assert stranger.post(f"/{admin.user.team_id}/forms/session//cancel", json={}).status_code == 401
    # `//sessions.json` names no team at all; werkzeug folds leading slashes before routing, so it is told here.
    # (The test client would read `//x` as a host, as a browser does; an HTTP request line keeps it.)
    empty_team = stranger.get("/", environ_overrides={"PATH_INFO": "//sessions.json"})
    assert empty_team.status_code == 400 and "resourceSlug" in empty_team.get_json()["message"]
