"""Agentcloud's client over real HTTP: gunicorn, a `python -m workers` process, redis-server and the MongoDB-wire
server as separate processes. One walk through what its UI does: start with `skipRun`, set variables, start, read
the transcript by `messageId`, list with `before=null`, send `messageText`, cancel with the ids in the body; and
a public app's visitor doing the same on the shared routes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from devtools.stack import Stack
from tests.compat.agentcloud_client import AgentcloudClient, http_sender
from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(mongo_server, redis_server) -> Iterator[Stack]:
    stack = Stack(mongo_server.url, redis_server.url, OUTPUT_FLUSH_INTERVAL=0.05, CANCEL_POLL_INTERVAL=0.2)
    try:
        yield stack.start(webs=1, workers=1)
    finally:
        stack.stop()


def _signed_in(stack: Stack) -> tuple[AgentcloudClient, requests.Session]:
    browser = requests.Session()
    login = {"email": stack.demo["email"], "password": stack.demo["password"]}
    response = browser.post(f"{stack.url}/forms/account/login", json=login, timeout=10)
    assert response.status_code == 200, response.text
    return AgentcloudClient(http_sender(browser, stack.url), stack.demo["teamId"], response.json()["csrf"]), browser


def _add_app(stack: Stack, browser: requests.Session, csrf: str | None, body: dict) -> dict:
    """Apps are set up the way this app's own pages do it (the CSRF header); the session routes are Agentcloud's."""
    url = f"{stack.url}/{stack.demo['teamId']}/forms/app/add"
    response = browser.post(url, json=body, headers={"X-CSRFToken": csrf or ""}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _output(ui: AgentcloudClient, sid: str) -> str:
    return "".join(m.get("text", "") for m in ui.messages(sid).body["messages"] if m["type"] == "output")


def test_agentcloud_ui_requests_over_http(stack):
    ui, browser = _signed_in(stack)
    team = stack.demo["teamId"]
    config = {"steps": 3, "stepDelay": 0.01, "reply": "Hello {{name}} again"}
    app_id = _add_app(stack, browser, ui.csrf, {"name": "compat", "config": config})["_id"]

    sid = ui.add_session(app_id, skipRun=True, message="first").body["_id"]
    assert ui.session(sid).body["session"]["pendingMessage"] is True
    edited = ui.edit(sid, {"name": "Ada"})
    assert edited.status == 200 and edited.body["message"] == "Session updated successfully"
    started = ui.start(sid)
    assert started.status == 200 and started.body == {**started.body, "message": "Session started successfully"}
    wait_until(lambda: _output(ui, sid) == "Hello Ada again", 60, "the turn's output")

    first = ui.messages(sid).body["messages"][0]
    after = ui.messages(sid, first["_id"]).body["messages"]
    assert after and all(m["seq"] > first["seq"] for m in after)
    assert sid in [s["_id"] for s in ui.sessions("null").body["sessions"]]

    wait_until(lambda: not ui.session(sid).body["session"]["turnInFlight"], 30, "the turn to finish")
    assert ui.send_message(sid, "and now?").status == 200
    cancelled = ui.cancel(sid)
    assert cancelled.status == 200 and cancelled.body["ok"] is True
    wait_until(lambda: ui.session(sid).body["session"]["status"] == "terminated", 30, "the session to end")

    # A public app: a visitor's browser (its own cookie jar) on the shared routes.
    public = _add_app(
        stack, browser, ui.csrf, {"name": "public", "config": config, "sharingConfig": {"mode": "public"}}
    )
    assert public["shareLink"] == f"/s/{team}/{public['shareId']}"
    visitor_browser = requests.Session()
    assert visitor_browser.get(f"{stack.url}{public['shareLink']}", timeout=10).status_code == 200
    visitor = AgentcloudClient(http_sender(visitor_browser, stack.url), team, shared=True)
    begun = visitor.start_from_link(public["shareId"], skipRun=True)
    assert begun.status == 200 and begun.body["visitorToken"].startswith("sv_")
    shared_sid = begun.body["_id"]
    assert visitor.session(shared_sid).status == 200 and visitor.csrf
    assert visitor.edit(shared_sid, {"name": "visitor"}).status == 200
    assert visitor.start(shared_sid).body["message"] == "Session started successfully"
    wait_until(lambda: _output(visitor, shared_sid) == "Hello visitor again", 60, "the shared turn's output")
    # Nobody else's browser reaches it, and the visitor reaches nothing of the team's.
    stranger = AgentcloudClient(http_sender(requests.Session(), stack.url), team, shared=True)
    assert stranger.session(shared_sid).status == 401
    team_route = visitor_browser.get(f"{stack.url}/{team}/session/{shared_sid}.json", timeout=10)
    assert team_route.status_code == 401 and set(team_route.json()) == {"message", "code"}
    assert visitor.session(sid).status == 404


def test_agentcloud_shaped_mistakes_get_the_same_answers_through_gunicorn(stack):
    """The refusals the in-process suite pins, here through the served app: each a `{message, code}` JSON answer."""
    ui, browser = _signed_in(stack)
    config = {"steps": 2, "stepDelay": 0}
    app_id = _add_app(stack, browser, ui.csrf, {"name": "compat", "config": config})["_id"]
    other_app = _add_app(stack, browser, ui.csrf, {"name": "other", "config": config})["_id"]
    sid = ui.add_session(app_id, skipRun=True, message="mine").body["_id"]
    other = ui.add_session(app_id, skipRun=True, message="other").body["_id"]
    foreign = ui.messages(other).body["messages"][0]["_id"]

    refusals = {
        "both app ids, different": (ui.add_session(app_id, appId=other_app), 400),
        "another team's slug in the body": (ui.add_session(app_id, resourceSlug="f" * 24), 400),
        "another session's messageId": (ui.messages(sid, foreign), 404),
        "a malformed messageId": (ui.messages(sid, "not-an-id"), 400),
        "before=nul": (ui.sessions("nul"), 400),
        "a cancel naming another session": (ui.cancel(sid, sessionId=other), 400),
        "a variable that is not text": (ui.edit(sid, {"name": 7}), 400),
    }
    for what, (reply, status) in refusals.items():
        assert reply.status == status and reply.body["code"] == status and reply.body["message"], (what, reply)
    assert [ui.session(s).body["session"].get("cancelledAt") for s in (sid, other)] == [None, None]
    ui.csrf = "not-the-token"
    forged = ui.add_session(app_id)
    assert forged.status == 403 and "_csrf" in forged.body["message"]
