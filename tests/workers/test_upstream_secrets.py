"""Secrets stay secret: a team admin, through the HTTP API, tries every way to make a worker send the operator's
key or the process environment to an address of the admin's choosing; the turns then run in-process as a worker
runs them, and fake upstreams record every request they receive."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agentcloud_clone.jobs import runners
from tests.fakes.openai_server import FakeOpenAI
from tests.support import run_queued_turn
from tests.workers.harness import FAST

OPERATOR_KEY = "sk-OPERATOR-4f1d9c2e7b"
TEAM_KEY = "sk-TEAM-OWN-91ab3c"
# What a worker's environment holds that no team may ever see (the openai SDK reads several of these itself).
PLANTED_ENV = {
    "OPENAI_API_KEY": "sk-ENV-OPENAI-7d0c55",
    "OPENAI_ORG_ID": "org-ENV-83c1f0",
    "OPENAI_PROJECT_ID": "proj-ENV-2be94a",
    "OPENAI_ADMIN_KEY": "sk-admin-ENV-5a6b7c",
    "OPENAI_CUSTOM_HEADERS": "X-Env-Header: hdr-ENV-1f2e3d\nAuthorization: Bearer auth-ENV-0a9b8c",
    "OPENAI_WEBHOOK_SECRET": "whsec-ENV-c4d5e6",
    "AWS_SECRET_ACCESS_KEY": "aws-ENV-9f8e7d6c",
    "DATABASE_PASSWORD": "dbpw-ENV-6c5b4a",
}
SECRET_KEY = "flask-SECRET-KEY-e1f2a3"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, FakeOpenAI]]:
    """The operator's upstream, the team's own, and one an attacker on the team would like keys sent to."""
    fakes = {name: FakeOpenAI(chunks=3, interval=0).start() for name in ("operator", "team", "attacker")}
    try:
        yield fakes
    finally:
        for fake in fakes.values():
            fake.stop()


@pytest.fixture
def app_settings(upstreams: dict[str, FakeOpenAI]) -> dict[str, Any]:
    return {
        **FAST,
        "SECRET_KEY": SECRET_KEY,
        "OPENAI_BASE_URL": upstreams["operator"].base_url,
        "OPENAI_API_KEY": OPERATOR_KEY,
        # The operator's allow-list: the examples shipped with the product, nothing else.
        "PYTHON_RUNNER_MODULES": ["agentcloud_clone.examples"],
    }


@pytest.fixture(autouse=True)
def planted_environment(monkeypatch: pytest.MonkeyPatch, upstreams: dict[str, FakeOpenAI]) -> None:
    for name, value in PLANTED_ENV.items():
        monkeypatch.setenv(name, value)
    # Were the SDK to fall back to the environment for the address, it would reach the attacker.
    monkeypatch.setenv("OPENAI_BASE_URL", upstreams["attacker"].base_url)
    for fake in upstreams.values():
        fake.received.clear()
        fake.authorizations.clear()


def _secrets(app: Any) -> dict[str, str]:
    """Every value that must never reach an upstream a team chose."""
    values = {f"env {name}": value for name, value in PLANTED_ENV.items()}
    for line in PLANTED_ENV["OPENAI_CUSTOM_HEADERS"].splitlines():
        values[f"env header {line}"] = line.split(":", 1)[1].strip()
    for setting in ("SECRET_KEY", "OPENAI_API_KEY", "MONGO_URI", "REDIS_URL", "REDIS_PREFIX"):
        values[f"config {setting}"] = str(app.config[setting])
    return values


def _leaks(fake: FakeOpenAI, secrets: dict[str, str]) -> list[str]:
    found = []
    for request in fake.received:
        seen = "\n".join(f"{name}: {value}" for name, value in request["headers"]) + "\n" + request["body"].decode()
        found += [f"{what} in a request to {request['path']}" for what, value in secrets.items() if value in seen]
    return found


def _start_turn(call: Any, team: str, app_id: str) -> dict[str, Any]:
    created = call("POST", f"/{team}/forms/session/add", {"appId": app_id, "message": "hello"})
    assert created.status_code == 200, created.get_json()
    return created.get_json()


def _add_app(call: Any, team: str, runner: str, config: dict[str, Any]) -> Any:
    return call("POST", f"/{team}/forms/app/add", {"name": f"{runner} app", "runner": runner, "config": config})


def test_no_trick_gets_the_operator_key_or_the_environment_to_a_teams_address(
    app, factory, api_key_client, upstreams, monkeypatch
):
    admin = factory.user("admin", api_key=True)
    call, team = api_key_client(admin), admin.team_id
    operator, own, attacker = upstreams["operator"], upstreams["team"], upstreams["attacker"]
    contexts: list[tuple[str, str]] = []
    real_openai = runners.RUNNERS["openai"]

    def recording(ctx: Any, grant: Any) -> Any:
        contexts.append((repr(ctx) + repr(ctx.app), repr(grant)))
        return real_openai(ctx, grant)

    monkeypatch.setitem(runners.RUNNERS, "openai", recording)

    # Naming an environment variable for the key is no longer a setting at all.
    for env_name in ("OPENAI_API_KEY", "SECRET_KEY", "AWS_SECRET_ACCESS_KEY"):
        for base in ({}, {"baseUrl": attacker.base_url}):
            refused = _add_app(call, team, "openai", {"model": "m", "apiKeyEnv": env_name, **base})
            assert refused.status_code == 400 and "apiKeyEnv" in refused.get_json()["errors"]["config"], env_name
    # A callable outside the operator's allow-list is refused when saved.
    for target in ("builtins:repr", "os:getenv", "subprocess:getoutput", "agentcloud_clone.config:Config"):
        refused = _add_app(call, team, "python", {"callable": target})
        assert refused.status_code == 400 and "callable" in refused.get_json()["errors"]["config"], target

    # The admin's own address with no key of its own: the operator's key stays home.
    keyless = _add_app(call, team, "openai", {"model": "m", "baseUrl": attacker.base_url}).get_json()["_id"]
    # An address that starts like the operator's but is the attacker's (userinfo): not the operator's address.
    operator_host, attacker_host = (fake.base_url.split("/")[2] for fake in (operator, attacker))
    # (A stricter URL grammar may refuse it outright, which is as good.)
    lookalike = _add_app(call, team, "openai", {"model": "m", "baseUrl": f"http://{operator_host}@{attacker_host}/v1"})
    assert lookalike.status_code in (200, 400), lookalike.get_json()
    lookalikes = [lookalike.get_json()["_id"]] if lookalike.status_code == 200 else []
    # A team key entered for the team's own upstream goes there, and only there.
    keyed = _add_app(call, team, "openai", {"model": "m", "baseUrl": own.base_url, "apiKey": TEAM_KEY})
    keyed_id = keyed.get_json()["_id"]
    # The operator's defaults: no address of the app's own, so the operator's key to the operator's address.
    default = _add_app(call, team, "openai", {"model": "m"}).get_json()["_id"]

    # Moving the stored team key elsewhere, with the mask a form shows, is refused (JSON and form alike).
    shown = call("GET", f"/{team}/app/{keyed_id}.json").get_json()["app"]["config"]
    assert shown["apiKey"] == "********" and TEAM_KEY not in str(shown)
    for moved in (
        {**shown, "baseUrl": attacker.base_url},
        {key: value for key, value in shown.items() if key != "baseUrl"},
    ):
        edit = call("POST", f"/{team}/forms/app/{keyed_id}/edit", {"config": moved})
        assert edit.status_code == 400 and "apiKey" in edit.get_json()["errors"]["config"], moved
    assert call("POST", f"/{team}/forms/app/{keyed_id}/edit", {"runner": "python"}).status_code in (400, 409)

    for app_id in (keyless, *lookalikes, keyed_id, default):
        outcome = run_queued_turn(app, _start_turn(call, team, app_id)["_id"])
        assert outcome["outcome"] == "completed", (app_id, outcome)

    secrets = _secrets(app)
    # The fakes did hear from the worker: the team key reached the team's upstream, the operator's key its own.
    assert own.authorizations == [f"Bearer {TEAM_KEY}"]
    assert operator.authorizations == [f"Bearer {OPERATOR_KEY}"]
    assert len(attacker.received) == 1 + len(lookalikes) and all(auth is None for auth in attacker.authorizations)
    assert _leaks(attacker, {**secrets, "the team key": TEAM_KEY}) == []
    assert _leaks(own, secrets) == []
    assert _leaks(operator, {k: v for k, v in secrets.items() if k != "config OPENAI_API_KEY"}) == []
    # No turn's context showed a key; the grant holds it without showing it.
    assert len(contexts) == 3 + len(lookalikes)
    for shown_ctx, shown_grant in contexts:
        assert TEAM_KEY not in shown_ctx and OPERATOR_KEY not in shown_ctx
        assert TEAM_KEY not in shown_grant and OPERATOR_KEY not in shown_grant


def test_the_python_runner_refuses_a_callable_the_allow_list_no_longer_holds(app, factory, api_key_client):
    admin = factory.user("admin", api_key=True)
    call, team = api_key_client(admin), admin.team_id
    # Saved while the operator allowed `os`; the operator has since narrowed the list.
    app.config["PYTHON_RUNNER_MODULES"] = ["agentcloud_clone.examples", "os"]
    saved = _add_app(call, team, "python", {"callable": "os:getenv"})
    assert saved.status_code == 200
    app.config["PYTHON_RUNNER_MODULES"] = ["agentcloud_clone.examples"]

    sid = _start_turn(call, team, saved.get_json()["_id"])["_id"]
    assert run_queued_turn(app, sid)["outcome"] == "error"
    body = call("GET", f"/{team}/session/{sid}/messages.json").get_json()
    assert body["status"] == "error"
    closing = body["messages"][-1]
    assert "not in a module this installation allows" in closing["message"].lower()
    assert not [e for e in body["messages"] if e["type"] == "output"]
