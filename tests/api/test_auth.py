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
        {
            "_id": me.user.team_id,
            "orgId": body["teams"][0]["orgId"],
            "name": body["teams"][0]["name"],
            "role": "viewer",
            "limits": {},
        }
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


def test_a_key_made_by_a_form_post_is_shown_once_and_never_rides_readable_in_the_cookie(factory, login, app):
    me = login(factory.user("member"))
    made = me.form("/forms/account/apikey/add", {"name": "from the page"})
    assert made.status_code == 302 and made.headers["Location"].endswith("/account/apikeys")
    cookie = me.session_cookie(app)
    page = me.client.get("/account/apikeys")
    key = page.get_data(as_text=True).split('id="new-key" class="mono" readonly value="', 1)[1].split('"', 1)[0]
    assert key.startswith("ak_") and "reveal:api_key" in cookie and key not in cookie  # sealed in the cookie
    assert page.headers["Cache-Control"] == "no-store"
    assert (
        me.client.get(f"/{me.user.team_id}/sessions.json", headers={"Authorization": f"Bearer {key}"}).status_code
        == 200
    )
    assert "reveal:" not in me.session_cookie(app)
    assert key not in me.client.get("/account/apikeys").get_data(as_text=True)  # once


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


def test_behind_https_both_sign_in_cookies_are_secure(make_app):
    from tests.support import Factory

    secure = make_app(SESSION_COOKIE_SECURE=True)
    user = Factory(secure).user("member")
    signed_in = secure.test_client().post(
        "/forms/account/login", json={"email": user.email, "password": user.password, "remember": True}
    )
    cookies = {header.split("=", 1)[0]: header for header in signed_in.headers.getlist("Set-Cookie")}
    assert set(cookies) >= {"session", "remember_token"}
    for name in ("session", "remember_token"):
        assert "; Secure" in cookies[name] and "HttpOnly" in cookies[name] and "SameSite=Lax" in cookies[name], name


def _cookie(response, name: str) -> str | None:
    for header in response.headers.getlist("Set-Cookie"):
        if header.startswith(f"{name}="):
            return header.split(";", 1)[0].split("=", 1)[1]
    return None


def test_sign_out_after_keep_me_signed_in_clears_and_revokes_every_cookie(factory, app):
    user = factory.user("member")
    client = app.test_client()
    signed_in = client.post(
        "/forms/account/login", json={"email": user.email, "password": user.password, "remember": True}
    )
    session_cookie, remember_cookie = _cookie(signed_in, "session"), _cookie(signed_in, "remember_token")
    assert session_cookie and remember_cookie
    csrf = signed_in.get_json()["csrf"]
    out = client.post("/logout", json={}, headers={"X-CSRFToken": csrf})
    assert out.status_code == 200
    cleared = [h for h in out.headers.getlist("Set-Cookie") if h.startswith("remember_token=")]
    assert cleared and "Expires=Thu, 01 Jan 1970" in cleared[0]
    assert client.get("/account.json").status_code == 401
    # Cookies captured before sign-out, replayed by someone else.
    for name, value in (("session", session_cookie), ("remember_token", remember_cookie)):
        thief = app.test_client()
        thief.set_cookie(name, value)
        assert thief.get("/account.json").status_code == 401, name


def test_remember_cookie_alone_signs_in_until_sign_out(factory, app):
    user = factory.user("member")
    signed_in = app.test_client().post(
        "/forms/account/login", json={"email": user.email, "password": user.password, "remember": True}
    )
    browser_restarted = app.test_client()
    browser_restarted.set_cookie("remember_token", _cookie(signed_in, "remember_token"))
    assert browser_restarted.get("/account.json").status_code == 200


def test_sign_out_everywhere_revokes_other_browsers(factory, login):
    user = factory.user("member")
    laptop, phone = login(user), login(user)
    assert phone.client.get("/account.json").status_code == 200
    assert laptop.json("POST", "/forms/account/signout-all").status_code == 200
    assert phone.client.get("/account.json").status_code == 401
    assert laptop.client.get("/account.json").status_code == 401


def test_a_password_change_signs_out_every_other_browser_and_keeps_this_one(factory, login, client):
    user = factory.user("member")
    laptop, phone = login(user), login(user)
    remembered = login(user, remember=True)
    captured = {c.key: c.value for c in remembered.client._cookies.values()}
    changed = laptop.json(
        "POST", "/forms/account/password", {"currentPassword": user.password, "newPassword": "a new passphrase"}
    )
    assert changed.status_code == 200 and changed.get_json()["ok"] is True, changed.get_json()
    assert laptop.client.get("/account.json").status_code == 200  # this browser, on a new sign-in
    assert phone.client.get("/account.json").status_code == 401
    assert remembered.client.get("/account.json").status_code == 401
    for name, value in captured.items():  # a cookie captured before the change, replayed in a fresh browser
        client.set_cookie(name, value)
    assert client.get("/account.json").status_code == 401
    old = client.post("/forms/account/login", json={"email": user.email, "password": user.password})
    assert old.status_code == 401
    new = client.post("/forms/account/login", json={"email": user.email, "password": "a new passphrase"})
    assert new.status_code == 200


