"""Apps: the agent configurations sessions start from."""

from __future__ import annotations

import json

MISSING = "c" * 24


def test_admin_creates_lists_gets_edits_and_deletes_an_app(factory, login):
    admin = login(factory.user("admin"))
    team = admin.user.team_id
    created = admin.json(
        "POST", f"/{team}/forms/app/add", {"name": "Helper", "runner": "scripted", "config": {"steps": 4}}
    )
    assert created.status_code == 200
    app_id = created.get_json()["_id"]
    listed = admin.client.get(f"/{team}/apps.json").get_json()["apps"]
    assert [a["_id"] for a in listed] == [app_id]
    one = admin.client.get(f"/{team}/app/{app_id}.json").get_json()["app"]
    assert one["config"]["steps"] == 4 and one["config"]["stepDelay"] == 0.25
    edited = admin.json("POST", f"/{team}/forms/app/{app_id}/edit", {"name": "Renamed"})
    assert edited.status_code == 200
    assert admin.client.get(f"/{team}/app/{app_id}.json").get_json()["app"]["name"] == "Renamed"
    assert admin.json("DELETE", f"/{team}/forms/app/{app_id}").status_code == 200
    assert admin.client.get(f"/{team}/app/{app_id}.json").status_code == 404


def test_app_form_post_with_json_config_text(factory, login):
    admin = login(factory.user("owner"))
    response = admin.form(
        f"/{admin.user.team_id}/forms/app/add", {"name": "Form app", "runner": "scripted", "config": '{"steps": 2}'}
    )
    assert response.status_code == 302 and response.headers["Location"] == f"/{admin.user.team_id}/apps"


def test_runner_settings_are_validated(factory, login):
    admin = login(factory.user("admin"))
    path = f"/{admin.user.team_id}/forms/app/add"
    cases = [
        {"name": "x", "runner": "scripted", "config": {"steps": 0}},
        {"name": "x", "runner": "scripted", "config": {"unknown": 1}},
        {"name": "x", "runner": "openai", "config": {}},
        {"name": "x", "runner": "openai", "config": {"model": "m", "baseUrl": "ftp://x"}},
        {"name": "x", "runner": "python", "config": {"callable": "not a callable"}},
        {"name": "x", "runner": "nope"},
        {"name": "", "runner": "scripted"},
        {"name": "x", "config": "not json"},
    ]
    for body in cases:
        response = admin.json("POST", path, body)
        assert response.status_code == 400, body
        assert response.get_json()["errors"]
    ok = admin.json("POST", path, {"name": "gpt", "runner": "openai", "config": {"model": "m", "apiKey": "sk-secret"}})
    assert ok.status_code == 200
    shown = admin.client.get(f"/{admin.user.team_id}/app/{ok.get_json()['_id']}.json").get_json()["app"]
    assert shown["config"]["apiKey"] == "********"


def test_members_cannot_manage_apps_but_can_read_them(factory, login):
    owner = login(factory.user("owner"))
    member = login(factory.user("member", {"_id": __import__("bson").ObjectId(owner.user.team_id)}))
    app_id = factory.app_record(owner.user.team_id)
    team = owner.user.team_id
    assert member.client.get(f"/{team}/apps.json").status_code == 200
    assert member.json("POST", f"/{team}/forms/app/add", {"name": "x"}).status_code == 403
    assert member.json("POST", f"/{team}/forms/app/{app_id}/edit", {"name": "y"}).status_code == 403
    assert member.json("DELETE", f"/{team}/forms/app/{app_id}").status_code == 403


def test_app_ids_are_team_scoped_and_validated(factory, login):
    admin = login(factory.user("admin"))
    other_app = factory.app_record(factory.user("owner").team_id)
    team = admin.user.team_id
    assert admin.client.get(f"/{team}/app/{other_app}.json").status_code == 404
    assert admin.json("POST", f"/{team}/forms/app/{other_app}/edit", {"name": "mine"}).status_code == 404
    assert admin.json("DELETE", f"/{team}/forms/app/{other_app}").status_code == 404
    assert admin.client.get(f"/{team}/app/xyz.json").status_code == 400
    assert admin.client.get(f"/{team}/app/{MISSING}.json").status_code == 404


