"""Teams share the workers fairly: a team's turns take at most its slots, and an idle team's turn goes first."""

from __future__ import annotations

from typing import Any

import pytest
from rq import Queue

from agentcloud_clone.queueing import get_redis, settle_outbox, turn_job_id


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {"TEAM_MAX_ACTIVE_TURNS": 2}


def _queued_turns(app) -> list[str]:
    with app.app_context():
        return Queue(app.config["TURN_QUEUE"], connection=get_redis()).get_job_ids()


def test_an_idle_teams_turn_goes_ahead_of_another_teams_backlog(factory, app, login):
    flooding, other = factory.user("member"), factory.user("member")
    flood_app, other_app = factory.app_record(flooding.team_id), factory.app_record(other.team_id)
    flood = [factory.session(flooding, flood_app, f"job {n}") for n in range(4)]
    first = factory.session(other, other_app, "my first")
    turns = _queued_turns(app)
    # The flooding team holds two slots (two turns queued); its other two wait for a slot, not in the queue.
    assert turns == [turn_job_id(str(first["activeTurnId"]))] + [turn_job_id(str(s["activeTurnId"])) for s in flood[:2]]
    me = login(flooding)
    waiting = me.client.get(f"/{flooding.team_id}/session/{flood[3]['_id']}.json").get_json()["session"]
    assert waiting["queued"] is True and waiting["queuePosition"] == {"state": "waiting-for-slot", "position": 1}
    queued = login(other).client.get(f"/{other.team_id}/session/{first['_id']}.json").get_json()["session"]
    assert queued["queuePosition"] == {"state": "queued", "position": 0}


def test_a_cancelled_queued_turn_gives_its_slot_to_the_next(factory, app, api_key_client):
    user = factory.user("member", api_key=True)
    app_id = factory.app_record(user.team_id)
    sessions = [factory.session(user, app_id, f"job {n}") for n in range(3)]
    assert len(_queued_turns(app)) == 2
    call = api_key_client(user)
    assert call("POST", f"/{user.team_id}/forms/session/{sessions[0]['_id']}/cancel").status_code == 200
    assert settle_outbox()  # the queued job is dropped off the request path
    assert _queued_turns(app)[-1] == turn_job_id(str(sessions[2]["activeTurnId"]))


def test_an_operator_gives_one_team_more_or_fewer_slots_than_the_default(factory, app):
    from agentcloud_clone.services import accounts

    small, big = factory.user("member"), factory.user("member")
    with app.app_context():
        accounts.set_team_turn_slots(small.team_oid, 1)
        accounts.set_team_turn_slots(big.team_oid, 3)
    small_app, big_app = factory.app_record(small.team_id), factory.app_record(big.team_id)
    small_turns = [factory.session(small, small_app, f"s{n}")["activeTurnId"] for n in range(3)]
    big_turns = [factory.session(big, big_app, f"b{n}")["activeTurnId"] for n in range(4)]
    queued = set(_queued_turns(app))
    assert [turn_job_id(str(t)) in queued for t in small_turns] == [True, False, False]
    assert [turn_job_id(str(t)) in queued for t in big_turns] == [True, True, True, False]  # the default is 2 here
    with app.app_context():
        accounts.set_team_turn_slots(small.team_oid, None)
        assert accounts.team_turn_slots(small.team_oid) == app.config["TEAM_MAX_ACTIVE_TURNS"] == 2


def test_a_team_admin_cannot_give_their_own_team_more_slots(factory, login):
    admin = login(factory.user("admin"))
    edited = admin.json("POST", f"/{admin.user.team_id}/forms/team/edit", {"maxActiveTurns": 100})
    assert edited.status_code == 400 and "maxActiveTurns" in edited.get_json()["errors"]
