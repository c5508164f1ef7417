"""Agentcloud's own client, request by request, against the served app (Flask test client): what it sends is
accepted and answered as it expects. The exact shapes come from rnadigital/agentcloud (webapp/src/router.ts,
controllers/session.ts, lib/struct/sharing.ts); where we answer differently on purpose, the test says so."""

from __future__ import annotations

from typing import Any

import pytest
from bson import ObjectId

from agentcloud_clone.db import get_db
from tests.compat.agentcloud_client import AgentcloudClient, flask_sender
from tests.support import run_queued_turn


@pytest.fixture
def browser(app, factory, login) -> AgentcloudClient:
    """A signed-in member's browser, holding the CSRF token its `.json` pages hand out."""
    me = login(factory.user("member"))
    ui = AgentcloudClient(flask_sender(me.client), me.user.team_id)
    assert ui.sessions().status == 200 and ui.csrf
    return ui


def _doc(app, sid: str) -> dict[str, Any]:
    with app.app_context():
        return get_db().sessions.find_one({"_id": ObjectId(sid)})


def _app(factory, ui: AgentcloudClient, **config: Any) -> str:
    return factory.app_record(ui.team_id, steps=3, stepDelay=0, **config)


# --- starting a session: {id, skipRun?} ----------------------------------------------------------------------


def test_add_with_id_starts_a_session(app, factory, browser):
    app_id = _app(factory, browser)
    reply = browser.add_session(app_id, message="hello")
    assert reply.status == 200, reply.body
    sid = reply.body["_id"]
    assert reply.body["redirect"] == f"/{browser.team_id}/session/{sid}"
    assert _doc(app, sid)["appId"] == ObjectId(app_id) and _doc(app, sid)["activeTurnId"] is not None


def test_add_with_skip_run_creates_without_running(app, factory, browser):
    app_id = _app(factory, browser)
    plain = browser.add_session(app_id, skipRun=True)
    assert plain.status == 200 and _doc(app, plain.body["_id"])["activeTurnId"] is None
    with_message = browser.add_session(app_id, skipRun=True, message="hold this")
    doc = _doc(app, with_message.body["_id"])
    assert doc["activeTurnId"] is None and doc["pendingTurnId"] is not None
    assert browser.messages(with_message.body["_id"]).body["messages"][0]["text"] == "hold this"
    assert browser.add_session(app_id, skipRun=False, message="now").status == 200


def test_add_with_both_spellings_of_the_app(factory, browser):
    app_id = _app(factory, browser)
    assert browser.add_session(app_id, appId=app_id).status == 200
    conflict = browser.add_session(app_id, appId=_app(factory, browser))
    assert conflict.status == 400 and conflict.body["code"] == 400 and "appId" in conflict.body["errors"]
    other_team = browser.add_session(app_id, resourceSlug="f" * 24)
    assert other_team.status == 400


def test_add_as_an_html_form_with_the_csrf_field(factory, login):
    me = login(factory.user("member"))
    app_id = factory.app_record(me.user.team_id)
    form = {"_csrf": me.csrf, "id": app_id, "skipRun": "true", "resourceSlug": me.user.team_id}
    response = me.client.post(f"/{me.user.team_id}/forms/session/add", data=form)
    assert response.status_code == 302 and response.headers["Location"].startswith(f"/{me.user.team_id}/session/")


def test_the_csrf_field_must_be_the_real_token(factory, browser):
    app_id = _app(factory, browser)
    browser.csrf = "not-the-token"
    refused = browser.add_session(app_id)
    assert refused.status == 403 and refused.body["code"] == 403 and "_csrf" in refused.body["message"]


# --- the conversation: {messageText}, messages.json?messageId= -------------------------------------------------


def test_send_message_with_message_text(app, factory, browser):
    sid = browser.add_session(_app(factory, browser)).body["_id"]
    reply = browser.send_message(sid, "what next?")
    assert reply.status == 200 and reply.body["ok"] is True and reply.body["queued"] is True
    assert browser.messages(sid).body["messages"][-1]["text"] == "what next?"


def test_messages_after_a_message_id(app, factory, browser):
    sid = browser.add_session(_app(factory, browser), message="one").body["_id"]
    run_queued_turn(app, sid)
    browser.send_message(sid, "two")
    everything = browser.messages(sid).body["messages"]
    first = everything[0]
    after = browser.messages(sid, first["_id"]).body
    assert [m["seq"] for m in after["messages"]] == [m["seq"] for m in everything[1:]]
    assert after["lastSeq"] == everything[-1]["seq"]
    last = browser.messages(sid, everything[-1]["_id"]).body
    assert last["messages"] == [] and last["lastSeq"] == everything[-1]["seq"]


