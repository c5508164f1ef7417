"""Every route × every kind of caller × every kind of id, generated from the app's route table.

A new route is covered without editing this file: its path parameters decide which ids are tried, and
the permission its view declares (`required_permission`) decides who may use it. Only a route that needs
a request body to reach its logic needs an entry in BODIES.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from bson import ObjectId

from agentcloud_clone.permissions import Permission, permissions_for

ACTORS = ["anonymous", "outsider", "viewer", "member", "admin"]
CASES = ["own", "other-team", "nonexistent", "malformed"]
# Routes served without signing in, and routes outside the team rules (asset and sign-in plumbing).
PUBLIC = {
    "static",
    "auth.login",
    "auth.logout",
    "web.index",
    "docs.openapi_yaml",
    "docs.docs_page",
    "ops.healthz",
    "ops.readyz",
    "ops.metrics_view",
}
ID_PARAMS = {"sessionId": "session", "appId": "app", "keyId": "key"}
# Bodies that reach each route's logic; `{x}` is replaced by the id under test (for ids carried in bodies).
BODIES: dict[str, Any] = {
    "sessions.add_session": {"appId": "{app}", "message": "hi"},
    "sessions.send_message": {"message": "next"},
    "apps.add_app": {"name": "matrix app"},
    "apps.edit_app": {"name": "renamed"},
    "auth.add_api_key": {"name": "matrix"},
    "auth.login_json": None,
    "managed_agents.cancel": {"sessionId": "{session}"},
    "managed_agents.create_session": {"appId": "{app}"},
}
BODY_IDS = {"managed_agents.cancel": "session", "managed_agents.create_session": "app", "sessions.add_session": "app"}


@pytest.fixture
def world(factory, app) -> dict[str, Any]:
    """Our team (viewer, member, admin), another team whose things carry a secret marker, and an outsider
    who owns a third team."""
    from agentcloud_clone.services import sessions as sessions_service

    secret = f"SECRET-{uuid.uuid4().hex}"
    own_team, other_team = factory.team(), factory.team()
    users = {role: factory.user(role, own_team, api_key=True) for role in ("viewer", "member", "admin")}
    users["outsider"] = factory.user("owner", api_key=True)
    stranger = factory.user("owner", other_team)
    own_app = factory.app_record(str(own_team["_id"]))
    other_app = factory.app_record(str(other_team["_id"]), reply=secret)
    with app.app_context():
        own_session = sessions_service.create_session(own_team, None, ObjectId(own_app), "mine", None)
        other_session = sessions_service.create_session(other_team, None, ObjectId(other_app), secret, secret)
        from agentcloud_clone.services.accounts import create_api_key

        other_key = create_api_key(ObjectId(stranger.account_id), secret)[0]
    return {
        "secret": secret,
        "team": str(own_team["_id"]),
        "users": users,
        "ids": {
            "own": {"session": str(own_session["_id"]), "app": own_app, "key": None},
            "other-team": {"session": str(other_session["_id"]), "app": other_app, "key": str(other_key["_id"])},
            "nonexistent": {"session": "0" * 24, "app": "1" * 24, "key": "2" * 24},
            "malformed": {"session": "not-an-id", "app": "ZZZ", "key": "12"},
        },
    }


def _routes(app) -> list[tuple[str, str, str]]:
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            routes.append((rule.endpoint, method, rule.rule))
    return routes


def _expected(app, endpoint: str, actor: str, case: str, has_id: bool, team_route: bool) -> set[int]:
    """Sign-in first; on team routes then membership and role; then the id: malformed 400, not yours 404."""
    if actor == "anonymous":
        return {401}
    permission = getattr(app.view_functions[endpoint], "required_permission", None)
    role_allows = permission is None or bool(permissions_for("owner" if actor == "outsider" else actor) & permission)
    if team_route:
        if actor == "outsider":
            return {403}
        if not role_allows:
            return {403}
    if has_id and case == "malformed":
        return {400}
    if has_id and (case in ("other-team", "nonexistent") or actor == "outsider"):
        return {404}
    if not role_allows:
        return {403}
    return {200, 201, 302, 409}


def test_security_matrix(app, world):
    routes = _routes(app)
    assert len(routes) > 20
    failures = []
    for endpoint, method, rule in routes:
        id_kind = next((ID_PARAMS[p] for p in ID_PARAMS if f"<{p}>" in rule), None) or BODY_IDS.get(endpoint)
        if endpoint == "sessions.add_session":
            id_kind = "app"
        team_route = "<resourceSlug>" in rule
        for actor in ACTORS:
            for case in CASES if id_kind else ["own"]:
                ids = world["ids"][case]
                if id_kind == "key" and case == "own":
                    continue  # own keys are exercised in test_auth
                path = rule.replace("<resourceSlug>", world["team"])
                for param, kind in ID_PARAMS.items():
                    path = path.replace(f"<{param}>", str(ids[kind]))
                body = BODIES.get(endpoint, {})
                if body is None:
                    continue
                if isinstance(body, dict):
                    body = {
                        k: (
                            v.format(**{kind: ids[kind] or "" for kind in ("session", "app", "key")})
                            if isinstance(v, str)
                            else v
                        )
                        for k, v in body.items()
                    }
                    if endpoint == "sessions.add_session" and case != "own":
                        body["appId"] = ids["app"]
                headers = {"Accept": "application/json"}
                if actor != "anonymous":
                    headers["Authorization"] = f"Bearer {world['users'][actor].api_key}"
                client = app.test_client()
                response = client.open(path, method=method, json=body if method != "GET" else None, headers=headers)
                expected = _expected(app, endpoint, actor, case, id_kind is not None, team_route)
                text = response.get_data(as_text=True)
                if response.status_code not in expected:
                    failures.append(
                        f"{method} {rule} as {actor} on {case}: {response.status_code} not in "
                        f"{sorted(expected)}: {text[:120]}"
                    )
                if world["secret"] in text:
                    failures.append(f"{method} {rule} as {actor} on {case} leaked another team's data")
                if response.status_code >= 400 and response.is_json:
                    assert set(response.get_json()) <= {"message", "code", "errors"}
    assert not failures, "\n".join(failures)


def test_every_team_route_declares_a_permission(app):
    for endpoint, _method, rule in _routes(app):
        view = app.view_functions[endpoint]
        if "<resourceSlug>" in rule or endpoint.startswith("managed_agents."):
            assert isinstance(getattr(view, "required_permission", None), Permission), endpoint