def test_app_with_live_sessions_cannot_be_deleted(factory, login):
    admin = login(factory.user("admin"))
    app_id = factory.app_record(admin.user.team_id)
    admin.json("POST", f"/{admin.user.team_id}/forms/session/add", {"appId": app_id})
    response = admin.json("DELETE", f"/{admin.user.team_id}/forms/app/{app_id}")
    assert response.status_code == 409


def test_saving_the_masked_upstream_key_keeps_the_stored_one(factory, login, app):
    from bson import ObjectId

    from agentcloud_clone.db import get_db
    from agentcloud_clone.sealing import unseal

    admin = login(factory.user("admin"))
    team = admin.user.team_id
    config = {"model": "m", "apiKey": "sk-real-secret"}
    app_id = admin.json(
        "POST", f"/{team}/forms/app/add", {"name": "llm", "runner": "openai", "config": config}
    ).get_json()["_id"]
    shown = admin.client.get(f"/{team}/app/{app_id}.json").get_json()["app"]["config"]
    assert (
        admin.json("POST", f"/{team}/forms/app/{app_id}/edit", {"config": {**shown, "model": "m2"}}).status_code == 200
    )
    with app.app_context():
        stored = get_db().apps.find_one({"_id": ObjectId(app_id)})["config"]
    # Stored sealed (sealing.py), and still the key that was entered.
    assert stored["apiKey"].startswith("sealed:v1:") and "sk-real-secret" not in stored["apiKey"]
    assert unseal(stored["apiKey"], app.config) == "sk-real-secret" and stored["model"] == "m2"


def test_settings_keys_mongodb_cannot_store_are_refused(factory, login):
    admin = login(factory.user("admin"))
    path = f"/{admin.user.team_id}/forms/app/add"
    for options in ({"a\u0000b": 1}, {"$where": "x"}, {"nested": [{"a.b": 1}]}):
        config = {"callable": "m:f", "options": options}
        response = admin.json("POST", path, {"name": "n", "runner": "python", "config": config})
        assert response.status_code == 400 and response.get_json()["errors"]["config"], options


def test_create_routes_allow_only_post_and_item_deletes_do_not_match_them(factory, api_key_client):
    """`/forms/<thing>/add` is not an item: `Allow` lists what the resource serves, and DELETE on it is a 405."""
    user = factory.user("owner", api_key=True)
    call = api_key_client(user)
    for thing in ("app", "session", "member"):
        path = f"/{user.team_id}/forms/{thing}/add"
        assert set(call("OPTIONS", path).headers["Allow"].split(", ")) == {"POST", "OPTIONS"}, thing
        refused = call("DELETE", path)
        assert refused.status_code == 405 and set(refused.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}, thing
        assert call("DELETE", f"/{user.team_id}/forms/{thing}/adds").status_code == 400, thing  # still an id, malformed


def test_upstream_base_url_is_an_ascii_http_url(app, factory, login):
    """The same grammar openapi.yaml states: a host name or [IPv6], an optional port, visible ASCII after it.
    (The grammar alone: which addresses an upstream may have is tests/workers/test_upstream_addresses.py's.)"""
    app.config["UPSTREAM_ALLOW_PRIVATE"] = True
    admin = login(factory.user("admin"))
    path = f"/{admin.user.team_id}/forms/app/add"

    def status(url: str) -> int:
        body = {"name": "gpt", "runner": "openai", "config": {"model": "m", "baseUrl": url}}
        return int(admin.json("POST", path, body).status_code)

    for url in ("http://127.0.0.1:8001/v1", "https://api.example.com/v1?x=1", "http://[::1]:8080/", "http://llm"):
        assert status(url) == 200, url
    for url in ("https://\u00cf", "http://under_score", "http://host.", "http://a/b c", "http://a\n", "ftp://a"):
        assert status(url) == 400, url


