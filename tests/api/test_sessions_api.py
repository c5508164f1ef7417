"""Agentcloud's session API: every route, for browsers (form posts) and programs (JSON)."""

from __future__ import annotations

import threading

from bson import ObjectId
from flask import Flask

from agentcloud_clone.db import get_db
from tests.support import Factory, run_queued_turn, wait_until

MISSING = "a" * 24


def _start(me, app_id: str, message: str | None = "hello") -> str:
    response = me.json("POST", f"/{me.user.team_id}/forms/session/add", {"appId": app_id, "message": message})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["_id"]


def _session(app: Flask, sid: str) -> dict:
    with app.app_context():
        return get_db().sessions.find_one({"_id": ObjectId(sid)})


def test_add_session_json_returns_id_and_redirect(factory, login, app):
    me = login(factory.user("member"))
    app_id = factory.app_record(me.user.team_id)
    response = me.json("POST", f"/{me.user.team_id}/forms/session/add", {"appId": app_id, "message": "hi"})
    body = response.get_json()
    assert response.status_code == 200
    assert body["redirect"] == f"/{me.user.team_id}/session/{body['_id']}"
    doc = _session(app, body["_id"])
    assert doc["status"] == "started" and doc["activeTurnId"] is not None


def test_add_session_queues_first_turn_on_redis(factory, login, app):
    from rq import Queue

    from agentcloud_clone.queueing import get_redis

    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id))
    with app.app_context():
        queue = Queue(app.config["TURN_QUEUE"], connection=get_redis())
        jobs = queue.get_jobs()
    assert [job.args[1] for job in jobs] == [sid]


def test_add_session_records_first_message(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), "what is up")
    messages = me.client.get(f"/{me.user.team_id}/session/{sid}/messages.json").get_json()["messages"]
    assert [(m["type"], m["role"], m["text"]) for m in messages] == [("message", "user", "what is up")]


def test_add_session_form_post_redirects(factory, login):
    me = login(factory.user("member"))
    app_id = factory.app_record(me.user.team_id)
    response = me.form(f"/{me.user.team_id}/forms/session/add", {"appId": app_id, "message": "hi"})
    assert response.status_code == 302
    assert response.headers["Location"].startswith(f"/{me.user.team_id}/session/")


def test_add_session_without_message_queues_nothing(factory, login, app):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), None)
    assert _session(app, sid)["activeTurnId"] is None


def test_add_session_rejects_bad_input(factory, login):
    me = login(factory.user("member"))
    path = f"/{me.user.team_id}/forms/session/add"
    for body in ({"appId": {"$ne": None}}, {"appId": 12}, {"appId": "zz"}, {}, {"appId": MISSING, "extra": 1}):
        response = me.json("POST", path, body)
        assert response.status_code == 400, body
        assert response.get_json()["code"] == 400 and response.get_json()["message"]
    assert me.json("POST", path, {"appId": MISSING}).status_code == 404
    assert me.json("POST", path, ["not", "an", "object"]).status_code == 400


def test_add_session_with_app_of_another_team_is_404(factory, login):
    me = login(factory.user("member"))
    other_app = factory.app_record(factory.user("owner").team_id)
    response = me.json("POST", f"/{me.user.team_id}/forms/session/add", {"appId": other_app})
    assert response.status_code == 404


def test_session_json_and_cross_team_access(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id))
    body = me.client.get(f"/{me.user.team_id}/session/{sid}.json").get_json()
    assert body["session"]["_id"] == sid and body["session"]["status"] == "started" and body["csrf"]
    stranger = login(factory.user("owner"))
    # Another team's session through the stranger's own team: 404, never the data.
    response = stranger.client.get(f"/{stranger.user.team_id}/session/{sid}.json")
    assert response.status_code == 404 and sid not in response.get_data(as_text=True)
    # Through the owning team's slug: 403.
    assert stranger.client.get(f"/{me.user.team_id}/session/{sid}.json").status_code == 403


