"""Sessions created without a turn (`skipRun`, or an app that needs variables first), their variables (the edit
route) and `start`, which runs the turn; the runner sees the variables."""

from __future__ import annotations

import pytest
from bson import ObjectId
from redis.exceptions import RedisError

from agentcloud_clone.db import get_db
from agentcloud_clone.services import sessions as sessions_service
from tests.support import run_queued_turn


def _doc(app, sid: str) -> dict:
    with app.app_context():
        return get_db().sessions.find_one({"_id": ObjectId(sid)})


def _add(me, body: dict) -> str:
    response = me.json("POST", f"/{me.user.team_id}/forms/session/add", body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["_id"]


def _messages(me, sid: str) -> list[dict]:
    return me.client.get(f"/{me.user.team_id}/session/{sid}/messages.json").get_json()["messages"]


def test_skip_run_with_a_message_records_it_and_start_answers_it(app, factory, login):
    me = login(factory.user("member"))
    app_id = factory.app_record(me.user.team_id, steps=2, stepDelay=0, reply="answered")
    sid = _add(me, {"appId": app_id, "message": "first question", "skipRun": True})
    doc = _doc(app, sid)
    assert doc["activeTurnId"] is None and doc["pendingTurnId"] is not None
    shown = me.client.get(f"/{me.user.team_id}/session/{sid}.json").get_json()["session"]
    assert shown["pendingMessage"] is True and shown["queued"] is False
    assert [m["text"] for m in _messages(me, sid)] == ["first question"]

    started = me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/start")
    assert started.status_code == 200, started.get_json()
    assert started.get_json()["message"] == "Session started successfully" and started.get_json()["queued"] is True
    assert _doc(app, sid)["activeTurnId"] == doc["pendingTurnId"]  # the turn that answers the recorded message
    assert run_queued_turn(app, sid)["outcome"] == "completed"
    events = _messages(me, sid)
    assert events[0]["type"] == "message" and events[-1]["type"] == "turn_end"
    assert "".join(e.get("text", "") for e in events if e["type"] == "output") == "answered answered"
    assert _doc(app, sid)["pendingTurnId"] is None


def test_start_without_a_message_runs_on_the_variables(app, factory, login):
    me = login(factory.user("member"))
    app_id = factory.app_record(me.user.team_id, steps=1, stepDelay=0, reply="Hello {{who}}, {{unknown}}")
    sid = _add(me, {"id": app_id, "skipRun": True})
    edit = me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/edit", {"variables": {"who": "Ada"}})
    assert edit.status_code == 200 and edit.get_json()["message"] == "Session updated successfully"
    assert edit.get_json()["session"]["variables"] == {"who": "Ada"}
    assert me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/start").status_code == 200
    run_queued_turn(app, sid)
    outputs = "".join(e["text"] for e in _messages(me, sid) if e["type"] == "output")
    assert outputs == "Hello"  # one step: the first word of the filled-in reply
    # A longer run shows the whole filled-in reply.
    long_app = factory.app_record(me.user.team_id, steps=3, stepDelay=0, reply="Hello {{who}}, {{unknown}}")
    sid = _add(me, {"id": long_app, "skipRun": True, "variables": {"who": "Ada"}})
    me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/start")
    run_queued_turn(app, sid)
    assert "".join(e["text"] for e in _messages(me, sid) if e["type"] == "output") == "Hello Ada, {{unknown}}"


def test_no_second_turn_while_one_is_in_flight(factory, login):
    me = login(factory.user("member"))
    sid = _add(me, {"appId": factory.app_record(me.user.team_id), "message": "go"})
    busy = me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/start")
    assert busy.status_code == 409 and "in flight" in busy.get_json()["message"]
    idle = _add(me, {"appId": factory.app_record(me.user.team_id), "skipRun": True})
    assert me.json("POST", f"/{me.user.team_id}/forms/session/{idle}/start").status_code == 200
    again = me.json("POST", f"/{me.user.team_id}/forms/session/{idle}/start")
    assert again.status_code == 409 and again.get_json()["code"] == 409


def test_an_app_that_needs_variables_waits_for_them(app, factory, login):
    me = login(factory.user("member"))
    app_id = factory.app_record(me.user.team_id, required_variables=["topic", "tone"], steps=1, stepDelay=0)
    sid = _add(me, {"appId": app_id, "message": "write it"})  # no skipRun: still no turn without the variables
    shown = me.client.get(f"/{me.user.team_id}/session/{sid}.json").get_json()["session"]
    assert shown["needsVariables"] == ["topic", "tone"] and shown["pendingMessage"] and not shown["queued"]
    path = f"/{me.user.team_id}/forms/session/{sid}"
    refused = me.json("POST", f"{path}/start")
    assert refused.status_code == 409 and "topic, tone" in refused.get_json()["message"]
    message = me.json("POST", f"/{me.user.team_id}/session/{sid}/send-message", {"message": "now?"})
    assert message.status_code == 409
    assert me.json("POST", f"{path}/edit", {"variables": {"topic": "owls"}}).status_code == 200
    assert me.json("POST", f"{path}/start").status_code == 409
    edited = me.json("POST", f"{path}/edit", {"variables": {"topic": "owls", "tone": "dry"}}).get_json()
    assert edited["session"]["needsVariables"] == []
    assert me.json("POST", f"{path}/start").status_code == 200
    assert run_queued_turn(app, sid)["outcome"] == "completed"


def test_variables_are_validated_and_bounded(factory, login):
    me = login(factory.user("member"))
    sid = _add(me, {"appId": factory.app_record(me.user.team_id)})
    path = f"/{me.user.team_id}/forms/session/{sid}/edit"
    bad = [
        {"variables": {"$where": "x"}},
        {"variables": {"a.b": "x"}},
        {"variables": {"has space": "x"}},
        {"variables": {"n": 5}},
        {"variables": {"n": {"nested": "x"}}},
        {"variables": {"n": "x" * 10_001}},
        {"variables": {f"v{i}": "x" for i in range(51)}},
        {"variables": {f"v{i}": "x" * 9_000 for i in range(12)}},
        {"variables": ["not", "an", "object"]},
        {"variables": "not json"},
        {"variables": {"n": "x"}, "extra": 1},
        {},
    ]
    for body in bad:
        response = me.json("POST", path, body)
        assert response.status_code == 400, body
        assert set(response.get_json()) <= {"message", "code", "errors"} and response.get_json()["code"] == 400
    ok = {f"v{i}": "x" * 2_000 for i in range(50)}
    assert me.json("POST", path, {"variables": ok}).get_json()["session"]["variables"] == ok
    # A browser form sends the object as JSON text.
    form = me.form(path, {"variables": '{"from": "a form"}'})
    assert form.status_code == 302
    assert me.client.get(f"/{me.user.team_id}/session/{sid}.json").get_json()["session"]["variables"] == {
        "from": "a form"
    }


def test_variables_are_editable_only_while_the_session_is_live(factory, login):
    me = login(factory.user("member"))
    sid = _add(me, {"appId": factory.app_record(me.user.team_id)})
    me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel")
    response = me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/edit", {"variables": {"a": "b"}})
    assert response.status_code == 409 and "ended" in response.get_json()["message"]
    started = me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/start")
    assert started.status_code == 409


def test_echoed_ids_in_edit_and_start_bodies_must_match_the_path(factory, login):
    me = login(factory.user("member"))
    sid = _add(me, {"appId": factory.app_record(me.user.team_id), "skipRun": True})
    path = f"/{me.user.team_id}/forms/session/{sid}"
    same = {"sessionId": sid, "resourceSlug": me.user.team_id, "_csrf": me.csrf}
    assert me.json("POST", f"{path}/edit", {**same, "variables": {"a": "b"}}).status_code == 200
    other = {"sessionId": "b" * 24, "variables": {"a": "b"}}
    assert me.json("POST", f"{path}/edit", other).status_code == 400
    assert me.json("POST", f"{path}/start", {"resourceSlug": "c" * 24}).status_code == 400
    assert me.json("POST", f"{path}/start", same).status_code == 200


def test_a_start_that_cannot_be_queued_changes_nothing(app, factory, login, monkeypatch):
    me = login(factory.user("member"))
    sid = _add(me, {"appId": factory.app_record(me.user.team_id), "message": "later", "skipRun": True})
    before = _doc(app, sid)

    def down(*args, **kwargs):
        raise RedisError("down")

    monkeypatch.setattr(sessions_service.queueing, "enqueue_turn", down)
    response = me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/start")
    assert response.status_code == 503 and response.get_json()["code"] == 503
    after = _doc(app, sid)
    assert after["activeTurnId"] is None and after["pendingTurnId"] == before["pendingTurnId"]
    assert after["eventSeq"] == before["eventSeq"]
    monkeypatch.undo()
    assert me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/start").status_code == 200


@pytest.mark.parametrize("skip", [True, False])
def test_a_message_sent_while_one_waits_for_start_supersedes_it(app, factory, login, skip):
    me = login(factory.user("member"))
    required = None if skip else ["x"]
    app_id = factory.app_record(me.user.team_id, required_variables=required, steps=1, stepDelay=0)
    sid = _add(me, {"appId": app_id, "message": "first", "skipRun": skip})
    if not skip:
        me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/edit", {"variables": {"x": "1"}})
    sent = me.json("POST", f"/{me.user.team_id}/session/{sid}/send-message", {"messageText": "second"})
    assert sent.status_code == 200 and sent.get_json()["queued"] is True
    assert _doc(app, sid)["pendingTurnId"] is None
    run_queued_turn(app, sid)
    assert [e.get("text") for e in _messages(me, sid) if e["type"] == "message"] == ["first", "second"]