def test_edits_that_only_the_apps_current_state_refuses_are_conflicts(factory, login):
    """A well-formed edit that would succeed on an app in another state is a 409, not invalid input."""
    admin = login(factory.user("admin"))
    team = admin.user.team_id
    app_id = factory.app_record(team)  # scripted
    path = f"/{team}/forms/app/{app_id}/edit"
    switch = admin.json("POST", path, {"runner": "python"})
    assert switch.status_code == 409 and "settings" in switch.get_json()["message"]
    foreign = admin.json("POST", path, {"config": {"model": "m"}})
    assert foreign.status_code == 409 and "scripted" in foreign.get_json()["message"]
    assert admin.json("POST", path, {"config": {"nonsense": 1}}).status_code == 400  # fits no runner
    python = {"callable": "agentcloud_clone.examples:echo"}
    assert admin.json("POST", path, {"runner": "python", "config": python}).status_code == 200
    assert admin.json("POST", path, {"runner": "python", "name": "same runner keeps its settings"}).status_code == 200
    assert admin.json("POST", path, {"runner": "scripted"}).status_code == 200  # scripted has defaults


def _stored_config(app, app_id):
    """The app's settings as stored, its sealed key opened."""
    from bson import ObjectId

    from agentcloud_clone.db import get_db
    from agentcloud_clone.sealing import is_sealed, unseal

    with app.app_context():
        config = get_db().apps.find_one({"_id": ObjectId(app_id)})["config"]
    assert "apiKey" not in config or is_sealed(config["apiKey"])
    return {**config, "apiKey": unseal(config["apiKey"], app.config)} if "apiKey" in config else config


def test_changing_where_a_key_is_sent_needs_the_key_again_by_json_and_by_form(factory, login, app):
    admin = login(factory.user("admin"))
    team = admin.user.team_id
    home, elsewhere = "https://models.example.com/v1", "https://collector.example.net/v1"
    config = {"model": "m", "baseUrl": home, "apiKey": "sk-entered-by-an-admin"}
    app_id = admin.json(
        "POST", f"/{team}/forms/app/add", {"name": "llm", "runner": "openai", "config": config}
    ).get_json()["_id"]
    edit = f"/{team}/forms/app/{app_id}/edit"
    shown = admin.client.get(f"/{team}/app/{app_id}.json").get_json()["app"]["config"]
    assert shown["apiKey"] == "********"
    without_address = {key: value for key, value in shown.items() if key != "baseUrl"}

    for moved in ({**shown, "baseUrl": elsewhere}, without_address):
        by_json = admin.json("POST", edit, {"config": moved})
        assert by_json.status_code == 400 and by_json.get_json()["errors"]["config"]["apiKey"], moved
        by_form = admin.form(edit, {"name": "llm", "runner": "openai", "config": json.dumps(moved)})
        assert by_form.status_code == 400 and b"Enter the API key again" in by_form.data, moved
        assert _stored_config(app, app_id) == {**config, "timeout": 60.0}

    # The mask with the address unchanged keeps the key (a form saving the other settings).
    kept = admin.form(edit, {"name": "llm", "runner": "openai", "config": json.dumps({**shown, "model": "m2"})})
    assert kept.status_code == 302 and _stored_config(app, app_id)["apiKey"] == "sk-entered-by-an-admin"
    # The key entered again goes with the new address.
    moved = admin.json("POST", edit, {"config": {**shown, "baseUrl": elsewhere, "apiKey": "sk-entered-again"}})
    assert moved.status_code == 200
    stored = _stored_config(app, app_id)
    assert (stored["baseUrl"], stored["apiKey"]) == (elsewhere, "sk-entered-again")
