"""Bulk cancel by filter or ids, in both API families: dry run, idempotency, progress, permissions."""

from __future__ import annotations

from rq import Queue

from agentcloud_clone.queueing import get_redis


def _work_off_the_queue(app) -> None:
    """Run queued jobs in this process, as a worker would (the bulk job among them)."""
    with app.app_context():
        queue = Queue(app.config["TURN_QUEUE"], connection=get_redis())
        bulk_jobs = [job for job in queue.get_jobs() if job.id.startswith("bulk-")]
        for job in bulk_jobs:
            job.perform()


def _sessions(factory, user, count: int, message: str | None = "hi", app_id: str | None = None) -> list[str]:
    app_id = app_id or factory.app_record(user.team_id)
    return [str(factory.session(user, app_id, message)["_id"]) for _ in range(count)]


def test_bulk_cancel_by_filter_counts_then_cancels_only_matching_live_sessions(factory, login, app):
    admin = login(factory.user("admin"))
    team = admin.user.team_id
    target_app, other_app = factory.app_record(team), factory.app_record(team)
    targets = _sessions(factory, admin.user, 5, app_id=target_app)
    spared = _sessions(factory, admin.user, 2, app_id=other_app)
    path = f"/{team}/forms/session/bulk-cancel"
    dry = admin.json("POST", path, {"appId": target_app, "dryRun": True})
    assert dry.status_code == 200 and dry.get_json() == {"dryRun": True, "count": 5}
    started = admin.json("POST", path, {"appId": target_app, "reason": "cleanup"})
    assert started.status_code == 202
    operation_id = started.get_json()["operationId"]
    status = admin.client.get(f"/{team}/operation/{operation_id}.json").get_json()["operation"]
    assert status["status"] == "queued" and status["total"] == 5
    _work_off_the_queue(app)
    done = admin.client.get(f"/{team}/operation/{operation_id}.json").get_json()["operation"]
    assert done["status"] == "done" and done["cancelled"] == 5 and done["processed"] == 5 and done["finishedAt"]
    for sid in targets:
        session = admin.client.get(f"/{team}/session/{sid}.json").get_json()["session"]
        assert session["endReason"] == "cancelled" and session["cancellation"]["source"] == "bulk"
        assert session["cancellation"]["reason"] == "cleanup"
    for sid in spared:
        assert admin.client.get(f"/{team}/session/{sid}.json").get_json()["session"]["status"] == "started"


def test_bulk_cancel_by_ids_honours_idempotency_and_skips_other_teams(factory, login, app):
    admin = login(factory.user("admin"))
    mine = _sessions(factory, admin.user, 3)
    stranger = factory.user("owner")
    theirs = _sessions(factory, stranger, 1)
    path = f"/{admin.user.team_id}/forms/session/bulk-cancel"
    headers = {"Idempotency-Key": "bulk-1"}
    first = admin.json("POST", path, {"ids": mine + theirs}, headers=headers).get_json()
    again = admin.json("POST", path, {"ids": mine + theirs}, headers=headers).get_json()
    assert first["operationId"] == again["operationId"] and again["idempotentReplay"] is True
    assert first["operation"]["total"] == 3
    _work_off_the_queue(app)
    stranger_view = login(stranger).client.get(f"/{stranger.team_id}/session/{theirs[0]}.json").get_json()
    assert stranger_view["session"]["status"] == "started"


def test_bulk_cancel_needs_criteria_and_the_admin_role(factory, login):
    admin = login(factory.user("admin"))
    member = login(factory.user("member", {"_id": admin.user.team_oid}))
    path = f"/{admin.user.team_id}/forms/session/bulk-cancel"
    assert admin.json("POST", path, {}).status_code == 400
    assert admin.json("POST", path, {"ids": []}).status_code == 400
    assert admin.json("POST", path, {"status": "terminated"}).status_code == 400
    assert admin.json("POST", path, {"all": True, "dryRun": True}).get_json() == {"dryRun": True, "count": 0}
    assert member.json("POST", path, {"all": True}).status_code == 403


def test_managed_bulk_cancel_and_operation(factory, api_key_client, app):
    admin = factory.user("admin", api_key=True)
    call = api_key_client(admin)
    sids = _sessions(factory, admin, 2, message=None)
    body = {"teamId": admin.team_id, "createdBefore": "2100-01-01T00:00:00Z"}
    assert call("POST", "/api/managed-agents/sessions/bulk-cancel", {**body, "dryRun": True}).get_json()["count"] == 2
    started = call("POST", "/api/managed-agents/sessions/bulk-cancel", body)
    assert started.status_code == 202
    _work_off_the_queue(app)
    operation = call("GET", f"/api/managed-agents/operations/{started.get_json()['operationId']}").get_json()
    assert operation["operation"]["cancelled"] == 2
    other_team = {"teamId": factory.user("owner").team_id, "all": True}
    assert call("POST", "/api/managed-agents/sessions/bulk-cancel", other_team).status_code == 403
    assert call("GET", f"/api/managed-agents/operations/{'a' * 24}").status_code == 404
    for sid in sids:
        assert call("GET", f"/api/managed-agents/sessions/{sid}").get_json()["session"]["status"] == "terminated"


def test_created_before_outside_the_id_range_is_400(factory, login):
    admin = login(factory.user("admin"))
    path = f"/{admin.user.team_id}/forms/session/bulk-cancel"
    for when in ("2999-01-01T00:00:00Z", "1960-01-01T00:00:00Z", "not a date"):
        assert admin.json("POST", path, {"createdBefore": when, "dryRun": True}).status_code == 400, when