def test_a_message_id_from_elsewhere_is_404_and_a_malformed_one_400(app, factory, browser):
    app_id = _app(factory, browser)
    sid = browser.add_session(app_id, message="mine").body["_id"]
    other = browser.add_session(app_id, message="other").body["_id"]
    foreign = browser.messages(other).body["messages"][0]["_id"]
    missing = browser.messages(sid, foreign)
    assert missing.status == 404 and set(missing.body) == {"message", "code"}
    assert browser.messages(sid, "0" * 24).status == 404
    malformed = browser.messages(sid, "not-an-id")
    assert malformed.status == 400 and malformed.body["code"] == 400
    both = browser._get(f"/session/{sid}/messages.json?after=0&messageId={foreign}")
    assert both.status == 400


# --- lists: ?before=null --------------------------------------------------------------------------------------


def test_sessions_before_null_is_the_first_page(factory, browser):
    app_id = _app(factory, browser)
    made = [browser.add_session(app_id).body["_id"] for _ in range(12)]
    first = browser.sessions("null")
    assert first.status == 200 and first.body["csrf"]
    assert [s["_id"] for s in first.body["sessions"]] == list(reversed(made))[:10]
    rest = browser.sessions(first.body["nextBefore"])
    assert [s["_id"] for s in rest.body["sessions"]] == list(reversed(made))[10:]
    assert browser.sessions("nul").status == 400


# --- cancel: {_csrf, resourceSlug, sessionId} -------------------------------------------------------------------


def test_cancel_with_the_ids_repeated_in_the_body(app, factory, browser):
    sid = browser.add_session(_app(factory, browser)).body["_id"]
    reply = browser.cancel(sid)
    assert reply.status == 200 and reply.body["ok"] is True
    assert _doc(app, sid)["status"] == "terminated"
    assert browser.cancel(sid).body["alreadyCancelled"] is True


def test_cancel_naming_another_session_in_the_body_is_400(app, factory, browser):
    app_id = _app(factory, browser)
    sid, other = (browser.add_session(app_id).body["_id"] for _ in range(2))
    reply = browser.cancel(sid, sessionId=other)
    assert reply.status == 400 and set(reply.body) == {"message", "code"}
    assert "cancelledAt" not in _doc(app, sid) and "cancelledAt" not in _doc(app, other)


# --- edit and start -------------------------------------------------------------------------------------------


def test_edit_sets_the_variables_and_answers_as_agentcloud_does(app, factory, browser):
    sid = browser.add_session(_app(factory, browser), skipRun=True).body["_id"]
    reply = browser.edit(sid, {"name": "Ada", "topic": "engines"})
    assert reply.status == 200
    assert reply.body["message"] == "Session updated successfully"
    assert reply.body["session"]["_id"] == sid and reply.body["session"]["variables"] == {
        "name": "Ada",
        "topic": "engines",
    }
    assert browser.session(sid).body["session"]["variables"] == {"name": "Ada", "topic": "engines"}
    bad = browser.edit(sid, {"name": ["not", "a", "string"]})
    assert bad.status == 400 and bad.body["code"] == 400 and bad.body["errors"]["variables"]


def test_start_runs_the_session_and_answers_as_agentcloud_does(app, factory, browser):
    app_id = _app(factory, browser, reply="Hi {{name}} there")
    sid = browser.add_session(app_id, skipRun=True).body["_id"]
    browser.edit(sid, {"name": "Ada"})
    reply = browser.start(sid)
    assert reply.status == 200 and reply.body["message"] == "Session started successfully"
    second = browser.start(sid)
    assert second.status == 409 and set(second.body) == {"message", "code"}
    run_queued_turn(app, sid)
    text = "".join(m["text"] for m in browser.messages(sid).body["messages"] if m["type"] == "output")
    assert text == "Hi Ada there"


# --- shared sessions: /s/<resourceSlug>/... ---------------------------------------------------------------------


def test_shared_session_routes_for_a_public_apps_visitor(app, factory, login):
    admin = login(factory.user("admin"))
    made = admin.json(
        "POST",
        f"/{admin.user.team_id}/forms/app/add",
        {
            "name": "public",
            "config": {"steps": 2, "stepDelay": 0, "reply": "for {{who}}"},
            "sharingConfig": {"mode": "public"},
        },
    ).get_json()
    visitor = AgentcloudClient(flask_sender(app.test_client()), admin.user.team_id, shared=True)
    started = visitor.start_from_link(made["shareId"], skipRun=True, message="hi")
    assert started.status == 200 and started.body["redirect"].startswith(f"/s/{admin.user.team_id}/session/")
    sid = started.body["_id"]
    shown = visitor.session(sid)
    assert shown.status == 200 and shown.body["session"]["_id"] == sid and visitor.csrf
    edit = visitor.edit(sid, {"who": "you"})
    assert edit.status == 200 and edit.body["message"] == "Session updated successfully"
    start = visitor.start(sid)
    assert start.status == 200 and start.body["message"] == "Session started successfully"
    run_queued_turn(app, sid)
    everything = visitor.messages(sid).body["messages"]
    later = visitor.messages(sid, everything[0]["_id"]).body["messages"]
    assert [m["seq"] for m in later] == [m["seq"] for m in everything[1:]]
    assert "".join(m["text"] for m in later if m["type"] == "output") == "for you"
