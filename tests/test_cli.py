"""The admin CLI prints JSON that scripts can use."""

from __future__ import annotations

import json
import re

import pytest
from bson import ObjectId

from agentcloud_clone.db import get_db
from tests.support import wait_until


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_users_create_with_new_team_creates_org_and_team(runner, app):
    out = _json(runner.invoke(args=["users", "create", "a@example.com", "--password", "longenough", "--team", "Ops"]))
    assert set(out) == {"accountId", "orgId", "teamId"}
    with app.app_context():
        account = get_db().accounts.find_one({"_id": ObjectId(out["accountId"])})
        team = get_db().teams.find_one({"_id": ObjectId(out["teamId"])})
    assert account["teams"] == [{"teamId": ObjectId(out["teamId"]), "role": "owner"}]
    assert team["orgId"] == ObjectId(out["orgId"]) and account["passwordHash"] != "longenough"


def test_users_create_reports_errors_as_json(runner):
    runner.invoke(args=["users", "create", "b@example.com", "--password", "longenough"])
    result = runner.invoke(args=["users", "create", "b@example.com", "--password", "longenough"])
    assert result.exit_code == 1 and json.loads(result.stderr)["code"] == 409
    short = runner.invoke(args=["users", "create", "c@example.com", "--password", "short"])
    assert short.exit_code == 1 and json.loads(short.stderr)["code"] == 400


def test_add_member_apikey_and_app_commands(runner, app):
    team = _json(runner.invoke(args=["users", "create", "o@example.com", "--password", "longenough", "--team", "T"]))
    runner.invoke(args=["users", "create", "v@example.com", "--password", "longenough"])
    added = _json(runner.invoke(args=["teams", "add-member", team["teamId"], "v@example.com", "--role", "viewer"]))
    assert added["role"] == "viewer"
    key = _json(runner.invoke(args=["apikeys", "create", "v@example.com", "--name", "script"]))
    assert key["key"].startswith("ak_") and ObjectId(key["id"])
    app_out = _json(runner.invoke(args=["apps", "create", team["teamId"], "--name", "A", "--config", '{"steps": 2}']))
    with app.app_context():
        assert get_db().apps.find_one({"_id": ObjectId(app_out["appId"])})["config"]["steps"] == 2
    bad = runner.invoke(args=["apps", "create", team["teamId"], "--name", "A", "--config", '{"steps": -1}'])
    assert bad.exit_code == 1 and json.loads(bad.stderr)["errors"]
    missing = runner.invoke(args=["teams", "add-member", "f" * 24, "v@example.com", "--role", "viewer"])
    assert missing.exit_code == 1


def test_seed_demo_is_repeatable(runner):
    first = _json(runner.invoke(args=["seed-demo"]))
    second = _json(runner.invoke(args=["seed-demo"]))
    assert first["teamId"] == second["teamId"] and first["appId"] == second["appId"]
    assert first["apiKey"] != second["apiKey"] and first["email"] == "demo@example.com"


def test_reap_reports_what_it_ended(runner, app, factory):
    from agentcloud_clone.services.sessions import claim_turn

    user = factory.user("member")
    session = factory.session(user, factory.app_record(user.team_id), "hello")
    with app.app_context():
        # A worker claims the turn and is never heard of again.
        assert claim_turn(user.team_oid, session["_id"], session["activeTurnId"], "gone:1") is not None
    nothing = {
        "reaped": [],
        "expired": [],
        "unanswered": [],
        "requeued": [],
        "repaired": 0,
        "keys": 0,
        "jobs": 0,
        "webhooks": 0,
        "orphans": 0,
    }
    assert _json(runner.invoke(args=["reap"])) == nothing
    # At timeout 0 any heartbeat older than now is lost (one stamped this very millisecond is not, yet).
    reaped = wait_until(lambda: _json(runner.invoke(args=["reap", "--timeout", "0"]))["reaped"], what="a reap")
    assert reaped == [str(session["_id"])]
    with app.app_context():
        assert get_db().sessions.find_one({"_id": session["_id"]})["endReason"] == "worker_lost"


