"""Every route in the route table, fuzzed with hostile path segments, query values, headers and bodies (JSON, form
and raw), as an API-key caller, a cookie caller and anonymously: never a 500, and every error is `{message, code}`
(plus `errors` for field messages) with `code` equal to the status.

Generated from `app.url_map`, with field names from every marshmallow schema the product defines, so a new route
or field is fuzzed without being listed here. Each route's cases come from a generator seeded with the route, so a
run is repeatable and one route's cases do not shift when another is added. Runs on mongomock only (fast tier).
"""

from __future__ import annotations

import json
import random
import re
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import marshmallow
import pytest

from agentcloud_clone.services import accounts as accounts_service
from agentcloud_clone.services import bulk, webhooks
from tests.api.test_security_matrix import ROUTES

SEED = 20261201
CALLERS = ("api-key", "cookie", "anonymous")
# Requests without a body to speak of: what a hostile body can reach is fuzzed on the others.
BODYLESS = {"GET", "HEAD", "OPTIONS"}
# Routes that end the cookie caller's sign-in; it signs in again after each.
SIGN_OUT = {"account.logout", "account.sign_out_everywhere"}


def _nested_list(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _nested_dict(levels: int) -> Any:
    value: Any = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


HOSTILE_STRINGS = [
    "a" * 24 + "\n",
    "a" * 24 + "\r\n",
    "a" * 24 + "\x00",
    "A" * 24,
    "a" * 23,
    "a" * 25,
    "0" * 24,
    "g" * 24,
    "%0a",
    "\u0663",
    "\u0663" * 24,
    "\u00b2",
    "\uff11\uff10",
    "\u202e" + "a" * 23,
    "",
    " ",
    "-1",
    "0",
    str(2**64),
    str(-(2**63) - 1),
    "9" * 5000,
    "1e309",
    "NaN",
    "Infinity",
    "null",
    "true",
    "[]",
    "{}",
    '{"$ne": null}',
    "$ne",
    "a.b",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "' OR '1'='1",
    "x" * 100_001,
    "é" * 300,
    "\ud800",
    "a\udfffb",
    "https://evil.example/",
    "//evil.example",
    "ak_" + "0" * 12 + "_x",
]
HOSTILE_VALUES: list[Any] = [
    *HOSTILE_STRINGS,
    2**64,
    2**63,
    -(2**63) - 1,
    -1,
    0,
    10**300,
    1e309,
    -1e309,
    1.5,
    True,
    False,
    None,
    {"$ne": None},
    {"$gt": ""},
    {"$where": "sleep(1000)"},
    [],
    [None],
    ["a" * 24, {"$ne": None}],
    {},
    {"": 1},
    {"a.b": 1},
    {"\x00": 1},
    _nested_list(50),
    _nested_dict(50),
    [_nested_dict(20)],
    {"callable": "os:getenv", "options": _nested_dict(40)},
]
# Tried on every field of a route's own body, and on every leaf of its nested settings.
SHARP_VALUES: list[Any] = [
    "\ud800",
    "a" * 24 + "\n",
    2**64,
    -(2**63) - 1,
    {"$ne": None},
    _nested_dict(50),
    1e309,
    "x" * 100_001,
]
# Bodies with nested settings, so hostile leaves reach deep into what is stored (the security matrix's bodies are
# the flat minimum that reaches each route).
DEEP_BODIES: dict[str, list[dict[str, Any]]] = {
    "apps.add_app": [
        {
            "name": "n",
            "runner": "python",
            "config": {"callable": "agentcloud_clone.examples:echo", "options": {"times": 1, "tags": ["a"]}},
            "limits": {"queueTtl": 60},
        },
        {"name": "n", "runner": "openai", "config": {"model": "m", "baseUrl": "http://127.0.0.1:9/v1", "apiKey": "k"}},
    ],
    "teams.edit_team": [{"name": "t", "limits": {"queueTtl": 60, "tokenBudget": 5}}],
}
DEEP_BODIES["apps.edit_app"] = DEEP_BODIES["apps.add_app"]
# Whole bodies as bytes: broken, deep, huge or not text.
RAW_BODIES = [
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"appId": "' + b"a" * 24 + b'"',
    b"\xff\xfe\x00{",
    b'{"appId": "\xed\xa0\x80"}',
    b'{"n": ' + b"9" * 5000 + b"}",
    b'{"n": 1e999999}',
    b'{"a": 1, "a": {"$ne": null}}',
    b"null",
    b'"just a string"',
    b"",
]
PATH_SEGMENTS = [quote(value, safe="") for value in HOSTILE_STRINGS if "\ud800" not in value and "\udfff" not in value]
PATH_SEGMENTS += ["%ff", "%c0%af", "%2e%2e", "%2f", "%25", "%0a", "%00"]
HOSTILE_HEADERS = [
    {"Idempotency-Key": ""},
    {"Idempotency-Key": " "},
    {"Idempotency-Key": "k" * 300},
    {"Idempotency-Key": "caf\u00e9"},
    {"Idempotency-Key": "a\x7fb"},
    {"X-Request-ID": "r" * 500},
    {"X-CSRFToken": "forged"},
    {"Origin": "https://evil.example"},
    {"Content-Type": "application/json; charset=utf-16"},
    {"Accept": "*/*"},
]
BAD_AUTHORIZATIONS = ["Bearer ", "Bearer ak_", "Bearer ak_zz_zz", "Basic dXNlcjpwdw==", "Bearer " + "a" * 5000, "x"]


def _schema_fields() -> list[str]:
    """Every field name of every marshmallow schema the product defines (requests, queries, settings)."""
    names: set[str] = set()
    stack = list(marshmallow.Schema.__subclasses__())
    while stack:
        schema = stack.pop()
        stack.extend(schema.__subclasses__())
        if schema.__module__.startswith("agentcloud_clone"):
            names.update(schema._declared_fields)
    return sorted(names)


@pytest.fixture
def mongo_uri_template() -> str:
    return "mongomock://localhost/{db}"


@pytest.fixture
def app_settings() -> dict[str, Any]:
    # The limits stay on; a fuzzer is just a very busy user.
    roomy = "1000000 per minute"
    return {
        "DEFAULT_RATE_LIMIT": roomy,
        "CANCEL_RATE_LIMIT": roomy,
        "BULK_CANCEL_RATE_LIMIT": roomy,
        "LOGIN_RATE_LIMIT": roomy,
        "LOGIN_ADDRESS_RATE_LIMIT": roomy,
        # Webhook endpoints and upstreams on loopback, as the security matrix has them; live streams answer quickly.
        "WEBHOOK_ALLOW_PRIVATE": True,
        "UPSTREAM_ALLOW_PRIVATE": True,
        "SSE_HEARTBEAT": 0.2,
    }


class Fuzz:
    """The callers and their team's objects, and the checks every response must pass."""

    def __init__(self, app: Any, factory: Any) -> None:
        self.app, self.factory = app, factory
        self.team_doc = factory.team()
        self.team = str(self.team_doc["_id"])
        self.key_user = factory.user("admin", self.team_doc, api_key=True)
        self.cookie_user = factory.user("admin", self.team_doc)
        self.owner = factory.user("owner", self.team_doc)
        self.app_id = factory.app_record(self.team)
        self.csrf = ""
        self.shared: dict[str, str] | None = None
        self.sign_in()
        self.failures: list[str] = []
        self.requests = 0

    def sign_in(self) -> None:
        """A fresh browser signs in (after a sign-out, or a 401 that may have been one)."""
        self.cookie = self.app.test_client()
        body = {"email": self.cookie_user.email, "password": self.cookie_user.password}
        response = self.cookie.post("/forms/account/login", json=body)
        assert response.status_code == 200, response.get_json()
        self.csrf = response.get_json()["csrf"]

    def ids(self, rule: Any) -> dict[str, str]:
        """Valid ids for the rule's path: fresh objects where a request may change or remove them, shared ones for
        reads (mongomock scans every document per query, so the fewer the faster)."""
        changes = bool(rule.methods - {"GET", "HEAD", "OPTIONS"})
        with self.app.app_context():
            if self.shared is None:
                operation = bulk.start_bulk_cancel(
                    self.team_doc["_id"], self.factory.actor(self.owner), {"ids": []}, None
                )
                self.shared = {
                    "sessionId": str(self.factory.session(self.owner, self.app_id)["_id"]),
                    "appId": self.app_id,
                    "operationId": str(operation["_id"]),
                    "keyId": str(accounts_service.create_api_key(self.cookie_user.oid, "fuzz")[0]["_id"]),
                    "accountId": self.owner.account_id,
                    "filename": "app.css",
                }
            ids = {"resourceSlug": self.team, **self.shared}
            if changes and "<sessionId>" in rule.rule:
                ids["sessionId"] = str(self.factory.session(self.owner, self.app_id)["_id"])
            if changes and "<appId>" in rule.rule:
                ids["appId"] = self.factory.app_record(self.team)
            if changes and "<keyId>" in rule.rule:
                ids["keyId"] = str(accounts_service.create_api_key(self.cookie_user.oid, "fuzz")[0]["_id"])
            if changes and "<accountId>" in rule.rule:
                ids["accountId"] = self.factory.user("member", self.team_doc).account_id
            if "webhookId>" in rule.rule:
                ids.update(self.webhook())
        return ids

    def webhook(self) -> dict[str, str]:
        """A webhook endpoint of the team with one delivery recorded (call within an app context)."""
        team_id = self.team_doc["_id"]
        for old in webhooks.repo.list_endpoints(team_id):  # a team holds at most MAX_ENDPOINTS of them
            webhooks.repo.delete_endpoint(team_id, old["_id"])
        endpoint, _ = webhooks.create_endpoint(team_id, "http://127.0.0.1:9/hook", [], self.factory.actor(self.owner))
        webhooks.record_deliveries(team_id, [(f"fuzz:{uuid.uuid4().hex}", {"type": "session.started", "data": {}})])
        delivery = webhooks.repo.list_deliveries(team_id, endpoint["_id"])[0]
        return {"webhookId": str(endpoint["_id"]), "deliveryId": str(delivery["_id"])}

    def send(self, caller: str, method: str, path: str, endpoint: str, **kwargs: Any) -> None:
        headers = {"Accept": "application/json", **kwargs.pop("headers", {})}
        client = self.cookie if caller == "cookie" else self.app.test_client()
        if caller == "api-key":
            headers.setdefault("Authorization", f"Bearer {self.key_user.api_key}")
        elif caller == "cookie" and method not in BODYLESS:
            headers.setdefault("X-CSRFToken", self.csrf)
        # Unbuffered, so a live stream (SSE) that opened is checked by its headers and closed, not read forever.
        response = client.open(path, method=method, headers=headers, buffered=False, **kwargs)
        self.requests += 1
        try:
            self.check(caller, method, path, kwargs, response)
        finally:
            response.close()
        if caller == "cookie" and (endpoint in SIGN_OUT or response.status_code == 401):
            self.sign_in()

    def check(self, caller: str, method: str, path: str, sent: dict[str, Any], response: Any) -> None:
        what = f"{caller} {method} {path[:120]} {str(sent)[:160]}"
        if response.status_code == 200 and response.mimetype == "text/event-stream":
            return
        text = response.get_data(as_text=True)
        if response.status_code >= 500:
            self.failures.append(f"{response.status_code} for {what}: {text[:200]}")
            return
        if "Traceback" in text:
            self.failures.append(f"a traceback in the answer to {what}")
        if response.status_code < 400:
            return
        body = response.get_json(silent=True)
        if (
            not isinstance(body, dict)
            or set(body) - {"message", "code", "errors"}
            or body.get("code") != response.status_code
            or not isinstance(body.get("message"), str)
            or not body["message"]
        ):
            self.failures.append(f"{response.status_code} for {what} is not {{message, code}}: {text[:200]}")


def _routes(app: Any) -> Iterator[tuple[Any, str]]:
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule, method


def _path(rule: Any, ids: dict[str, str], hostile: dict[str, str] | None = None) -> str:
    path = rule.rule
    for argument in rule.arguments:
        # A new route's unknown id is still an id of the right shape (one that exists nowhere).
        value = (hostile or {}).get(argument) or quote(ids.get(argument, "0" * 24), safe="")
        path = re.sub(rf"<(?:\w+:)?{argument}>", value, path)
    return path


def _base_body(endpoint: str, ids: dict[str, str]) -> dict[str, Any]:
    """The body that reaches the route's logic (from the security matrix), for one field to be replaced."""
    route = ROUTES.get(endpoint)
    body = dict(route.body or {}) if route else {}
    fill = {
        "app": ids["appId"],
        "session": ids["sessionId"],
        "team": ids["resourceSlug"],
        "newcomer": "new@example.com",
    }
    return {key: value.format(**fill) if isinstance(value, str) else value for key, value in body.items()}


def _form_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _leaves(value: Any, where: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Where a hostile value can go in `value`: every leaf, and a new key in every object below the top."""
    if isinstance(value, dict):
        if where:
            yield (*where, "zz")
        for key, item in value.items():
            yield from _leaves(item, (*where, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*where, index))
    else:
        yield where


def _replaced(value: Any, where: tuple[Any, ...], new: Any) -> Any:
    """A copy of `value` with `new` at `where` (a new key where there was none)."""
    if not where:
        return new
    head, *rest = where
    copy = dict(value) if isinstance(value, dict) else list(value)
    inner = value.get(head, {}) if isinstance(value, dict) else value[head]
    copy[head] = _replaced(inner, tuple(rest), new)
    return copy


def _cases(rule: Any, method: str, ids: dict[str, str], fields: list[str], rng: random.Random) -> Iterator[dict]:
    """The requests to make: hostile path segments, query strings, headers, then bodies."""
    good = _path(rule, ids)
    for argument in rule.arguments:
        for segment in PATH_SEGMENTS:
            yield {"path": _path(rule, ids, {argument: segment}), "kind": "path"}
    names = ["limit", "after", "before", "status", "teamId", "next", *rng.sample(fields, 4)]
    for _ in range(5):
        query = [(name, _form_value(rng.choice(HOSTILE_STRINGS[:-8]))) for name in rng.sample(names, 3)]
        yield {"path": f"{good}?{urlencode(query)}"}
    yield {"path": f"{good}?limit=1&limit=2&after=-1&after=3"}
    base = _base_body(rule.endpoint, ids)
    for headers in rng.sample(HOSTILE_HEADERS, 3):
        yield {"path": good, "headers": headers, "json": None if method in BODYLESS else base}
    if method in BODYLESS:
        return
    for value in rng.sample(HOSTILE_VALUES, 6):
        yield {"path": good, "json": value}  # the whole body
    for field in base:
        for value in SHARP_VALUES + rng.sample(HOSTILE_VALUES, 2):
            yield {"path": good, "json": {**base, field: value}}
    for field in rng.sample(fields, 5):
        for value in rng.sample(HOSTILE_VALUES, 3):
            yield {"path": good, "json": {**base, field: value}}
    for deep in DEEP_BODIES.get(rule.endpoint, []):
        for where in _leaves(deep):
            for value in SHARP_VALUES:
                yield {"path": good, "json": _replaced(deep, where, value)}
    for _ in range(3):
        chosen = rng.sample(fields, rng.randint(1, 5))
        yield {"path": good, "json": {name: rng.choice(HOSTILE_VALUES) for name in chosen}}
    form = {key: _form_value(value) for key, value in base.items()}
    for field in list(base) + rng.sample(fields, 3):
        for value in rng.sample(HOSTILE_STRINGS, 3):
            if "\ud800" not in value and "\udfff" not in value:
                yield {"path": good, "data": {**form, field: value}}
    for raw in rng.sample(RAW_BODIES, 3):
        yield {"path": good, "data": raw, "content_type": "application/json"}


def _for_caller(
    caller: str, fuzz: Fuzz, rule: Any, method: str, ids: dict[str, str], cases: list[dict], rng: random.Random
) -> list[dict]:
    """The cases worth each caller's time, to keep the run near 30 s: every one for the API key; half of them for
    the cookie (the same parsing behind another credential, with CSRF); for an anonymous caller every case where
    the route serves anonymous callers, else a sample (they are refused before any input is read)."""
    if caller == "cookie":
        paths = [case for case in cases if case.get("kind") == "path"]
        others = [case for case in cases if case.get("kind") != "path"]
        return rng.sample(others, (len(others) + 1) // 2) + rng.sample(paths, min(len(paths), 12))
    if caller == "anonymous":
        probe = fuzz.app.test_client().open(
            _path(rule, ids), method=method, headers={"Accept": "application/json"}, buffered=False
        )
        probe.close()
        if probe.status_code == 401:
            return rng.sample(cases, min(len(cases), 10))
    return cases


def test_no_route_answers_hostile_input_with_a_500_or_an_error_of_another_shape(app, factory):
    fuzz = Fuzz(app, factory)
    fields = _schema_fields()
    assert {"appId", "sessionId", "config", "limit", "email", "role"} <= set(fields)
    routes = list(_routes(app))
    assert len(routes) > 40
    for rule, method in routes:
        for caller in CALLERS:
            rng = random.Random(f"{SEED}:{rule.rule}:{method}:{caller}")
            ids = fuzz.ids(rule)
            for case in _for_caller(caller, fuzz, rule, method, ids, list(_cases(rule, method, ids, fields, rng)), rng):
                case.pop("kind", None)
                fuzz.send(caller, method, case.pop("path"), rule.endpoint, **case)
            if caller == "anonymous":
                for authorization in rng.sample(BAD_AUTHORIZATIONS, 2):
                    fuzz.send(caller, method, _path(rule, ids), rule.endpoint, headers={"Authorization": authorization})
        # A method the route does not take.
        fuzz.send("api-key", "PATCH", _path(rule, fuzz.ids(rule)), rule.endpoint, json={})
    print(f"{fuzz.requests} requests over {len(routes)} routes", file=sys.stderr)
    assert not fuzz.failures, f"{len(fuzz.failures)} bad answers:\n" + "\n".join(fuzz.failures[:40])
