"""The shared routes' answers to callers without a usable credential, as `openapi.yaml` documents them. The contract
run leaves schemathesis's ignored_auth check off for these operations (a visitor token is a capability for one
session, so one that fits nothing is a 404, never the 401 that check wants); this is what it checks instead."""

from __future__ import annotations

from typing import Any

import pytest

from .specs import spec_operations

pytestmark = pytest.mark.contract

SHARED_PREFIX = "/s/{resourceSlug}/"


def _shared(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    operations = spec_operations(spec).items()
    return [(method, path, op) for (method, path), op in operations if path.startswith(SHARED_PREFIX)]


def _call(client: Any, method: str, path: str, headers: dict[str, str], body: Any = None) -> Any:
    if method == "POST" and body is None:
        body = {}
    return client.open(path, method=method, json=body, headers={"Accept": "application/json", **headers})


def test_every_shared_route_is_covered(spec):
    assert len(_shared(spec)) == 7
    for _, _, op in _shared(spec):
        schemes = {name for requirement in op["security"] for name in requirement}
        assert "visitorToken" in schemes, op["operationId"]


def test_presenting_nothing_is_a_401_and_an_unknown_visitor_token_a_404(spec, client, factory):
    owner = factory.user("owner")
    app_id = factory.app_record(owner.team_id, sharing={"mode": "public", "whitelist": []})
    sid = str(factory.session(owner, app_id, "hello")["_id"])
    for method, template, op in _shared(spec):
        path = template.format(resourceSlug=owner.team_id, sessionId=sid)
        if op["operationId"] == "addSharedSession":
            # Anyone may call it with a share link; naming the app instead takes an account: a 401 without one.
            for headers in ({}, {"X-Visitor-Token": "sv_" + "x" * 43}):
                response = _call(client, method, path, headers, {"appId": app_id})
                assert response.status_code == 401 and "401" in op["responses"], response.get_json()
            continue
        nothing = _call(client, method, path, {})
        unknown = _call(client, method, path, {"X-Visitor-Token": "sv_" + "x" * 43})
        assert nothing.status_code == 401 and "401" in op["responses"], (method, path, nothing.get_json())
        assert unknown.status_code == 404 and "404" in op["responses"], (method, path, unknown.get_json())
        assert set(unknown.get_json()) == {"message", "code"}