def test_sessions_list_paginates_newest_first(factory, login):
    me = login(factory.user("member"))
    app_id = factory.app_record(me.user.team_id)
    created = [_start(me, app_id, None) for _ in range(7)]
    seen, before, pages = [], None, 0
    while True:
        query = f"?limit=3&before={before}" if before else "?limit=3"
        body = me.client.get(f"/{me.user.team_id}/sessions.json{query}").get_json()
        seen += [s["_id"] for s in body["sessions"]]
        pages += 1
        before = body["nextBefore"]
        if not before:
            break
    assert seen == list(reversed(created)) and pages == 3


def test_sessions_list_filters_and_validates(factory, login):
    me = login(factory.user("member"))
    app_id = factory.app_record(me.user.team_id)
    sid = _start(me, app_id, None)
    me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel")
    _start(me, app_id, None)
    ended = me.client.get(f"/{me.user.team_id}/sessions.json?status=terminated").get_json()["sessions"]
    assert [s["_id"] for s in ended] == [sid]
    for query in ("?limit=0", "?limit=101", "?limit=x", "?before=nope", "?status=bogus"):
        assert me.client.get(f"/{me.user.team_id}/sessions.json{query}").status_code == 400, query


def test_sessions_list_never_shows_other_teams(factory, login):
    me = login(factory.user("member"))
    other = login(factory.user("member"))
    _start(other, factory.app_record(other.user.team_id), None)
    assert me.client.get(f"/{me.user.team_id}/sessions.json").get_json()["sessions"] == []


def test_messages_after_returns_only_new_events(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), None)
    me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel")
    first = me.client.get(f"/{me.user.team_id}/session/{sid}/messages.json").get_json()
    assert [m["seq"] for m in first["messages"]] == [1, 2]
    later = me.client.get(f"/{me.user.team_id}/session/{sid}/messages.json?after=1").get_json()
    assert [m["seq"] for m in later["messages"]] == [2] and later["lastSeq"] == 2
    assert me.client.get(f"/{me.user.team_id}/session/{sid}/messages.json?after=-1").status_code == 400


def test_send_message_queues_next_turn_and_409s_while_busy(factory, login, app):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), None)
    path = f"/{me.user.team_id}/session/{sid}/send-message"
    assert me.json("POST", path, {"message": "go"}).status_code == 200
    busy = me.json("POST", path, {"message": "again"})
    assert busy.status_code == 409 and "in flight" in busy.get_json()["message"]
    assert me.json("POST", path, {"message": ""}).status_code == 400
    assert me.json("POST", path, {"message": 5}).status_code == 400


def test_send_message_to_ended_session_is_409(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), None)
    me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel")
    response = me.json("POST", f"/{me.user.team_id}/session/{sid}/send-message", {"message": "hi"})
    assert response.status_code == 409 and "ended" in response.get_json()["message"]


def test_cancel_idle_session_ends_it_at_once(factory, login, app):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), None)
    body = me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel").get_json()
    assert body["ok"] is True and body["_id"] == sid and "alreadyCancelled" not in body
    assert body["redirect"] == f"/{me.user.team_id}/sessions"
    doc = _session(app, sid)
    assert doc["status"] == "terminated" and doc["cancelledAt"] and doc["endedAt"]
    assert str(doc["cancelledBy"]) == me.user.account_id


def test_cancel_of_a_queued_turn_ends_the_session_at_once_and_drops_the_job(factory, login, app):
    from rq import Queue

    from agentcloud_clone.queueing import get_redis

    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id))
    body = me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel").get_json()
    assert body["status"] == "terminated" and body["endReason"] == "cancelled"
    session = me.client.get(f"/{me.user.team_id}/session/{sid}.json").get_json()["session"]
    assert session["cancelling"] is False and session["turnInFlight"] is False
    assert session["cancellation"]["source"] == "ui" and session["cancellation"]["completedAt"]
    with app.app_context():
        # Dropped in the background (a cancel never waits on Redis).
        wait_until(lambda: Queue(app.config["TURN_QUEUE"], connection=get_redis()).get_jobs() == [], 30, "the drop")
    events = me.client.get(f"/{me.user.team_id}/session/{sid}/messages.json").get_json()["messages"]
    assert [e["type"] for e in events] == ["message", "cancel", "status"]
    assert events[1]["by"] == me.user.account_id and events[2]["endReason"] == "cancelled"
    assert me.json("DELETE", f"/{me.user.team_id}/forms/session/{sid}").status_code == 200


