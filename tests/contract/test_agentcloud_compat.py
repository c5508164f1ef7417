"""Compatibility with Agentcloud's published spec: each operation it defines (tests/contract/agentcloud/) is ours under
the same operationId; our spec accepts every request it describes and documents every status it lists; and the
server answers those requests with those statuses and bodies of the schemas it names."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from bson import ObjectId
from openapi_schema_validator import OAS31Validator

from .specs import HTTP_METHODS, spec_operations

AGENTCLOUD = Path(__file__).parent / "agentcloud"
# Agentcloud describes its ids in words: "length of 24 characters fitting the following regex; [a-f0-9]{24}".
ID_REGEX_IN_WORDS = re.compile(r"\[a-f0-9\]\{24\}")


def _agentcloud_operations() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(METHOD, path, operation, whole document) for every operation in Agentcloud's published definitions."""
    found = []
    for definition in sorted(AGENTCLOUD.glob("*.yaml")):
        document = yaml.safe_load(definition.read_text(encoding="utf-8"))
        for path, item in document["paths"].items():
            found.extend((method.upper(), path, item[method], document) for method in HTTP_METHODS if method in item)
    return found


OPERATIONS = _agentcloud_operations()
IDS = [op["operationId"] for _, _, op, _ in OPERATIONS]


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _component_names(document: dict[str, Any], node: Any) -> set[str]:
    """The component schemas `node` names, directly or through allOf/anyOf/oneOf and other references."""
    names: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "$ref" in item and item["$ref"].startswith("#/components/schemas/"):
                name = item["$ref"].rsplit("/", 1)[-1]
                if name not in names:
                    names.add(name)
                    stack.append(document["components"]["schemas"][name])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return names


def _samples(document: dict[str, Any], schema: dict[str, Any]) -> list[Any]:
    """Values Agentcloud's schema describes: for its ObjectId, ids fitting the regex its description states."""
    resolved = _resolve(document, schema)
    if resolved.get("type") == "string" and ID_REGEX_IN_WORDS.search(resolved.get("description", "")):
        return [str(ObjectId()), "0" * 24, "f" * 24, "0123456789abcdef01234567"]
    raise AssertionError(f"no samples for Agentcloud schema {schema}; teach the test how to draw them")