def test_members_can_be_listed_removed_and_change_role(runner, app):
    team = _json(runner.invoke(args=["users", "create", "own@example.com", "--password", "longenough", "--team", "M"]))
    runner.invoke(args=["users", "create", "m@example.com", "--password", "longenough"])
    _json(runner.invoke(args=["teams", "add-member", team["teamId"], "m@example.com", "--role", "member"]))
    _json(runner.invoke(args=["teams", "add-member", team["teamId"], "m@example.com", "--role", "admin"]))
    members = _json(runner.invoke(args=["teams", "members", team["teamId"]]))["members"]
    assert {(m["email"], m["role"]) for m in members} == {("own@example.com", "owner"), ("m@example.com", "admin")}
    assert _json(runner.invoke(args=["teams", "remove-member", team["teamId"], "m@example.com"]))["removed"] is True
    last_owner = runner.invoke(args=["teams", "remove-member", team["teamId"], "own@example.com"])
    assert last_owner.exit_code == 1 and json.loads(last_owner.stderr)["code"] == 409


def test_an_operator_sets_a_teams_turn_slots_and_goes_back_to_the_default(runner, app):
    created = runner.invoke(args=["users", "create", "slots@example.com", "--password", "longenough", "--team", "S"])
    team = _json(created)
    set_ = _json(runner.invoke(args=["teams", "set-turn-slots", team["teamId"], "3"]))
    assert set_ == {"teamId": team["teamId"], "maxActiveTurns": 3}
    back = _json(runner.invoke(args=["teams", "set-turn-slots", team["teamId"], "--default"]))
    assert back == {"teamId": team["teamId"], "maxActiveTurns": None}
    neither = runner.invoke(args=["teams", "set-turn-slots", team["teamId"]])
    assert neither.exit_code != 0 and "--default" in neither.output
    assert runner.invoke(args=["teams", "set-turn-slots", team["teamId"], "0"]).exit_code != 0


def test_a_command_looks_for_an_absent_mongodb_for_seconds_not_the_long_deadline(make_app, monkeypatch):
    # Counted in the error, not timed: the index build's 30 s deadline used to be the wait for a server that is
    # not there; reaching it now has REACH_TIMEOUT of its own (shortened here).
    from pymongo.errors import ServerSelectionTimeoutError

    from agentcloud_clone import db
    from devtools.servers import free_port

    monkeypatch.setattr(db, "REACH_TIMEOUT", 0.3)
    app = make_app(MONGO_URI=f"mongodb://127.0.0.1:{free_port()}/absent", MONGO_TIMEOUT=10.0)
    with pytest.raises(ServerSelectionTimeoutError) as failure:
        db.ensure_indexes_once(app)
    # pymongo names the time it gave server selection: what was left of the deadline in force
    given = re.search(r"Timeout: ([0-9.]+)s", str(failure.value))
    assert given is not None and float(given.group(1)) <= 0.3, str(failure.value)
    result = app.test_cli_runner().invoke(args=["apikeys", "create", "demo@example.com"])
    assert result.exit_code == 1 and json.loads(result.stderr)["code"] == 503


def test_a_command_waits_for_a_slow_store_instead_of_calling_it_unreachable(make_app, monkeypatch):
    """The store stops answering for longer than MONGO_TIMEOUT in the middle of seed-demo (it is paused, as a
    loaded machine's store is, for a moment): the command waits for it and succeeds."""
    import os
    import signal
    import threading

    from agentcloud_clone import cli
    from devtools.servers import start_mongo

    with start_mongo() as store:
        app = make_app(MONGO_URI=store.url.rstrip("/") + "/slow_store_cli", MONGO_TIMEOUT=0.1)
        find_account = cli.accounts_repo.find_account_by_email

        def find_while_paused(email: str):
            assert store.pid is not None
            os.kill(store.pid, signal.SIGSTOP)
            threading.Timer(1.0, os.kill, (store.pid, signal.SIGCONT)).start()
            return find_account(email)

        monkeypatch.setattr(cli.accounts_repo, "find_account_by_email", find_while_paused)
        out = _json(app.test_cli_runner().invoke(args=["seed-demo"]))
    assert out["email"] == cli.DEMO_EMAIL and out["apiKey"]
