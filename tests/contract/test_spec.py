"""`openapi.yaml` describes exactly the routes the app serves, is a valid document, and is served with its docs."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from typing import Any

import yaml
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from agentcloud_clone import examples
from agentcloud_clone.services.apps import load_runner_callable
from agentcloud_clone.vocabulary import END_REASONS, OPERATION_STATUSES, STATUSES, WEBHOOK_EVENTS
from agentcloud_clone.web.docs import SPEC_PATH
from devtools import contract

from .specs import spec_operations

OBJECT_ID_PATTERN = "^[a-f0-9]{24}$"
# Pages for people, not the API: server-rendered HTML, static files, the sign-in form and these docs.
HTML_ONLY_ENDPOINTS = frozenset({"static", "account.login", "account.logout", "docs.docs_page"})


def is_html_only(endpoint: str) -> bool:
    return endpoint.startswith("pages.") or endpoint in HTML_ONLY_ENDPOINTS


def served_operations(app: Flask) -> dict[tuple[str, str], str]:
    """Every (METHOD, OpenAPI path) the app routes, except HTML-only pages, with its endpoint name."""
    served = {}
    for rule in app.url_map.iter_rules():
        if is_html_only(rule.endpoint):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served[(method, path)] = rule.endpoint
    return served


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_every_served_route_is_in_the_spec(app: Flask, spec: dict[str, Any]) -> None:
    missing = sorted(set(served_operations(app)) - set(spec_operations(spec)))
    assert not missing, f"routes the app serves but openapi.yaml does not describe: {missing}"


def test_every_spec_operation_is_served(app: Flask, spec: dict[str, Any]) -> None:
    unserved = sorted(set(spec_operations(spec)) - set(served_operations(app)))
    assert not unserved, f"operations in openapi.yaml that the app does not serve: {unserved}"


def test_the_spec_is_a_valid_openapi_document(spec: dict[str, Any]) -> None:
    validate(spec)


def test_operation_ids_are_unique_and_every_operation_is_tagged(spec: dict[str, Any]) -> None:
    operations = spec_operations(spec).values()
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    declared_tags = {tag["name"] for tag in spec["tags"]}
    assert all(op.get("tags") and set(op["tags"]) <= declared_tags for op in operations)


def test_aliases_are_earlier_ids_that_name_no_other_operation(spec: dict[str, Any]) -> None:
    operations = spec_operations(spec).values()
    names = [op["operationId"] for op in operations] + [alias for op in operations for alias in op.get("x-aliases", [])]
    assert len(names) == len(set(names))
    links = [
        link["operationId"]
        for op in operations
        for response in op["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert set(links) <= {op["operationId"] for op in operations}, "a link names an alias or a missing operation"


def test_the_contract_run_pins_operations_the_spec_has(spec: dict[str, Any]) -> None:
    """devtools.contract configures schemathesis by operationId: a renamed operation must not drop out silently."""
    targets = contract.Targets("http://127.0.0.1:1", "ak_x", "a" * 24, "b" * 24, "c" * 24, "d" * 24)
    config = tomllib.loads(contract.schemathesis_config(targets))
    named = {operation_id for entry in config["operations"] for operation_id in entry["include-operation-id"]}
    assert named <= {op["operationId"] for op in spec_operations(spec).values()}


def test_path_parameters_are_object_ids(spec: dict[str, Any]) -> None:
    for (method, path), op in spec_operations(spec).items():
        for parameter in (_resolve(spec, p) for p in op.get("parameters", [])):
            if parameter["in"] == "path":
                schema = _resolve(spec, parameter["schema"])
                assert schema.get("pattern") == OBJECT_ID_PATTERN, (method, path, parameter["name"])


def test_every_operation_documents_its_failure_codes(spec: dict[str, Any]) -> None:
    for (method, path), op in spec_operations(spec).items():
        codes = set(op["responses"])
        assert {"429", "500"} <= codes, (method, path)
        if op.get("security", spec["security"]):
            assert "401" in codes, (method, path)
        if "requestBody" in op or method == "DELETE":
            assert {"413"} <= codes, (method, path)
        if any(_resolve(spec, p)["in"] in ("path", "query") for p in op.get("parameters", [])):
            assert "400" in codes, (method, path)
        if any(_resolve(spec, p)["in"] == "query" for p in op.get("parameters", [])):
            assert "414" in codes, (method, path)  # gunicorn's answer to a request line over its limit


def test_form_routes_document_the_browser_redirect(app: Flask, spec: dict[str, Any]) -> None:
    operations = spec_operations(spec)
    for (method, path), endpoint in served_operations(app).items():
        body = _resolve(spec, operations[(method, path)].get("requestBody", {"content": {}}))
        if "application/x-www-form-urlencoded" in body["content"]:
            assert "302" in operations[(method, path)]["responses"], (method, path, endpoint)


def test_cancel_documents_the_rate_limit_and_the_idempotent_repeat(spec: dict[str, Any]) -> None:
    cancel = spec["paths"]["/{resourceSlug}/forms/session/{sessionId}/cancel"]["post"]
    too_many = _resolve(spec, cancel["responses"]["429"])
    assert "Retry-After" in too_many["headers"]
    repeat = cancel["responses"]["200"]["content"]["application/json"]["examples"]["repeat"]["value"]
    assert repeat["ok"] is True and repeat["alreadyCancelled"] is True
    managed = spec["paths"]["/api/managed-agents/cancel"]["post"]["responses"]["200"]
    assert managed["content"]["application/json"]["examples"]["repeat"]["value"] == {
        "ok": True,
        "alreadyCancelled": True,
    }


def test_the_spec_is_served_as_yaml(client: FlaskClient) -> None:
    response = client.get("/openapi.yaml")
    assert response.status_code == 200
    assert response.mimetype == "application/yaml"
    assert response.data == SPEC_PATH.read_bytes()
    assert yaml.safe_load(response.data)["openapi"].startswith("3.")


def test_the_docs_page_lists_every_operation(client: FlaskClient, spec: dict[str, Any]) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    for (method, path), op in spec_operations(spec).items():
        assert f'id="op-{op["operationId"]}"' in html, (method, path)
        assert f'<code class="docs-path">{path}</code>' in html, (method, path)
        for alias in op.get("x-aliases", []):  # old links to an operation still land on it
            assert f'id="op-{alias}"' in html and f"<code>{alias}</code>" in html, (method, path, alias)
    for name in spec["components"]["schemas"]:
        assert f'id="schema-{name}"' in html


def test_the_docs_page_needs_nothing_but_the_app(client: FlaskClient) -> None:
    """No CDN and nothing inline, so it renders offline under the app's content security policy."""
    response = client.get("/docs")
    html = response.get_data(as_text=True)
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "<style" not in html and " style=" not in html
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html)
    stylesheet = re.search(r'href="(/static/docs/[^"]+\.css)"', html)
    assert stylesheet and client.get(stylesheet.group(1)).status_code == 200


