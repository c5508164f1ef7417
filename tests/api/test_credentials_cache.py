"""Kept sign-in lookups (agentcloud_clone/credentials.py): a change to a credential holds at once everywhere.

Each test warms one process's kept lookups with a request, changes the credential through a second app on the
same database and Redis (another web or CLI process), and expects the first process to refuse the next request.
Without the version token in Redis the first process would answer from what it kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from bson import ObjectId
from flask import Flask

from agentcloud_clone import credentials
from agentcloud_clone.db import get_db
from agentcloud_clone.queueing import redis_for
from agentcloud_clone.repositories import accounts as accounts_repo
from agentcloud_clone.services import accounts as accounts_service
from agentcloud_clone.timeutil import utcnow
from devtools.servers import free_port
from tests.support import Client, Factory, User


@pytest.fixture
def other_process(app: Flask, make_app: Callable[..., Flask]) -> Flask:
    """A second app on the test app's database and Redis prefix, as another web process or the CLI would be."""
    return make_app(MONGO_URI=app.config["MONGO_URI"], REDIS_PREFIX=app.config["REDIS_PREFIX"])


def _members(client: Client, user: User) -> int:
    return int(client.client.get(f"/{user.team_id}/members.json").status_code)


def _key_request(app: Flask, user: User) -> Callable[[], int]:
    test_client = app.test_client()
    headers = {"Authorization": f"Bearer {user.api_key}"}
    return lambda: int(test_client.get(f"/{user.team_id}/members.json", headers=headers).status_code)


def _key_id(app: Flask, user: User) -> ObjectId:
    with app.app_context():
        (record,) = accounts_repo.list_api_keys(user.oid)
        return ObjectId(record["_id"])


def test_a_key_revoked_by_another_process_is_refused_at_once(app, factory, other_process):
    user = factory.user("admin", api_key=True)
    request = _key_request(app, user)
    assert [request(), request()] == [200, 200]  # the second one answered from what this process kept
    with other_process.app_context():
        accounts_service.revoke_api_key(user.oid, _key_id(other_process, user))
    assert request() == 401


def test_a_role_taken_away_by_another_process_holds_at_once(app, factory, login, other_process):
    user = factory.user("admin")
    me = login(user)
    assert [_members(me, user), _members(me, user)] == [200, 200]
    with other_process.app_context():
        accounts_service.add_member(user.team_oid, user.email, "member")
    assert _members(me, user) == 403
    with other_process.app_context():
        account = get_db().accounts.find_one({"_id": user.oid})
        accounts_service.remove_member(user.team_oid, account)
    assert _members(me, user) == 403  # the team slug is no longer one of theirs


def test_signing_out_everywhere_from_another_process_ends_this_cookie_at_once(app, factory, login, other_process):
    user = factory.user("admin")
    me = login(user)
    assert [_members(me, user), _members(me, user)] == [200, 200]
    with other_process.app_context():
        accounts_service.end_all_signins(user.oid)
    assert _members(me, user) == 401


def test_a_process_that_cannot_reach_redis_trusts_nothing_it_kept(app, factory, make_app):
    # Its own Redis is away, so it cannot see the other processes' changes: every lookup goes to MongoDB.
    blind = make_app(MONGO_URI=app.config["MONGO_URI"], REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    user = factory.user("admin", api_key=True)
    request = _key_request(blind, user)
    assert [request(), request()] == [200, 200]
    with app.app_context():
        accounts_service.revoke_api_key(user.oid, _key_id(app, user))
    assert request() == 401


def test_a_lost_version_token_invalidates_what_was_kept_under_it(app, factory):
    # A Redis that restarted empty lost the version, and maybe a change it recorded (here: a revocation written
    # straight to MongoDB, whose version change is lost with it): nothing kept before is trusted.
    user = factory.user("admin", api_key=True)
    request = _key_request(app, user)
    assert [request(), request()] == [200, 200]
    with app.app_context():
        get_db().api_keys.update_one({"accountId": user.oid}, {"$set": {"revokedAt": utcnow()}})
        redis_for(app.config["REDIS_URL"]).delete(f"{app.config['REDIS_PREFIX']}:credentials-version")
    assert request() == 401


def test_what_was_kept_expires_after_auth_cache_seconds(app, factory, monkeypatch):
    user = factory.user("admin", api_key=True)
    request = _key_request(app, user)
    assert [request(), request()] == [200, 200]
    with app.app_context():
        get_db().api_keys.update_one({"accountId": user.oid}, {"$set": {"revokedAt": utcnow()}})  # no version
    assert request() == 200  # still kept: nothing told this process of the change
    kept_at = credentials.monotonic()  # the module's own clock: patching time.monotonic would stop every timer
    monkeypatch.setattr(credentials, "monotonic", lambda: kept_at + app.config["AUTH_CACHE_SECONDS"])
    assert request() == 401


@pytest.mark.parametrize("app_settings", [{"AUTH_CACHE_SECONDS": 0}])
def test_auth_cache_seconds_zero_keeps_nothing(app, factory: Factory, app_settings: dict[str, Any]):
    user = factory.user("admin", api_key=True)
    request = _key_request(app, user)
    assert request() == 200
    with app.app_context():
        get_db().api_keys.update_one({"accountId": user.oid}, {"$set": {"revokedAt": utcnow()}})
    assert request() == 401
    assert credentials.EXTENSION not in app.extensions or not app.extensions[credentials.EXTENSION].entries