def _ours(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    operations = spec_operations(spec)
    assert (method, path) in operations, f"Agentcloud's {method} {path} is not in openapi.yaml"
    return operations[(method, path)]


@pytest.mark.parametrize(("method", "path", "theirs", "document"), OPERATIONS, ids=IDS)
def test_the_operation_keeps_agentcloud_s_operation_id(
    spec: dict[str, Any], method: str, path: str, theirs: dict[str, Any], document: dict[str, Any]
) -> None:
    ours = _ours(spec, method, path)
    assert ours["operationId"] == theirs["operationId"]
    assert document["info"]["title"] == "Agentcloud Webapp API Docs"


@pytest.mark.parametrize(("method", "path", "theirs", "document"), OPERATIONS, ids=IDS)
def test_our_spec_accepts_every_request_agentcloud_describes(
    spec: dict[str, Any], method: str, path: str, theirs: dict[str, Any], document: dict[str, Any]
) -> None:
    ours = _ours(spec, method, path)
    our_parameters = {(p["in"], p["name"]): p for p in (_resolve(spec, p) for p in ours.get("parameters", []))}
    their_parameters = {(p["in"], p["name"]): p for p in (_resolve(document, p) for p in theirs.get("parameters", []))}
    for key, parameter in our_parameters.items():
        if parameter.get("required"):
            assert key in their_parameters, f"ours requires {key}, which Agentcloud's requests do not carry"
    for key, parameter in their_parameters.items():
        assert key in our_parameters, f"Agentcloud's parameter {key} is not in our operation"
        validator = OAS31Validator(_resolve(spec, our_parameters[key]["schema"]))
        for value in _samples(document, parameter["schema"]):
            assert validator.is_valid(value), f"our {key} refuses {value!r}, which Agentcloud's spec allows"
    if "requestBody" not in theirs or not _resolve(document, theirs["requestBody"]).get("required"):
        body = _resolve(spec, ours.get("requestBody", {}))
        assert not body.get("required"), "ours requires a body; Agentcloud's requests may carry none"


@pytest.mark.parametrize(("method", "path", "theirs", "document"), OPERATIONS, ids=IDS)
def test_our_spec_documents_every_status_agentcloud_lists(
    spec: dict[str, Any], method: str, path: str, theirs: dict[str, Any], document: dict[str, Any]
) -> None:
    ours = _ours(spec, method, path)
    for status, response in theirs["responses"].items():
        assert status in ours["responses"], f"Agentcloud lists {status}; openapi.yaml does not"
        named = _component_names(document, response)
        # Where Agentcloud redirects, a program gets the JSON a browser would be redirected with (our 200).
        answer = ours["responses"]["200"] if status.startswith("3") else ours["responses"][status]
        assert named <= _component_names(spec, _resolve(spec, answer)), (status, named)


def test_agentcloud_s_response_schemas_are_ours_under_the_same_names(spec: dict[str, Any]) -> None:
    """`tempRedirectResponse` and `dynamicResponse` carry at least Agentcloud's fields, with the same types."""
    for _, _, _, document in OPERATIONS:
        for name in _component_names(document, document["paths"]):
            theirs, ours = document["components"]["schemas"][name], spec["components"]["schemas"][name]
            for field, prop in theirs.get("properties", {}).items():
                assert field in ours["properties"], (name, field)
                our_type = _resolve(spec, ours["properties"][field]).get("type")
                assert prop["type"] == our_type, (name, field, our_type)


# --- and the server answers those requests as both specs say ------------------------------------------------


def _documented(spec: dict[str, Any], operation_id: str, status: int) -> bool:
    op = next(op for op in spec_operations(spec).values() if op["operationId"] == operation_id)
    return str(status) in op["responses"]


def test_the_cancel_agentcloud_describes_is_answered_with_the_statuses_it_lists(spec, factory, login, api_key_client):
    owner = factory.user("owner", api_key=True)
    app_id = factory.app_record(owner.team_id)
    browser = login(owner)
    path = f"/{owner.team_id}/forms/session/{{}}/cancel"

    # 302: a browser's form post (Agentcloud's UI sends its ids and `_csrf` in the body too).
    sid = str(factory.session(owner, app_id)["_id"])
    body = {"sessionId": sid, "resourceSlug": owner.team_id, "_csrf": uuid.uuid4().hex}
    redirected = browser.form(path.format(sid), body)
    assert redirected.status_code == 302 and redirected.headers["Location"] == f"/{owner.team_id}/sessions"
    # The same for a program: what the browser is redirected with, as JSON (Agentcloud's tempRedirectResponse).
    sid = str(factory.session(owner, app_id)["_id"])
    answer = api_key_client(owner)("POST", path.format(sid))
    assert answer.status_code == 200
    assert answer.get_json()["_id"] == sid and answer.get_json()["redirect"] == f"/{owner.team_id}/sessions"
    # 400: a malformed id; 403: a team outside the caller's; both with Agentcloud's dynamicResponse body.
    malformed = api_key_client(owner)("POST", path.format("not-an-id"))
    stranger = factory.user("owner", api_key=True)
    forbidden = api_key_client(stranger)("POST", path.format(sid))
    for response, status in ((malformed, 400), (forbidden, 403)):
        assert response.status_code == status
        assert set(response.get_json()) == {"message", "code"} and response.get_json()["code"] == status
    for status in (302, 200, 400, 403):
        assert _documented(spec, "cancelSessionApi", status)


# What Agentcloud's own client sends beside our spelling (README, "Coming from Agentcloud"), by operation.
AGENTCLOUD_BODY_FIELDS = {
    ("POST", "/{resourceSlug}/forms/session/add"): ["id", "skipRun", "resourceSlug", "_csrf"],
    ("POST", "/{resourceSlug}/session/{sessionId}/send-message"): ["messageText", "_csrf"],
    ("POST", "/{resourceSlug}/forms/session/{sessionId}/cancel"): ["sessionId", "resourceSlug", "_csrf"],
    ("POST", "/{resourceSlug}/forms/session/{sessionId}/edit"): ["_csrf"],
}
AGENTCLOUD_QUERY_PARAMETERS = {
    ("GET", "/{resourceSlug}/session/{sessionId}/messages.json"): "messageId",
    ("GET", "/{resourceSlug}/sessions.json"): "before",
}


def _resolved(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_every_alias_agentcloud_s_client_sends_is_in_the_spec_and_says_so(spec: dict[str, Any]) -> None:
    operations = spec_operations(spec)
    for key, fields in AGENTCLOUD_BODY_FIELDS.items():
        body = operations[key]["requestBody"]["content"]["application/json"]["schema"]
        properties = _resolved(spec, body)["properties"]
        for name in fields:
            assert name in properties, (key, name)
            described = properties[name].get("description") or _resolved(spec, properties[name]).get("description")
            assert "Agentcloud" in (described or ""), (key, name, described)
    for key, name in AGENTCLOUD_QUERY_PARAMETERS.items():
        parameters = [_resolved(spec, p) for p in operations[key]["parameters"]]
        (parameter,) = [p for p in parameters if p["name"] == name and p["in"] == "query"]
        assert "Agentcloud" in parameter["description"] and "compatibility" in parameter["description"], key
        if name == "before":  # Agentcloud's first page asks for `before=null`
            assert re.fullmatch(parameter["schema"]["pattern"], "null"), parameter
