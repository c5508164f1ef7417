"""The managed-agents API: the seed's curl examples, scoping, idempotent creation."""

from __future__ import annotations

from datetime import UTC, datetime

from bson import ObjectId

from agentcloud_clone.db import get_db
from agentcloud_clone.services import sessions as sessions_service
from agentcloud_clone.vocabulary import EndReason


def _start(me, app_id: str, message: str | None = "hi") -> str:
    response = me.json("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": message})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["session"]["_id"]


def test_seed_curl_examples_cancel_then_idempotent_repeat(factory, app):
    """The documented pair: cookie + Origin + JSON body, first call then the repeat."""
    user = factory.user("member")
    client = app.test_client()
    client.post("/forms/account/login", json={"email": user.email, "password": user.password})
    app_id = factory.app_record(user.team_id)
    headers = {"Origin": "http://localhost", "Content-Type": "application/json"}
    created = client.post("/api/managed-agents/sessions", json={"appId": app_id, "message": "go"}, headers=headers)
    sid = created.get_json()["session"]["_id"]
    first = client.post("/api/managed-agents/cancel", data=f'{{"sessionId": "{sid}"}}', headers=headers)
    assert first.status_code == 200 and first.get_json() == {"ok": True}
    with app.app_context():
        stamp = get_db().sessions.find_one({"_id": ObjectId(sid)})["cancelledAt"]
    repeat = client.post("/api/managed-agents/cancel", data=f'{{"sessionId": "{sid}"}}', headers=headers)
    assert repeat.status_code == 200 and repeat.get_json() == {"ok": True, "alreadyCancelled": True}
    with app.app_context():
        assert get_db().sessions.find_one({"_id": ObjectId(sid)})["cancelledAt"] == stamp


def test_cross_site_origin_without_token_is_refused(factory, app):
    user = factory.user("member")
    client = app.test_client()
    client.post("/forms/account/login", json={"email": user.email, "password": user.password})
    response = client.post(
        "/api/managed-agents/cancel", json={"sessionId": "a" * 24}, headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403


def test_cancel_errors(factory, login, app):
    me = login(factory.user("member"))
    for body in ({}, {"sessionId": ""}, {"sessionId": "nope"}, {"sessionId": {"$ne": None}}, {"sessionId": 7}):
        response = me.json("POST", "/api/managed-agents/cancel", body)
        assert response.status_code == 400, body
        assert response.get_json()["code"] == 400
    assert me.json("POST", "/api/managed-agents/cancel", {"sessionId": "a" * 24}).status_code == 404
    anonymous = app.test_client().post("/api/managed-agents/cancel", json={"sessionId": "a" * 24})
    assert anonymous.status_code == 401 and anonymous.get_json()["code"] == 401


def test_cancel_of_other_users_team_session_is_404(factory, login):
    me = login(factory.user("member"))
    other = login(factory.user("member"))
    sid = _start(other, factory.app_record(other.user.team_id))
    assert me.json("POST", "/api/managed-agents/cancel", {"sessionId": sid}).status_code == 404


def test_cancel_ended_or_never_running_session_is_ok(factory, login, app):
    me = login(factory.user("member"))
    sid = _start(me, factory.app_record(me.user.team_id), None)
    with app.app_context():  # the session runs out of its queue time: the service ends it, no worker involved
        ended = sessions_service.end_turn(
            ObjectId(me.user.team_id), ObjectId(sid), None, EndReason.EXPIRED, "Waited too long for a worker."
        )
    assert ended is not None and ended["status"] == "terminated"
    assert me.json("POST", "/api/managed-agents/cancel", {"sessionId": sid}).get_json() == {"ok": True}
    shown = me.client.get(f"/{me.user.team_id}/session/{sid}.json").get_json()["session"]
    assert shown["endReason"] == "expired" and "cancellation" not in shown  # the late cancel changed nothing


def test_viewer_cannot_cancel(factory, login):
    owner = login(factory.user("owner"))
    viewer = login(factory.user("viewer", {"_id": ObjectId(owner.user.team_id)}))
    sid = _start(owner, factory.app_record(owner.user.team_id))
    assert viewer.json("POST", "/api/managed-agents/cancel", {"sessionId": sid}).status_code == 403


def test_create_list_get_events_delete(factory, api_key_client):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    created = call("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": "hello"})
    assert created.status_code == 201
    sid = created.get_json()["session"]["_id"]
    listed = call("GET", "/api/managed-agents/sessions").get_json()
    assert [s["_id"] for s in listed["sessions"]] == [sid] and listed["nextBefore"] is None
    assert call("GET", f"/api/managed-agents/sessions?teamId={user.team_id}").get_json()["sessions"]
    assert call("GET", f"/api/managed-agents/sessions?teamId={'e' * 24}").status_code == 403
    assert call("GET", f"/api/managed-agents/sessions/{sid}").get_json()["session"]["status"] == "started"
    events = call("GET", f"/api/managed-agents/sessions/{sid}/events").get_json()["events"]
    assert [e["text"] for e in events] == ["hello"]
    # A session with no turn in flight ends as soon as it is cancelled, so it can then be deleted.
    sid = call("POST", "/api/managed-agents/sessions", {"appId": app_id}).get_json()["session"]["_id"]
    refused = call("DELETE", f"/api/managed-agents/sessions/{sid}")
    assert refused.status_code == 409
    assert call("POST", "/api/managed-agents/cancel", {"sessionId": sid}).get_json() == {"ok": True}
    assert call("DELETE", f"/api/managed-agents/sessions/{sid}").get_json() == {"ok": True}
    assert call("GET", f"/api/managed-agents/sessions/{sid}").status_code == 404
    assert call("DELETE", f"/api/managed-agents/sessions/{sid}").status_code == 404
    assert call("GET", "/api/managed-agents/sessions/bad").status_code == 400


