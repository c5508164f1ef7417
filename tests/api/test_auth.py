"""Signing in and out, API keys, and CSRF on cookie-authenticated posts."""

from __future__ import annotations

from agentcloud_clone.db import get_db


def test_login_form_signs_in_and_redirects_to_team(factory, app):
    user = factory.user("member")
    client = app.test_client()
    page = client.get("/login")
    assert page.status_code == 200 and b'name="csrf_token"' in page.data
    token = page.get_data(as_text=True).split('name="csrf_token" value="')[1].split('"')[0]
    response = client.post("/login", data={"email": user.email, "password": user.password, "csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == f"/{user.team_id}/sessions"
    assert client.get("/account.json").get_json()["account"]["email"] == user.email


def test_login_form_without_csrf_token_is_refused(factory, app):
    user = factory.user("member")
    response = app.test_client().post("/login", data={"email": user.email, "password": user.password})
    assert response.status_code == 403


def test_wrong_password_is_401_and_same_for_unknown_email(factory, app):
    user = factory.user("member")
    client = app.test_client()
    wrong = client.post("/forms/account/login", json={"email": user.email, "password": "nope-nope"})
    unknown = client.post("/forms/account/login", json={"email": "ghost@example.com", "password": "nope-nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.get_json()["message"] == unknown.get_json()["message"]


def test_login_next_only_follows_local_paths(factory, app):
    user = factory.user("member")
    client = app.test_client()
    body = {"email": user.email, "password": user.password, "next": "https://evil.example/"}
    assert client.post("/forms/account/login", json=body).get_json()["redirect"] == f"/{user.team_id}/sessions"


def test_logout_ends_the_session(factory, login):
    me = login(factory.user("member"))
    assert me.json("POST", "/logout").status_code == 200
    assert me.client.get("/account.json").status_code == 401


def test_account_json_lists_teams_with_roles(factory, login):
    me = login(factory.user("viewer"))
    body = me.client.get("/account.json").get_json()
    assert body["teams"] == [
        {"_id": me.user.team_id, "orgId": body["teams"][0]["orgId"], "name": body["teams"][0]["name"], "role": "viewer"}
    ]


def test_api_key_is_shown_once_hashed_and_revocable(factory, login, app):
    me = login(factory.user("member"))
    created = me.json("POST", "/forms/account/apikey/add", {"name": "ci"}).get_json()
    key = created["key"]
    with app.app_context():
        stored = get_db().api_keys.find_one({})
    assert key not in str(stored) and stored["keyHash"] != key
    listed = me.client.get("/account/apikeys.json").get_json()["apiKeys"]
    assert key not in str(listed) and listed[0]["lastUsedAt"] is None
    headers = {"Authorization": f"Bearer {key}"}
    anon = app.test_client()
    assert anon.get(f"/{me.user.team_id}/sessions.json", headers=headers).status_code == 200
    assert me.client.get("/account/apikeys.json").get_json()["apiKeys"][0]["lastUsedAt"] is not None
    assert me.json("POST", f"/forms/account/apikey/{created['_id']}/revoke").status_code == 200
    denied = anon.get(f"/{me.user.team_id}/sessions.json", headers=headers)
    assert denied.status_code == 401 and "API key" in denied.get_json()["message"]


def test_api_key_requests_need_no_csrf_and_get_json(factory, api_key_client):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    response = call("POST", f"/{user.team_id}/forms/session/add", {"appId": app_id})
    assert response.status_code == 200 and "csrf" not in response.get_json()


def test_cookie_post_without_csrf_is_refused_and_with_it_succeeds(factory, login):
    me = login(factory.user("member"))
    app_id = factory.app_record(me.user.team_id)
    path = f"/{me.user.team_id}/forms/session/add"
    assert me.client.post(path, data={"appId": app_id}).status_code == 403
    assert me.client.post(path, json={"appId": app_id}).status_code == 403
    assert me.form(path, {"appId": app_id}).status_code == 302


def test_session_cookie_flags(factory, app):
    user = factory.user("member")
    response = app.test_client().post("/forms/account/login", json={"email": user.email, "password": user.password})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
