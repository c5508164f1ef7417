"""Sharing an app's sessions: admins set the mode; `owner` keeps each session to its creator on every route;
a public app's link lets anyone start a session and reach only that one; a whitelist names accounts. Links and
visitor access end when the link is replaced or the mode changes. Attacks that must fail, fail."""

from __future__ import annotations

import re
from typing import Any

import pytest

from agentcloud_clone.db import get_db


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {"SHARE_START_RATE_LIMIT": "1000 per minute"}


def _shared_app(admin, mode: str = "public", **extra: Any) -> dict:
    body = {"name": "shared", "config": {"steps": 1, "stepDelay": 0}, "sharingConfig": {"mode": mode, **extra}}
    response = admin.json("POST", f"/{admin.user.team_id}/forms/app/add", body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _visit(client, team: str, share_id: str, **body: Any) -> dict:
    response = client.post(f"/s/{team}/forms/session/add", json={"shareId": share_id, **body})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _as_visitor(token: str) -> dict[str, str]:
    return {"X-Visitor-Token": token, "Accept": "application/json"}


# --- admins set the mode -----------------------------------------------------------------------------------


def test_a_link_renewed_by_a_form_post_is_shown_once_on_the_apps_page_and_sealed_in_the_cookie(factory, login, app):
    admin = login(factory.user("admin"))
    made = _shared_app(admin)
    renewed = admin.form(f"/{admin.user.team_id}/forms/app/{made['_id']}/share-link")
    assert renewed.status_code == 302 and renewed.headers["Location"].endswith(f"/{admin.user.team_id}/apps")
    cookie = admin.session_cookie(app)
    page = admin.client.get(f"/{admin.user.team_id}/apps")
    link = page.get_data(as_text=True).split('id="new-share-link" class="mono" readonly value="', 1)[1].split('"')[0]
    share_id = link.rsplit("/", 1)[1]
    assert link == f"http://localhost/s/{admin.user.team_id}/{share_id}" and share_id != made["shareId"]
    assert "reveal:share_link" in cookie and share_id not in cookie
    assert page.headers["Cache-Control"] == "no-store"
    assert share_id not in admin.client.get(f"/{admin.user.team_id}/apps").get_data(as_text=True)  # once
    assert admin.client.get(link.removeprefix("http://localhost")).status_code == 200  # the link works


def test_admins_set_the_mode_and_get_the_link_once(factory, login):
    admin = login(factory.user("admin"))
    made = _shared_app(admin)
    assert re.fullmatch(r"app_[a-f0-9]{64}", made["shareId"])
    assert made["shareLink"] == f"/s/{admin.user.team_id}/{made['shareId']}"
    shown = admin.client.get(f"/{admin.user.team_id}/app/{made['_id']}.json").get_json()["app"]
    assert shown["sharingConfig"] == {"mode": "public", "whitelist": []} and shown["shareLink"]["createdAt"]
    assert made["shareId"] not in str(shown)  # the link is shown once; only its hash is kept
    team_app = admin.json("POST", f"/{admin.user.team_id}/forms/app/add", {"name": "plain"}).get_json()
    assert "shareId" not in team_app
    plain = admin.client.get(f"/{admin.user.team_id}/app/{team_app['_id']}.json").get_json()["app"]
    assert plain["sharingConfig"]["mode"] == "team" and plain["shareLink"] is None


def test_only_admins_set_sharing_and_bad_configs_are_400(factory, login):
    admin = login(factory.user("admin"))
    member = login(factory.user("member", team={"_id": admin.user.team_oid}))
    made = _shared_app(admin, "team")
    path = f"/{admin.user.team_id}/forms/app/{made['_id']}/edit"
    assert member.json("POST", path, {"sharingConfig": {"mode": "public"}}).status_code == 403
    for bad in (
        {"mode": "everyone"},
        {"mode": "whitelist", "whitelist": ["not an account"]},
        {"mode": "whitelist", "whitelist": [{"$ne": 1}]},
        {"mode": "whitelist", "whitelist": ["a@example.com"] * 101},
        {"mode": "public", "permissions": {"$where": 1}},
        {"mode": "public", "extra": 1},
        {},
    ):
        response = admin.json("POST", path, {"sharingConfig": bad})
        assert response.status_code == 400, bad
        assert response.get_json()["code"] == 400
    renew = admin.json("POST", f"/{admin.user.team_id}/forms/app/{made['_id']}/share-link")
    assert renew.status_code == 409  # a team app has no link


# --- owner: each session only its creator, on every route ---------------------------------------------------


def test_owner_mode_keeps_each_session_to_its_creator_on_the_team_routes(app, factory, login, api_key_client):
    admin = factory.user("admin", api_key=True)
    team = {"_id": admin.team_oid}
    creator = factory.user("member", team, api_key=True)
    teammate = factory.user("member", team, api_key=True)
    app_id = factory.app_record(admin.team_id, sharing={"mode": "owner"})
    sid = str(factory.session(creator, app_id)["_id"])
    ended = factory.session(creator, app_id)
    api_key_client(creator)("POST", f"/{admin.team_id}/forms/session/{ended['_id']}/cancel")
    rs = admin.team_id
    for user in (teammate, admin):
        call = api_key_client(user)
        for method, path, body in (
            ("GET", f"/{rs}/session/{sid}.json", None),
            ("GET", f"/{rs}/session/{sid}/messages.json", None),
            ("GET", f"/{rs}/session/{sid}", None),
            ("POST", f"/{rs}/session/{sid}/send-message", {"message": "peek"}),
            ("POST", f"/{rs}/forms/session/{sid}/edit", {"variables": {"a": "b"}}),
            ("POST", f"/{rs}/forms/session/{sid}/start", {}),
            ("POST", f"/{rs}/forms/session/{sid}/cancel", {}),
            ("DELETE", f"/{rs}/forms/session/{ended['_id']}", None),
            ("GET", f"/api/managed-agents/sessions/{sid}", None),
            ("GET", f"/api/managed-agents/sessions/{sid}/events", None),
            ("POST", f"/api/managed-agents/sessions/{sid}/messages", {"message": "peek"}),
            ("POST", "/api/managed-agents/cancel", {"sessionId": sid}),
            ("DELETE", f"/api/managed-agents/sessions/{ended['_id']}", None),
        ):
            response = call(method, path, body, headers={"Accept": "application/json"})
            assert response.status_code == 404, (user.role, method, path, response.get_json())
        listed = call("GET", f"/{rs}/sessions.json").get_json()["sessions"]
        assert sid not in [s["_id"] for s in listed]
        managed = call("GET", "/api/managed-agents/sessions").get_json()["sessions"]
        assert sid not in [s["_id"] for s in managed]
    mine = api_key_client(creator)
    assert mine("GET", f"/{rs}/session/{sid}.json").status_code == 200
    assert sid in [s["_id"] for s in mine("GET", f"/{rs}/sessions.json").get_json()["sessions"]]
    assert mine("POST", f"/{rs}/forms/session/{sid}/cancel").get_json()["ok"] is True
    with app.app_context():
        assert get_db().sessions.find_one({"_id": ended["_id"]})["cancelledAt"]


def test_changing_the_mode_applies_to_the_apps_existing_sessions(factory, login, api_key_client):
    admin = login(factory.user("admin", api_key=True))
    teammate = factory.user("member", {"_id": admin.user.team_oid}, api_key=True)
    app_id = factory.app_record(admin.user.team_id)
    sid = str(factory.session(admin.user, app_id)["_id"])
    path = f"/{admin.user.team_id}/session/{sid}.json"
    call = api_key_client(teammate)
    assert call("GET", path).status_code == 200
    edit = f"/{admin.user.team_id}/forms/app/{app_id}/edit"
    assert admin.json("POST", edit, {"sharingConfig": {"mode": "owner"}}).status_code == 200
    assert call("GET", path).status_code == 404
    assert admin.client.get(path).get_json()["session"]["sharingConfig"] == {"mode": "owner"}
    assert admin.json("POST", edit, {"sharingConfig": {"mode": "team"}}).status_code == 200
    assert call("GET", path).status_code == 200


# --- public: a link starts sessions; each visitor reaches only their own --------------------------------------


def test_public_visitor_flow_and_what_it_cannot_reach(app, factory, login):
    app.config["UPSTREAM_ALLOW_PRIVATE"] = True  # the app's upstream is on loopback (no turn of it runs)
    admin = login(factory.user("admin"))
    rs = admin.user.team_id
    body = {
        "name": "public helper",
        "runner": "openai",
        "config": {"model": "m", "baseUrl": "http://127.0.0.1:9/v1", "apiKey": "sk-SECRET-KEY"},
        "sharingConfig": {"mode": "public"},
    }
    made = admin.json("POST", f"/{rs}/forms/app/add", body).get_json()
    private = factory.session(admin.user, made["_id"], "team-only words")
    stranger = app.test_client()
    started = _visit(stranger, rs, made["shareId"], message="hello from outside", skipRun=True)
    sid, token = started["_id"], started["visitorToken"]
    assert started["redirect"] == f"/s/{rs}/session/{sid}" and token.startswith("sv_")
    client = app.test_client()  # no cookies: the token alone
    shown = client.get(f"/s/{rs}/session/{sid}.json", headers=_as_visitor(token))
    assert shown.status_code == 200
    text = shown.get_data(as_text=True)
    for secret in ("sk-SECRET-KEY", "127.0.0.1:9", "orgId", "createdBy", "limits", "tokenHash", 'share"'):
        assert secret not in text, secret
    messages = client.get(f"/s/{rs}/session/{sid}/messages.json", headers=_as_visitor(token)).get_json()
    assert [m["text"] for m in messages["messages"]] == ["hello from outside"] and "by" not in messages["messages"][0]
    # Another session of the same app, the team's routes, the app itself: nothing.
    assert client.get(f"/s/{rs}/session/{private['_id']}.json", headers=_as_visitor(token)).status_code == 404
    for path in (
        f"/{rs}/session/{sid}.json",
        f"/{rs}/sessions.json",
        f"/{rs}/apps.json",
        f"/{rs}/app/{made['_id']}.json",
        "/api/managed-agents/sessions",
    ):
        response = client.get(path, headers=_as_visitor(token))
        assert response.status_code == 401, path
    # The team sees the visitor's session like any other of its sessions.
    assert admin.client.get(f"/{rs}/session/{sid}.json").status_code == 200


def test_guessing_ids_tells_nothing(app, factory, login):
    admin = login(factory.user("admin"))
    rs = admin.user.team_id
    made = _shared_app(admin)
    _, token = (lambda v: (v["_id"], v["visitorToken"]))(_visit(app.test_client(), rs, made["shareId"]))
    someone_elses = _visit(app.test_client(), rs, made["shareId"])["_id"]
    client = app.test_client()
    real = client.get(f"/s/{rs}/session/{someone_elses}.json", headers=_as_visitor(token))
    made_up = client.get(f"/s/{rs}/session/{'0' * 24}.json", headers=_as_visitor(token))
    assert real.status_code == made_up.status_code == 404
    assert real.get_json() == made_up.get_json()
    forged = client.get(f"/s/{rs}/session/{someone_elses}.json", headers=_as_visitor("sv_" + "A" * 43))
    assert forged.status_code == 404
    wrong_link = client.post(f"/s/{rs}/forms/session/add", json={"shareId": "app_" + "0" * 64})
    assert wrong_link.status_code == 404 and set(wrong_link.get_json()) == {"message", "code"}
    # Not the shape of a link at all (or empty): a 400 that says what one looks like.
    for malformed in ("app_" + "0" * 63, "APP_" + "0" * 64, "app_" + "0" * 64 + "\n"):
        refused = client.post(f"/s/{rs}/forms/session/add", json={"shareId": malformed})
        assert refused.status_code == 400 and "64 characters" in refused.get_json()["message"], malformed
    empty = client.post(f"/s/{rs}/forms/session/add", json={"shareId": ""})
    assert empty.status_code == 400 and "shareId" in empty.get_json()["errors"]
    assert client.get(f"/s/{rs}/app_zz", headers={"Accept": "application/json"}).status_code == 400


def test_a_link_works_only_on_its_own_team(app, factory, login):
    ours, theirs = login(factory.user("admin")), login(factory.user("admin"))
    link = _shared_app(theirs)["shareId"]
    response = app.test_client().post(f"/s/{ours.user.team_id}/forms/session/add", json={"shareId": link})
    assert response.status_code == 404
    assert app.test_client().get(f"/s/{ours.user.team_id}/{link}").status_code == 404


def test_changing_the_mode_or_the_link_ends_old_links_and_visitor_access(app, factory, login):
    admin = login(factory.user("admin"))
    rs = admin.user.team_id
    made = _shared_app(admin)
    visitor = _visit(app.test_client(), rs, made["shareId"])
    client = app.test_client()
    path = f"/s/{rs}/session/{visitor['_id']}.json"
    assert client.get(path, headers=_as_visitor(visitor["visitorToken"])).status_code == 200
    # A new link: the old one and the access it gave end.
    renewed = admin.json("POST", f"/{rs}/forms/app/{made['_id']}/share-link").get_json()
    assert renewed["shareId"] != made["shareId"] and renewed["shareLink"].endswith(renewed["shareId"])
    assert client.get(path, headers=_as_visitor(visitor["visitorToken"])).status_code == 404
    assert client.post(f"/s/{rs}/forms/session/add", json={"shareId": made["shareId"]}).status_code == 404
    second = _visit(app.test_client(), rs, renewed["shareId"])
    second_path = f"/s/{rs}/session/{second['_id']}.json"
    assert client.get(second_path, headers=_as_visitor(second["visitorToken"])).status_code == 200
    # Team-only, then public again: the link of before stays dead, and so does the access it gave.
    edit = f"/{rs}/forms/app/{made['_id']}/edit"
    assert admin.json("POST", edit, {"sharingConfig": {"mode": "team"}}).status_code == 200
    assert client.get(second_path, headers=_as_visitor(second["visitorToken"])).status_code == 404
    again = admin.json("POST", edit, {"sharingConfig": {"mode": "public"}}).get_json()
    assert again["shareId"] not in (made["shareId"], renewed["shareId"])
    assert client.post(f"/s/{rs}/forms/session/add", json={"shareId": renewed["shareId"]}).status_code == 404
    assert client.get(second_path, headers=_as_visitor(second["visitorToken"])).status_code == 404


# --- whitelist: named accounts, each only their own -----------------------------------------------------------


def test_whitelisted_accounts_start_and_read_their_own_sessions(app, factory, login):
    admin = login(factory.user("admin"))
    rs = admin.user.team_id
    named, other_named, outsider = (login(factory.user("owner")) for _ in range(3))
    made = _shared_app(admin, "whitelist", whitelist=[named.user.email.upper(), other_named.user.account_id])
    by_link = named.json("POST", f"/s/{rs}/forms/session/add", {"shareId": made["shareId"], "message": "hi"})
    assert by_link.status_code == 200 and "visitorToken" not in by_link.get_json()
    by_id = other_named.json("POST", f"/s/{rs}/forms/session/add", {"id": made["_id"]})
    assert by_id.status_code == 200
    mine, theirs = by_link.get_json()["_id"], by_id.get_json()["_id"]
    assert named.client.get(f"/s/{rs}/session/{mine}.json").status_code == 200
    assert named.client.get(f"/s/{rs}/session/{theirs}.json").status_code == 404
    assert outsider.json("POST", f"/s/{rs}/forms/session/add", {"shareId": made["shareId"]}).status_code == 403
    assert outsider.client.get(f"/s/{rs}/session/{mine}.json").status_code == 404
    assert app.test_client().post(f"/s/{rs}/forms/session/add", json={"shareId": made["shareId"]}).status_code == 401
    # Off the list: access ends.
    edit = f"/{rs}/forms/app/{made['_id']}/edit"
    kept = {"mode": "whitelist", "whitelist": [other_named.user.account_id]}
    assert admin.json("POST", edit, {"sharingConfig": kept}).status_code == 200
    assert named.client.get(f"/s/{rs}/session/{mine}.json").status_code == 404
    assert other_named.client.get(f"/s/{rs}/session/{theirs}.json").status_code == 200


# --- browsers: the cookie, CSRF, and what the page shows -----------------------------------------------------


def _csrf_from(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found
    return found.group(1)


def test_a_browser_visitor_starts_from_the_link_page_and_keeps_the_session_in_its_cookie(app, factory, login):
    admin = login(factory.user("admin"))
    rs = admin.user.team_id
    made = _shared_app(admin)
    browser = app.test_client()
    page = browser.get(made["shareLink"])
    assert page.status_code == 200 and "shared" in page.get_data(as_text=True)
    assert page.headers["Cache-Control"] == "no-store"
    csrf = _csrf_from(page.get_data(as_text=True))
    started = browser.post(
        f"/s/{rs}/forms/session/add", data={"csrf_token": csrf, "shareId": made["shareId"], "message": "<b>hi</b>"}
    )
    assert started.status_code == 302
    session_page = started.headers["Location"]
    assert session_page.startswith(f"/s/{rs}/session/")
    sid = session_page.rsplit("/", 1)[1]
    shown = browser.get(session_page)
    assert shown.status_code == 200 and "&lt;b&gt;hi&lt;/b&gt;" in shown.get_data(as_text=True)
    assert browser.get(f"/s/{rs}/session/{sid}.json").status_code == 200
    # Cookie posts need the CSRF token (header, form field or Agentcloud's `_csrf`); with it they work.
    assert browser.post(f"/s/{rs}/forms/session/{sid}/edit", json={"variables": {"a": "b"}}).status_code == 403
    token = browser.get(f"/s/{rs}/session/{sid}.json").get_json()["csrf"]
    edit = browser.post(f"/s/{rs}/forms/session/{sid}/edit", json={"variables": {"a": "b"}, "_csrf": token})
    assert edit.status_code == 200
    assert (
        browser.post(f"/s/{rs}/forms/session/{sid}/cancel", json={}, headers={"X-CSRFToken": token}).status_code == 200
    )
    cross_site = browser.post(f"/s/{rs}/session/{sid}/send-message", data={"message": "forged"})
    assert cross_site.status_code == 403
    other_origin = browser.post(
        f"/s/{rs}/forms/session/{sid}/cancel", json={}, headers={"Origin": "https://evil.example"}
    )
    assert other_origin.status_code == 403
    # Another browser has nothing to show for it.
    assert app.test_client().get(f"/s/{rs}/session/{sid}.json").status_code == 401


def test_a_form_post_that_would_start_a_session_needs_the_pages_token(app, factory, login):
    admin = login(factory.user("admin"))
    made = _shared_app(admin)
    forged = app.test_client().post(f"/s/{admin.user.team_id}/forms/session/add", data={"shareId": made["shareId"]})
    assert forged.status_code == 403


def test_the_shared_page_escapes_what_visitors_write(app, factory, login):
    admin = login(factory.user("admin"))
    rs = admin.user.team_id
    made = _shared_app(admin)
    payload = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    visitor = _visit(app.test_client(), rs, made["shareId"], message=payload, name=payload, skipRun=True)
    client = app.test_client()
    with client.session_transaction() as cookie:
        cookie["share_visits"] = [[visitor["_id"], visitor["visitorToken"]]]
    page = client.get(f"/s/{rs}/session/{visitor['_id']}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and payload not in html and "&lt;script&gt;" in html
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    team_page = admin.client.get(f"/{rs}/session/{visitor['_id']}").get_data(as_text=True)
    assert payload not in team_page


# --- limits ------------------------------------------------------------------------------------------------------


def test_shared_routes_are_limited_per_address(make_app):
    from tests.support import Client, Factory

    app = make_app(SHARE_RATE_LIMIT="3 per minute", SHARE_START_RATE_LIMIT="2 per minute")
    factory = Factory(app)
    admin = Client(app.test_client(), factory.user("admin")).login()
    made = _shared_app(admin)
    rs = admin.user.team_id
    client = app.test_client()
    starts = [
        client.post(f"/s/{rs}/forms/session/add", json={"shareId": made["shareId"]}).status_code for _ in range(3)
    ]
    assert starts == [200, 200, 429]
    limited = client.post(f"/s/{rs}/forms/session/add", json={"shareId": made["shareId"]})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert set(limited.get_json()) == {"message", "code"} and limited.get_json()["code"] == 429
    reads = [client.get(f"/s/{rs}/session/{'0' * 24}.json", headers=_as_visitor("sv_x")).status_code for _ in range(4)]
    assert reads[-1] == 429
    elsewhere = client.post(
        f"/s/{rs}/forms/session/add", json={"shareId": made["shareId"]}, environ_base={"REMOTE_ADDR": "198.51.100.4"}
    )
    assert elsewhere.status_code == 200
