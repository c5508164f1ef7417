"""Stored secrets are sealed under SECRET_KEY: a copy of the database holds no app key or webhook secret in
the clear; rotating SECRET_KEY (the old one in SECRET_KEY_FALLBACKS, then `flask reseal-secrets`) loses none;
a key sealed under a SECRET_KEY no longer configured ends the turn with a message saying what to do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from bson import ObjectId, json_util

from agentcloud_clone.db import get_db
from agentcloud_clone.sealing import UnsealError, is_sealed, unseal
from agentcloud_clone.services import apps as apps_service
from agentcloud_clone.services import webhooks
from tests.fakes.receiver import Receiver
from tests.support import run_queued_turn
from tests.workers.harness import FAST, RUNNER_MODULES
from tests.workers.test_webhooks import _drain, _register

APP_KEY = "sk-team-key-8c1e4f9a2b"
OLD_SECRET_KEY, NEW_SECRET_KEY = "old-secret-key-" + "a" * 32, "new-secret-key-" + "b" * 32


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {
        **FAST,
        "SECRET_KEY": OLD_SECRET_KEY,
        "PYTHON_RUNNER_MODULES": RUNNER_MODULES,
        "WEBHOOK_ALLOW_PRIVATE": True,  # the receiver is on loopback
        "WEBHOOK_RETRY_INTERVALS": [],
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def _openai_app(admin: Any) -> str:
    config = {"model": "m", "baseUrl": "http://127.0.0.1:9/v1", "apiKey": APP_KEY}
    body = {"name": "llm", "runner": "openai", "config": config}
    response = admin.json("POST", f"/{admin.user.team_id}/forms/app/add", body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["_id"]


def _database_dump(app: Any) -> str:
    with app.app_context():
        db = get_db()
        return json_util.dumps({name: list(db[name].find()) for name in db.list_collection_names()})


def _stored_key(app: Any, app_id: str) -> str:
    with app.app_context():
        return get_db().apps.find_one({"_id": ObjectId(app_id)})["config"]["apiKey"]


def _upstream_key(app: Any, app_id: str) -> str | None:
    with app.app_context():
        doc = get_db().apps.find_one({"_id": ObjectId(app_id)})
        return apps_service.upstream_for(doc, app.config)[1]


def test_the_database_holds_no_app_key_or_webhook_secret_in_the_clear(app, factory, login, receiver):
    admin = login(factory.user("admin"))
    app_id = _openai_app(admin)
    secret = _register(admin, receiver.url)["secret"]
    dump = _database_dump(app)
    for plain in (APP_KEY, secret, secret.removeprefix("whsec_")):
        assert plain not in dump
    assert is_sealed(_stored_key(app, app_id))
    # ... and both still work: the turn's grant carries the key, deliveries verify with the secret shown.
    assert _upstream_key(app, app_id) == APP_KEY
    with app.app_context():
        webhooks.on_session_started({"_id": ObjectId(), "teamId": ObjectId(admin.user.team_id), "startDate": _now()})
    _drain(app)
    assert receiver.received, "nothing was delivered"
    from standardwebhooks import Webhook

    request = receiver.received[0]
    Webhook(secret).verify(request["body"], {k.lower(): v for k, v in request["headers"].items()})


def _now() -> Any:
    from agentcloud_clone.timeutil import utcnow

    return utcnow()


def test_rotating_secret_key_with_a_fallback_then_resealing_loses_nothing(app, factory, login, receiver):
    admin = login(factory.user("admin"))
    app_id = _openai_app(admin)
    _register(admin, receiver.url)
    sealed_before = _stored_key(app, app_id)
    # The operator rotates: the new key, the old one as a fallback.
    app.config.update(SECRET_KEY=NEW_SECRET_KEY, SECRET_KEY_FALLBACKS=[OLD_SECRET_KEY])
    assert _upstream_key(app, app_id) == APP_KEY
    assert admin.json("GET", "/account.json").status_code == 200  # and nobody was signed out
    result = app.test_cli_runner().invoke(args=["reseal-secrets"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"resealed": 2, "unreadable": 0}
    assert _stored_key(app, app_id) != sealed_before
    # Again: nothing left to do.
    assert json.loads(app.test_cli_runner().invoke(args=["reseal-secrets"]).output)["resealed"] == 0
    # The old key can go now.
    app.config["SECRET_KEY_FALLBACKS"] = []
    assert _upstream_key(app, app_id) == APP_KEY
    with app.app_context(), get_db().webhook_endpoints.find() as endpoints:
        assert all(unseal(e["secret"], app.config).startswith("whsec_") for e in endpoints)


def test_a_key_stored_before_sealing_still_works_and_is_sealed_by_the_command(app, factory, login):
    admin = login(factory.user("admin"))
    app_id = _openai_app(admin)
    with app.app_context():
        get_db().apps.update_one({"_id": ObjectId(app_id)}, {"$set": {"config.apiKey": APP_KEY}})
    assert _upstream_key(app, app_id) == APP_KEY
    result = app.test_cli_runner().invoke(args=["reseal-secrets"])
    assert json.loads(result.output) == {"resealed": 1, "unreadable": 0}
    assert is_sealed(_stored_key(app, app_id)) and _upstream_key(app, app_id) == APP_KEY


def test_a_key_sealed_under_a_secret_key_no_longer_configured_ends_the_turn_saying_so(app, factory, login):
    admin = login(factory.user("admin"))
    app_id = _openai_app(admin)
    app.config.update(SECRET_KEY=NEW_SECRET_KEY, SECRET_KEY_FALLBACKS=[])  # rotated without a fallback
    admin = login(admin.user)  # (which signed everyone out too)
    with app.app_context(), pytest.raises(UnsealError):
        unseal(_stored_key(app, app_id), app.config)
    created = admin.json("POST", f"/{admin.user.team_id}/forms/session/add", {"appId": app_id, "message": "hi"})
    assert created.status_code == 200, created.get_json()
    sid = created.get_json()["_id"]
    assert run_queued_turn(app, sid)["outcome"] == "error"
    body = admin.json("GET", f"/{admin.user.team_id}/session/{sid}/messages.json").get_json()
    assert body["status"] == "error"
    assert "Enter the app's API key again" in body["messages"][-1]["message"]
    result = app.test_cli_runner().invoke(args=["reseal-secrets"])
    assert json.loads(result.output) == {"resealed": 0, "unreadable": 1}
    # Entering the key again fixes it.
    shown = admin.json("GET", f"/{admin.user.team_id}/app/{app_id}.json").get_json()["app"]["config"]
    edit = admin.json("POST", f"/{admin.user.team_id}/forms/app/{app_id}/edit", {"config": {**shown, "apiKey": "sk-2"}})
    assert edit.status_code == 200 and _upstream_key(app, app_id) == "sk-2"
