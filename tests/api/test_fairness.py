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