def test_create_validates_and_scopes(factory, api_key_client):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    other_app = factory.app_record(factory.user("owner").team_id)
    assert call("POST", "/api/managed-agents/sessions", {"appId": other_app}).status_code == 404
    assert call("POST", "/api/managed-agents/sessions", {"appId": "x"}).status_code == 400
    assert call("POST", "/api/managed-agents/sessions", {"appId": other_app, "bogus": 1}).status_code == 400
    mine = factory.app_record(user.team_id)
    assert call("POST", "/api/managed-agents/sessions", {"appId": mine, "teamId": "d" * 24}).status_code == 403


def test_idempotency_key_returns_original_session_in_both_families(factory, api_key_client, app):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    headers = {"Idempotency-Key": "retry-1"}
    first = call("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": "a"}, headers=headers)
    again = call("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": "a"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.get_json()["session"]["_id"] == again.get_json()["session"]["_id"]
    different = call("POST", "/api/managed-agents/sessions", {"appId": app_id, "message": "b"}, headers=headers)
    assert different.status_code == 422
    path = f"/{user.team_id}/forms/session/add"
    one = call("POST", path, {"appId": app_id}, headers={"Idempotency-Key": "form-1"}).get_json()
    two = call("POST", path, {"appId": app_id}, headers={"Idempotency-Key": "form-1"}).get_json()
    assert one["_id"] == two["_id"]
    with app.app_context():
        assert get_db().sessions.count_documents({"teamId": ObjectId(user.team_id)}) == 2
        record = get_db().idempotency_keys.find_one({"key": "form-1"})
        ttl = [i for i in get_db().idempotency_keys.index_information().values() if "expireAfterSeconds" in i]
    # MongoDB's TTL monitor removes a record 48 hours after its createdAt.
    assert [(i["key"], i["expireAfterSeconds"]) for i in ttl] == [([("createdAt", 1)], 48 * 3600)]
    assert abs((record["createdAt"] - datetime.now(UTC)).total_seconds()) < 600
    assert str(record["sessionId"]) == one["_id"]


def test_idempotency_record_goes_with_its_session(factory, api_key_client, app):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    created = call("POST", "/api/managed-agents/sessions", {"appId": app_id}, headers={"Idempotency-Key": "gone"})
    sid = created.get_json()["session"]["_id"]
    assert call("POST", "/api/managed-agents/cancel", {"sessionId": sid}).status_code == 200
    assert call("DELETE", f"/api/managed-agents/sessions/{sid}").status_code == 200
    with app.app_context():
        assert get_db().idempotency_keys.count_documents({"key": "gone"}) == 0
    again = call("POST", "/api/managed-agents/sessions", {"appId": app_id}, headers={"Idempotency-Key": "gone"})
    assert again.status_code == 201 and again.get_json()["session"]["_id"] != sid


def test_idempotency_key_is_per_user(factory, api_key_client):
    owner = factory.user("owner", api_key=True)
    colleague = factory.user("member", {"_id": ObjectId(owner.team_id)}, api_key=True)
    app_id = factory.app_record(owner.team_id)
    headers = {"Idempotency-Key": "same"}
    a = api_key_client(owner)("POST", "/api/managed-agents/sessions", {"appId": app_id}, headers=headers)
    b = api_key_client(colleague)("POST", "/api/managed-agents/sessions", {"appId": app_id}, headers=headers)
    assert a.get_json()["session"]["_id"] != b.get_json()["session"]["_id"]


def test_idempotency_key_is_visible_ascii(factory, api_key_client):
    user = factory.user("member", api_key=True)
    call = api_key_client(user)
    app_id = factory.app_record(user.team_id)
    for key in ("caf\u00e9", "tab\there", "x" * 256):
        refused = call("POST", "/api/managed-agents/sessions", {"appId": app_id}, headers={"Idempotency-Key": key})
        assert refused.status_code == 400 and "ASCII" in refused.get_json()["message"], key
    fine = call("POST", "/api/managed-agents/sessions", {"appId": app_id}, headers={"Idempotency-Key": "a b~!"})
    assert fine.status_code == 201
