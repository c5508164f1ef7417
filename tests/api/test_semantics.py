"""Why sessions end, cancel reasons, limits and busy messages, through both API families."""

from __future__ import annotations

from tests.support import run_queued_turn


def _start(me, app_id: str, message: str | None = "hello") -> str:
    response = me.json("POST", f"/{me.user.team_id}/forms/session/add", {"appId": app_id, "message": message})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["_id"]


def test_cancel_reason_is_recorded_in_both_families(factory, login, api_key_client):
    user = factory.user("member", api_key=True)
    me = login(user)
    app_id = factory.app_record(user.team_id)
    sid = _start(me, app_id)
    body = me.json("POST", f"/{user.team_id}/forms/session/{sid}/cancel", {"reason": "wrong prompt"}).get_json()
    assert body["endReason"] == "cancelled"
    session = me.client.get(f"/{user.team_id}/session/{sid}.json").get_json()["session"]
    assert session["cancellation"]["reason"] == "wrong prompt" and session["cancellation"]["source"] == "ui"
    assert session["cancellation"]["by"] == {"kind": "account", "accountId": user.account_id}
    events = me.client.get(f"/{user.team_id}/session/{sid}/messages.json").get_json()["messages"]
    assert events[1]["type"] == "cancel" and events[1]["reason"] == "wrong prompt"
    assert events[-1]["message"] == "Cancelled: wrong prompt"
    call = api_key_client(user)
    other = _start(me, app_id)
    assert call("POST", "/api/managed-agents/cancel", {"sessionId": other, "reason": "done"}).get_json() == {"ok": True}
    managed = call("GET", f"/api/managed-agents/sessions/{other}").get_json()["session"]
    assert managed["cancellation"]["source"] == "managed-api" and managed["cancellation"]["reason"] == "done"
    assert managed["cancellation"]["by"]["kind"] == "apiKey" and managed["endReason"] == "cancelled"


def test_cancel_with_an_api_key_on_the_agentcloud_route_says_api(factory, api_key_client):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    sid = factory.session(user, factory.app_record(user.team_id), "hi")["_id"]
    call("POST", f"/{user.team_id}/forms/session/{sid}/cancel")
    session = call("GET", f"/{user.team_id}/session/{sid}.json").get_json()["session"]
    assert session["cancellation"]["source"] == "api" and session["cancellation"]["by"]["kind"] == "apiKey"


def test_cancel_reason_is_bounded_and_a_string(factory, login):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id))
    path = f"/{me.user.team_id}/forms/session/{sid}/cancel"
    assert me.json("POST", path, {"reason": "x" * 501}).status_code == 400
    assert me.json("POST", path, {"reason": {"$ne": 1}}).status_code == 400
    assert me.json("POST", path, {"sessionId": "b" * 24}).status_code == 400
    assert me.json("POST", path, {"sessionId": sid, "resourceSlug": me.user.team_id, "_csrf": "x"}).status_code == 200


def test_busy_messages_in_both_families(factory, login, api_key_client, app):
    user = factory.user("member", api_key=True)
    me = login(user)
    sid = _start(me, factory.app_record(user.team_id, steps=1, stepDelay=0))
    path = f"/{user.team_id}/session/{sid}/send-message"
    assert me.json("POST", path, {"message": "no"}).status_code == 409
    queued = me.json("POST", path, {"messageText": "later", "onBusy": "enqueue"}).get_json()
    assert queued["ok"] is True and queued["queuedMessages"] == 1
    assert me.json("POST", path, {"message": "x", "onBusy": "whenever"}).status_code == 400
    assert me.json("POST", path, {"message": "a", "messageText": "b"}).status_code == 400
    call = api_key_client(user)
    managed = call("POST", f"/api/managed-agents/sessions/{sid}/messages", {"message": "also", "onBusy": "enqueue"})
    assert managed.status_code == 202 and managed.get_json()["session"]["queuedMessages"] == 2
    for _ in range(3):
        run_queued_turn(app, sid)
    texts = [
        e["text"]
        for e in me.client.get(f"/{user.team_id}/session/{sid}/messages.json").get_json()["messages"]
        if e["type"] == "message"
    ]
    assert texts == ["hello", "later", "also"]


