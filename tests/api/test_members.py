"""Membership changes take effect on the very next request, by cookie and by API key alike; only owners make,
unmake or remove owners."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def team(factory: Any, login: Any, api_key_client: Any) -> dict[str, Any]:
    """An owner (signed in), and a member and an admin each with a browser sign-in and an API key."""
    owner = factory.user("owner", api_key=True)
    team_doc = {"_id": owner.team_oid}
    member = factory.user("member", team_doc, api_key=True)
    admin = factory.user("admin", team_doc, api_key=True)
    return {
        "id": owner.team_id,
        "owner": login(owner),
        "member": member,
        "admin": admin,
        "callers": {role: (login(user), api_key_client(user)) for role, user in (("member", member), ("admin", admin))},
    }


def _by_cookie_and_key(team: dict[str, Any], role: str, method: str, path: str, body: Any = None) -> list[int]:
    browser, program = team["callers"][role]
    return [browser.json(method, path, body).status_code, program(method, path, body).status_code]


def test_a_removed_member_is_refused_on_the_next_request_by_cookie_and_by_key(team):
    sessions = f"/{team['id']}/sessions.json"
    assert _by_cookie_and_key(team, "member", "GET", sessions) == [200, 200]
    removed = team["owner"].json("DELETE", f"/{team['id']}/forms/member/{team['member'].account_id}")
    assert removed.status_code == 200
    assert _by_cookie_and_key(team, "member", "GET", sessions) == [403, 403]
    assert _by_cookie_and_key(team, "member", "POST", f"/{team['id']}/forms/session/add", {"appId": "a" * 24}) == [
        403,
        403,
    ]
    # They are still signed in (their account is theirs), just not on this team.
    browser, program = team["callers"]["member"]
    assert browser.client.get("/account.json").get_json()["teams"] == []
    assert program("GET", "/api/managed-agents/sessions").get_json()["sessions"] == []


def test_a_demoted_admin_loses_the_admin_routes_at_once(team, factory):
    members, apps = f"/{team['id']}/members.json", f"/{team['id']}/forms/app/add"
    assert _by_cookie_and_key(team, "admin", "GET", members) == [200, 200]
    demoted = team["owner"].json(
        "POST", f"/{team['id']}/forms/member/{team['admin'].account_id}/edit", {"role": "member"}
    )
    assert demoted.status_code == 200
    assert _by_cookie_and_key(team, "admin", "GET", members) == [403, 403]
    assert _by_cookie_and_key(team, "admin", "POST", apps, {"name": "no longer mine"}) == [403, 403]
    app_id = factory.app_record(team["id"])
    assert _by_cookie_and_key(team, "admin", "DELETE", f"/{team['id']}/forms/app/{app_id}") == [403, 403]
    assert _by_cookie_and_key(team, "admin", "POST", f"/{team['id']}/forms/session/bulk-cancel", {"all": True}) == [
        403,
        403,
    ]
    # What a member may do, they still may.
    assert _by_cookie_and_key(team, "admin", "GET", f"/{team['id']}/sessions.json") == [200, 200]


def test_an_admin_cannot_grant_change_or_remove_the_owner_role(team, factory):
    browser, program = team["callers"]["admin"]
    owner_id = team["owner"].user.account_id
    member_id = team["member"].account_id
    newcomer = factory.user("viewer", factory.team())
    for call in (browser.json, program):
        for method, path, body in (
            ("POST", f"/{team['id']}/forms/member/{member_id}/edit", {"role": "owner"}),
            ("POST", f"/{team['id']}/forms/member/add", {"email": newcomer.email, "role": "owner"}),
            ("POST", f"/{team['id']}/forms/member/{owner_id}/edit", {"role": "admin"}),
            ("DELETE", f"/{team['id']}/forms/member/{owner_id}", None),
            ("POST", f"/{team['id']}/forms/member/{owner_id}/delete", {}),
        ):
            refused = call(method, path, body)
            assert refused.status_code == 403, (method, path, body, refused.get_json())
            assert "owner" in refused.get_json()["message"]
    roles = {m["_id"]: m["role"] for m in team["owner"].client.get(f"/{team['id']}/members.json").get_json()["members"]}
    assert (roles[owner_id], roles[member_id]) == ("owner", "member") and newcomer.account_id not in roles
    # The admin may still manage the roles below owner; an owner may make another owner.
    assert program("POST", f"/{team['id']}/forms/member/{member_id}/edit", {"role": "viewer"}).status_code == 200
    promoted = team["owner"].json("POST", f"/{team['id']}/forms/member/{member_id}/edit", {"role": "owner"})
    assert promoted.status_code == 200


def test_the_members_list_shows_no_secrets(team):
    listed = team["owner"].client.get(f"/{team['id']}/members.json").get_data(as_text=True)
    for secret in ("passwordHash", "signins", "pbkdf2", "keyHash"):
        assert secret not in listed


def _invite(team: dict[str, Any], email: str, role: str = "member") -> Any:
    return team["owner"].json("POST", f"/{team['id']}/forms/member/add", {"email": email, "role": role})


def _members_and_invitations(team: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    listed = team["owner"].client.get(f"/{team['id']}/members.json").get_json()
    return {m["email"]: m["role"] for m in listed["members"]}, {i["email"]: i["role"] for i in listed["invitations"]}


def test_an_invited_account_joins_only_when_it_accepts(team, factory, api_key_client):
    """Adding someone is an offer: until its account accepts, it is not on the team (no team admin can put an
    account on their team, nor make it see their apps, without its owner's say)."""
    invitee = factory.user("owner", factory.team(), api_key=True)
    call = api_key_client(invitee)
    invited = _invite(team, invitee.email, "viewer")
    assert invited.status_code == 200 and invited.get_json()["invited"] is True
    members, invitations = _members_and_invitations(team)
    assert invitee.email not in members and invitations == {invitee.email: "viewer"}
    assert call("GET", f"/{team['id']}/sessions.json").status_code == 403
    [offer] = call("GET", "/account.json").get_json()["invitations"]
    assert (offer["_id"], offer["teamId"], offer["role"]) == (invited.get_json()["_id"], team["id"], "viewer")
    assert offer["teamName"] and "email" not in offer
    joined = call("POST", f"/forms/account/invitation/{offer['_id']}/accept")
    assert joined.status_code == 200 and joined.get_json()["teamId"] == team["id"]
    assert call("GET", f"/{team['id']}/sessions.json").status_code == 200
    members, invitations = _members_and_invitations(team)
    assert members[invitee.email] == "viewer" and invitations == {}
    assert call("POST", f"/forms/account/invitation/{offer['_id']}/accept").status_code == 404  # used up


def test_an_invitation_tells_nothing_of_whether_an_account_has_the_email(team, factory):
    someone = factory.user("owner", factory.team())

    def shape(email: str) -> dict[str, Any]:
        answer = _invite(team, email)
        body = answer.get_json()
        return {"status": answer.status_code, **{k: v for k, v in body.items() if k not in ("_id", "email")}}

    assert shape(someone.email) == shape("nobody-has-this@example.com")


def test_only_the_invited_account_answers_an_invitation_and_the_team_may_withdraw_it(team, factory, api_key_client):
    invitee = factory.user("owner", factory.team(), api_key=True)
    other = api_key_client(factory.user("owner", factory.team(), api_key=True))
    offer = _invite(team, invitee.email).get_json()["_id"]
    for action in ("accept", "decline"):
        assert other("POST", f"/forms/account/invitation/{offer}/{action}").status_code == 404
    assert other("GET", "/account.json").get_json()["invitations"] == []
    withdrawn = team["owner"].json("DELETE", f"/{team['id']}/forms/invitation/{offer}")
    assert withdrawn.status_code == 200
    assert api_key_client(invitee)("POST", f"/forms/account/invitation/{offer}/accept").status_code == 404
    # Declined: gone, and the account stays off the team.
    again = _invite(team, invitee.email).get_json()["_id"]
    assert api_key_client(invitee)("POST", f"/forms/account/invitation/{again}/decline").status_code == 200
    members, invitations = _members_and_invitations(team)
    assert invitations == {} and invitee.email not in members


def test_an_expired_invitation_cannot_be_accepted(app, team, factory, api_key_client):
    from datetime import timedelta

    from bson import ObjectId

    from agentcloud_clone.db import get_db
    from agentcloud_clone.timeutil import utcnow

    invitee = factory.user("owner", factory.team(), api_key=True)
    offer = _invite(team, invitee.email).get_json()["_id"]
    with app.app_context():
        get_db().invitations.update_one(
            {"_id": ObjectId(offer)}, {"$set": {"expiresAt": utcnow() - timedelta(seconds=1)}}
        )
    call = api_key_client(invitee)
    assert call("GET", "/account.json").get_json()["invitations"] == []
    assert call("POST", f"/forms/account/invitation/{offer}/accept").status_code == 404
    assert invitee.email not in _members_and_invitations(team)[0]


def test_adding_someone_already_on_the_team_changes_their_role(team):
    changed = _invite(team, team["member"].email, "viewer")
    assert changed.status_code == 200 and "invited" not in changed.get_json()
    assert _members_and_invitations(team)[0][team["member"].email] == "viewer"