def test_a_password_change_needs_the_current_password_a_browser_and_a_real_change(factory, login, api_key_client):
    user = factory.user("member", api_key=True)
    me = login(user)
    path = "/forms/account/password"
    wrong = me.json("POST", path, {"currentPassword": "not it", "newPassword": "a new passphrase"})
    assert wrong.status_code == 403 and wrong.get_json()["errors"] == {"currentPassword": ["Wrong password."]}
    short = me.json("POST", path, {"currentPassword": user.password, "newPassword": "short"})
    assert short.status_code == 400 and "newPassword" in short.get_json()["errors"]
    same = me.json("POST", path, {"currentPassword": user.password, "newPassword": user.password})
    assert same.status_code == 400 and "newPassword" in same.get_json()["errors"]
    assert me.json("POST", path, {"currentPassword": user.password}).status_code == 400
    by_key = api_key_client(user)("POST", path, {"currentPassword": user.password, "newPassword": "a new passphrase"})
    assert by_key.status_code == 403 and "browser" in by_key.get_json()["message"]
    no_token = me.client.post(path, data={"currentPassword": user.password, "newPassword": "a new passphrase"})
    assert no_token.status_code == 403  # a cookie form post without the CSRF token
    assert me.client.get("/account.json").status_code == 200  # nothing above changed or signed anything out


def test_the_account_page_changes_the_password_by_form(factory, login):
    user = factory.user("member")
    me = login(user)
    page = me.client.get("/account/apikeys")
    assert b'action="/forms/account/password"' in page.data and b'action="/forms/account/signout-all"' in page.data
    posted = me.form("/forms/account/password", {"currentPassword": user.password, "newPassword": "a new passphrase"})
    assert posted.status_code == 302 and posted.headers["Location"].endswith("/account/apikeys")
    assert b"Password changed" in me.client.get("/account/apikeys").data
    wrong = me.form("/forms/account/password", {"currentPassword": user.password, "newPassword": "another one!"})
    assert wrong.status_code == 403  # the old password is the current one no more


def test_wrong_current_passwords_are_rate_limited(factory, login, app):
    user = factory.user("member")
    me = login(user)
    limit = int(str(app.config["LOGIN_RATE_LIMIT"]).split()[0])
    answers = [
        me.json("POST", "/forms/account/password", {"currentPassword": "guess", "newPassword": "a new passphrase"})
        for _ in range(limit + 1)
    ]
    assert [a.status_code for a in answers[:limit]] == [403] * limit
    assert answers[-1].status_code == 429 and answers[-1].headers["Retry-After"]


def test_sign_out_on_one_browser_keeps_the_others(factory, login):
    user = factory.user("member")
    laptop, phone = login(user), login(user)
    laptop.json("POST", "/logout")
    assert laptop.client.get("/account.json").status_code == 401
    assert phone.client.get("/account.json").status_code == 200


def test_an_api_key_cannot_mint_or_revoke_keys(factory, api_key_client, login):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    minted = call("POST", "/forms/account/apikey/add", {"name": "more"})
    assert minted.status_code == 403 and "browser" in minted.get_json()["message"]
    key_id = call("GET", "/account/apikeys.json").get_json()["apiKeys"][0]["_id"]
    assert call("POST", f"/forms/account/apikey/{key_id}/revoke").status_code == 403
    browser = login(user)
    assert browser.json("POST", "/forms/account/apikey/add", {"name": "more"}).status_code == 200


def test_csrf_refusals_say_what_to_send(factory, login):
    me = login(factory.user("member"))
    path = f"/{me.user.team_id}/forms/session/{'a' * 24}/cancel"
    no_origin = me.client.post(path, json={})
    assert no_origin.status_code == 403 and "X-CSRFToken" in no_origin.get_json()["message"]
    assert "Origin" in no_origin.get_json()["message"]
    cross = me.client.post(path, json={}, headers={"Origin": "https://evil.example"})
    assert "https://evil.example is not this site" in cross.get_json()["message"]
    delete = me.client.delete(f"/{me.user.team_id}/forms/session/{'a' * 24}", headers={"Accept": "application/json"})
    assert "Content-Type: application/json" in delete.get_json()["message"]
    same_site = me.client.post(path, json={}, headers={"Origin": "http://localhost"})
    assert same_site.status_code == 404


def test_any_authorization_header_gets_json_401_not_a_sign_in_redirect(app):
    """A program's malformed credentials (another scheme, a bare token) are a 401 it can read, on form routes too."""
    client = app.test_client()
    for header in ("Basic dXNlcjpwYXNz", "ak_without_a_scheme", "Bearer"):
        response = client.post(f"/{'a' * 24}/forms/app/{'b' * 24}/delete", headers={"Authorization": header})
        assert response.status_code == 401, header
        assert response.get_json()["code"] == 401, header
    assert client.post(f"/{'a' * 24}/forms/app/{'b' * 24}/delete").status_code == 302  # a browser is still sent on


def test_remember_is_a_json_boolean_or_a_form_checkbox(factory, app):
    user = factory.user("member")
    for value in (0, 1, "true", None):
        body = {"email": user.email, "password": user.password, "remember": value}
        refused = app.test_client().post("/forms/account/login", json=body)
        assert refused.status_code == 400 and "remember" in refused.get_json()["errors"], value
    assert app.test_client().post("/forms/account/login", json={**body, "remember": True}).status_code == 200
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    token = page.split('name="csrf_token" value="')[1].split('"')[0]
    form = {"email": user.email, "password": user.password, "remember": "true", "csrf_token": token}
    signed_in = client.post("/login", data=form)
    assert signed_in.status_code == 302
    assert any(cookie.startswith("remember_token=") for cookie in signed_in.headers.getlist("Set-Cookie"))