def test_cancel_twice_reports_already_cancelled(factory, login, app):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id))
    path = f"/{me.user.team_id}/forms/session/{sid}/cancel"
    first = me.json("POST", path).get_json()
    stamp = _session(app, sid)["cancelledAt"]
    second = me.json("POST", path).get_json()
    assert second["ok"] is True and second["alreadyCancelled"] is True
    assert first["cancelledAt"] == second["cancelledAt"]
    assert _session(app, sid)["cancelledAt"] == stamp


def test_cancel_form_post_redirects_to_sessions(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id))
    response = me.form(f"/{me.user.team_id}/forms/session/{sid}/cancel")
    assert response.status_code == 302 and response.headers["Location"] == f"/{me.user.team_id}/sessions"


def test_cancel_of_normally_ended_session_reports_already_ended(factory, login, app):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id, steps=1, stepDelay=0, endAfterTurns=1))
    assert run_queued_turn(app, sid)["outcome"] == "completed"
    assert _session(app, sid)["endReason"] == "completed"
    body = me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel").get_json()
    assert body["ok"] is True and body["alreadyEnded"] is True
    assert "cancelledAt" not in _session(app, sid)


def test_cancel_by_50_concurrent_threads_stamps_once(make_app):
    from agentcloud_clone.services.sessions import cancel_session
    from agentcloud_clone.vocabulary import CancelSource

    # 150 commands at once: on a loaded machine some wait longer than the product's 1 s MONGO_TIMEOUT, and this
    # test is about exactly one stamp, not about how fast the store answers them.
    app = make_app(MONGO_TIMEOUT=60)
    factory = Factory(app)
    user = factory.user("member")
    session = factory.session(user, factory.app_record(user.team_id), "go")
    actor = factory.actor(user)
    outcomes, barrier = [], threading.Barrier(50)

    def cancel() -> None:
        with app.app_context():
            barrier.wait()
            outcomes.append(cancel_session(user.team_oid, session["_id"], actor, CancelSource.API))

    threads = [threading.Thread(target=cancel) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 50
    assert sum(not o.already_cancelled for o in outcomes) == 1
    assert len({o.session["cancelledAt"] for o in outcomes}) == 1
    with app.app_context():
        assert get_db().session_events.count_documents({"sessionId": session["_id"], "type": "cancel"}) == 1


def test_cancel_status_codes(factory, login, app):
    me = login(factory.user("member"))
    team = me.user.team_id
    assert me.json("POST", f"/{team}/forms/session/not-an-id/cancel").status_code == 400
    assert me.json("POST", f"/{team}/forms/session/{'A' * 24}/cancel").status_code == 400
    assert me.json("POST", f"/{team}/forms/session/{MISSING}/cancel").status_code == 404
    assert me.json("POST", f"/{'b' * 24}/forms/session/{MISSING}/cancel").status_code == 403
    assert me.json("POST", f"/nope/forms/session/{MISSING}/cancel").status_code == 400
    assert me.json("GET", f"/{team}/forms/session/{MISSING}/cancel").status_code == 405
    anonymous = app.test_client()
    response = anonymous.post(f"/{team}/forms/session/{MISSING}/cancel", json={})
    assert response.status_code == 401 and response.get_json() == {"message": "Sign in required.", "code": 401}
    browser = anonymous.post(f"/{team}/forms/session/{MISSING}/cancel", data={})
    assert browser.status_code == 302 and browser.headers["Location"].startswith("/login")


def test_viewer_cannot_cancel_create_or_delete(factory, login):
    owner = login(factory.user("owner"))
    team = {"_id": ObjectId(owner.user.team_id)}
    viewer = login(factory.user("viewer", team))
    app_id = factory.app_record(owner.user.team_id)
    sid = _start(owner, app_id, None)
    assert viewer.client.get(f"/{owner.user.team_id}/session/{sid}.json").status_code == 200
    assert viewer.json("POST", f"/{owner.user.team_id}/forms/session/{sid}/cancel").status_code == 403
    assert viewer.json("POST", f"/{owner.user.team_id}/forms/session/add", {"appId": app_id}).status_code == 403
    assert viewer.json("DELETE", f"/{owner.user.team_id}/forms/session/{sid}").status_code == 403


def test_delete_refuses_active_session(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id))
    response = me.json("DELETE", f"/{me.user.team_id}/forms/session/{sid}")
    assert response.status_code == 409 and "cancel" in response.get_json()["message"].lower()