def test_the_docs_page_lists_every_webhook(client: FlaskClient, spec: dict[str, Any]) -> None:
    html = client.get("/docs").get_data(as_text=True)
    assert 'id="webhooks"' in html
    for name, item in spec["webhooks"].items():
        assert f'id="op-{item["post"]["operationId"]}"' in html, name
        assert f'<code class="docs-path">{name}</code>' in html, name


def test_the_spec_s_webhooks_are_the_events_the_service_sends(spec: dict[str, Any]) -> None:
    assert set(spec["webhooks"]) == set(WEBHOOK_EVENTS)
    assert set(_resolve(spec, {"$ref": "#/components/schemas/WebhookEventType"})["enum"]) == set(WEBHOOK_EVENTS)
    headers = {"webhook-id", "webhook-timestamp", "webhook-signature"}
    for item in spec["webhooks"].values():
        assert {_resolve(spec, p)["name"] for p in item["post"]["parameters"]} == headers


def test_the_spec_s_vocabularies_are_the_service_s(spec: dict[str, Any]) -> None:
    def enum(name: str) -> set[str]:
        return set(_resolve(spec, {"$ref": f"#/components/schemas/{name}"})["enum"])

    assert enum("SessionStatus") == set(STATUSES)
    assert enum("EndReason") == set(END_REASONS)
    operation = _resolve(spec, {"$ref": "#/components/schemas/Operation"})
    assert set(operation["properties"]["status"]["enum"]) == set(OPERATION_STATUSES)


def test_the_python_runner_callables_listed_are_those_the_default_installation_accepts(spec: dict[str, Any]) -> None:
    listed = _resolve(spec, {"$ref": "#/components/schemas/PythonRunnerConfig"})["properties"]["callable"]["enum"]
    public = [
        f"{examples.__name__}:{name}"
        for name, value in vars(examples).items()
        if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == examples.__name__
    ]
    assert sorted(listed) == sorted(public)
    for target in listed:
        assert callable(load_runner_callable(target, [examples.__name__]))


def test_the_contract_run_knows_every_browser_only_operation(spec: dict[str, Any]) -> None:
    browser_only = {
        operation["operationId"]
        for operation in spec_operations(spec).values()
        if "Needs a browser session" in " ".join((operation.get("description") or "").split())
    }
    assert browser_only == set(contract.BROWSER_ONLY)


def test_the_contract_run_reads_every_live_stream_on_an_ended_session(spec: dict[str, Any]) -> None:
    """An operation answering `text/event-stream` must be pinned to the ended session and kept out of the stateful
    phase, or a generated request waits on a live session until it times out."""
    streams = {
        op["operationId"]
        for op in spec_operations(spec).values()
        if any("text/event-stream" in _resolve(spec, r).get("content", {}) for r in op["responses"].values())
    }
    assert streams == set(contract.STREAMS)
    targets = contract.Targets("http://127.0.0.1:1", "ak_x", "a" * 24, "b" * 24, "c" * 24, "d" * 24, "e" * 24)
    config = tomllib.loads(contract.schemathesis_config(targets))
    entry = next(e for e in config["operations"] if set(e["include-operation-id"]) == streams)
    assert entry["parameters"] == {"path.sessionId": "e" * 24}
    assert entry["phases"]["stateful"]["enabled"] is False


def test_the_contract_run_registers_webhooks_only_at_its_receiver() -> None:
    targets = contract.Targets("http://127.0.0.1:1", "ak_x", "a" * 24, "b" * 24, "c" * 24, "d" * 24)
    skipped = tomllib.loads(contract.schemathesis_config(targets))["operations"]
    assert any(e["include-operation-id"] == contract.WEBHOOK_REGISTRATION and e["enabled"] is False for e in skipped)
    pinned = tomllib.loads(
        contract.schemathesis_config(dataclasses.replace(targets, webhook_url="http://127.0.0.1:9/hooks"))
    )["operations"]
    entry = next(e for e in pinned if e["include-operation-id"] == contract.WEBHOOK_REGISTRATION)
    assert entry["parameters"] == {"body.url": "http://127.0.0.1:9/hooks"}