def test_app_and_team_limits_are_validated_and_shown(factory, login):
    admin = login(factory.user("admin"))
    team = admin.user.team_id
    bad = admin.json("POST", f"/{team}/forms/app/add", {"name": "a", "limits": {"queueTtl": -1}})
    assert bad.status_code == 400 and "queueTtl" in str(bad.get_json()["errors"])
    assert admin.json("POST", f"/{team}/forms/app/add", {"name": "a", "limits": {"bogus": 1}}).status_code == 400
    good = admin.json("POST", f"/{team}/forms/app/add", {"name": "a", "limits": {"tokenBudget": 1000}}).get_json()
    assert admin.client.get(f"/{team}/app/{good['_id']}.json").get_json()["app"]["limits"] == {"tokenBudget": 1000}
    assert admin.json("POST", f"/{team}/forms/team/edit", {"limits": {"idleTimeout": 3600}}).status_code == 200
    assert admin.client.get(f"/{team}/team.json").get_json()["team"]["limits"] == {"idleTimeout": 3600}
    sid = _start(admin, good["_id"])
    session = admin.client.get(f"/{team}/session/{sid}.json").get_json()["session"]
    assert session["limits"] == {"tokenBudget": 1000, "idleTimeout": 3600} and session["queued"] is True


def test_sessions_without_limits_are_never_ended_by_the_limit_sweep(factory, app):
    """MongoDB's `$lt` on dates never matches null; the sweep must not rely on every server bracketing types."""
    from agentcloud_clone.services.sessions import claim_turn, enforce_deadlines, requeue_lost_jobs

    user = factory.user("member")
    idle = factory.session(user, factory.app_record(user.team_id))
    running = factory.session(user, factory.app_record(user.team_id), "go")
    with app.app_context():
        assert claim_turn(user.team_oid, running["_id"], running["activeTurnId"], "w:1")
        assert enforce_deadlines() == []
        assert requeue_lost_jobs(3600) == []
    assert idle["deadline"] is None


def test_a_turn_whose_worker_died_as_it_took_the_job_is_queued_again(factory, app):
    """A worker moves a job off the queue (into RQ's intermediate queue) before it marks it started; killed in
    between, it leaves the job QUEUED in no queue. The reaper's requeue must not take that for waiting."""
    from rq import Queue

    from agentcloud_clone.queueing import get_redis, turn_job_id
    from agentcloud_clone.services.sessions import requeue_lost_jobs

    user = factory.user("member")
    session = factory.session(user, factory.app_record(user.team_id), "go")
    job_id = turn_job_id(str(session["activeTurnId"]))
    with app.app_context():
        queue = Queue(app.config["TURN_QUEUE"], connection=get_redis())
        assert queue.get_job_ids() == [job_id]
        get_redis().lmove(queue.key, queue.intermediate_queue.key)  # what a worker's dequeue does, then it dies
        assert queue.get_job_ids() == [] and queue.fetch_job(job_id).get_status() == "queued"
        assert requeue_lost_jobs(0) == [str(session["_id"])]
        assert queue.get_job_ids() == [job_id]
        assert queue.intermediate_queue.get_job_ids() == []  # RQ's clean-up will not fail the job queued again
        assert requeue_lost_jobs(0) == []  # now it waits in the queue


def test_a_reaper_step_that_fails_does_not_keep_the_others_from_running(factory, app, monkeypatch):
    """A slow or failing clean-up (here the repair and the orphan sweep time out) must not keep lost turns from
    being queued again: each step of the pass is on its own, and the pass says which failed."""
    from pymongo.errors import NetworkTimeout
    from rq import Queue

    from agentcloud_clone.queueing import get_redis, turn_job_id
    from agentcloud_clone.services import sessions as sessions_service

    def too_slow(*_: object) -> int:
        raise NetworkTimeout("timed out (configured timeouts: timeoutMS: 1000.0ms)")

    monkeypatch.setattr(sessions_service, "repair_transcripts", too_slow)
    monkeypatch.setattr(sessions_service, "remove_orphan_events", too_slow)
    user = factory.user("member")
    session = factory.session(user, factory.app_record(user.team_id), "go")
    with app.app_context():
        queue = Queue(app.config["TURN_QUEUE"], connection=get_redis())
        queue.empty()  # the job is lost (a Redis restart, say)
        result = sessions_service.sweep(3600, 0)
        assert result["requeued"] == [str(session["_id"])]
        assert queue.get_job_ids() == [turn_job_id(str(session["activeTurnId"]))]
        assert result["failed"] == ["repaired", "orphans"] and result["repaired"] == result["orphans"] == 0