def test_delete_removes_session_and_events_then_404(factory, login, app):
    from agentcloud_clone.services.sessions import reap_lost_turns

    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id, steps=1, stepDelay=0), "hello")
    run_queued_turn(app, sid)
    me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel")
    first = me.json("DELETE", f"/{me.user.team_id}/forms/session/{sid}")
    assert first.status_code == 200 and first.get_json()["ok"] is True
    with app.app_context():
        assert get_db().session_events.count_documents({"sessionId": ObjectId(sid)}) == 0
    assert me.client.get(f"/{me.user.team_id}/session/{sid}.json").status_code == 404
    assert me.json("DELETE", f"/{me.user.team_id}/forms/session/{sid}").status_code == 404
    with app.app_context():
        reap_lost_turns(30, tombstone_grace=0)
        assert get_db().sessions.count_documents({"_id": ObjectId(sid)}) == 0


def test_delete_form_twin_redirects(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), None)
    me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel")
    response = me.form(f"/{me.user.team_id}/forms/session/{sid}/delete")
    assert response.status_code == 302 and response.headers["Location"] == f"/{me.user.team_id}/sessions"
    assert me.client.get(f"/{me.user.team_id}/session/{sid}.json").status_code == 404


def test_delete_of_other_teams_session_is_404_and_keeps_it(factory, login, app):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), None)
    me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel")
    stranger = login(factory.user("owner"))
    assert stranger.json("DELETE", f"/{stranger.user.team_id}/forms/session/{sid}").status_code == 404
    assert _session(app, sid) is not None


def test_oversized_body_is_413(factory, login):
    me = login(factory.user("member"))
    response = me.json("POST", f"/{me.user.team_id}/forms/session/add", {"appId": MISSING, "message": "x" * 2_000_000})
    assert response.status_code == 413 and response.get_json()["code"] == 413


def test_unexpected_error_is_generic_500(factory, login, app, monkeypatch):
    from agentcloud_clone.repositories import sessions as repo

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(repo, "find_session", boom)
    me = login(factory.user("member"))
    response = me.client.get(f"/{me.user.team_id}/session/{MISSING}.json")
    assert response.status_code == 500
    assert response.get_json() == {"message": "Internal server error.", "code": 500}


def test_browser_gets_html_error_page(factory, login):
    me = login(factory.user("member"))
    response = me.client.get(f"/{me.user.team_id}/nothing-here", headers={"Accept": "text/html"})
    assert response.status_code == 404 and response.mimetype == "text/html"


def test_cancel_form_may_return_to_a_local_page_only(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id))
    back = f"/{me.user.team_id}/session/{sid}"
    response = me.form(f"/{me.user.team_id}/forms/session/{sid}/cancel", {"next": back})
    assert response.status_code == 302 and response.headers["Location"] == back
    other = _start(me, factory.app_record(me.user.team_id))
    for evil in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        response = me.form(f"/{me.user.team_id}/forms/session/{other}/cancel", {"next": evil})
        assert response.headers["Location"] == f"/{me.user.team_id}/sessions"


def test_messages_report_final_only_when_the_reader_has_the_closing_event(factory, login, app):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), "hello")
    path = f"/{me.user.team_id}/session/{sid}/messages.json"
    assert me.client.get(path).get_json()["final"] is False
    me.json("POST", f"/{me.user.team_id}/forms/session/{sid}/cancel")
    partial = me.client.get(f"{path}?limit=2").get_json()
    assert partial["status"] == "terminated" and partial["lastSeq"] == 2 and partial["final"] is False
    whole = me.client.get(path).get_json()
    assert whole["final"] is True and whole["messages"][-1]["type"] == "status"
    assert me.client.get(f"{path}?after=3").get_json()["final"] is True


def test_messages_after_beyond_64_bits_is_400(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), None)
    response = me.client.get(f"/{me.user.team_id}/session/{sid}/messages.json?after={2**63}")
    assert response.status_code == 400 and response.get_json()["errors"]["after"]
