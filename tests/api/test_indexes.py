"""Every list query has an index that serves its filter and its sort, so none of them scans a collection.

There is no query planner to ask on mongomock, and the MongoDB-wire server used in tests reports plans in
a format of its own; so each query shape the repositories issue is checked against the index definitions
created at start-up: equality fields first, then the sort key, as MongoDB's planner needs them.
"""

from __future__ import annotations

from agentcloud_clone.db import get_db

# (collection, equality fields, range/sort fields) of each list or poll query in the repositories.
QUERY_SHAPES = [
    ("sessions", ["teamId"], ["_id"]),  # sessions.json, newest first, ?before=
    ("sessions", ["teamId", "status"], ["_id"]),  # sessions.json?status=
    ("sessions", ["status"], ["heartbeatAt"]),  # the reaper
    ("sessions", [], ["deletedAt"]),  # the reaper's purge of deleted sessions
    ("session_events", ["sessionId"], ["seq"]),  # messages.json?after=
    ("apps", ["teamId"], ["_id"]),  # apps.json
    ("api_keys", ["lookup"], []),  # API-key sign-in
    ("api_keys", ["accountId"], ["_id"]),  # apikeys.json
    ("accounts", ["email"], []),  # sign-in
    ("accounts", ["teams.teamId"], []),  # a team's members
    ("idempotency_keys", ["accountId", "key"], []),
    ("idempotency_keys", ["sessionId"], []),  # records removed with their session
    ("idempotency_keys", [], ["pendingSince"]),  # the reaper's sweep of requests that never finished
    ("sessions", [], ["deadline"]),  # the reaper's limits (queue TTL, turn duration, idle timeout)
    ("sessions", [], ["turnQueuedAt"]),  # the reaper's requeue of turns whose job was lost
    ("sessions", [], ["lastUpdatedDate"]),  # the reaper's repair of writes cut off between their halves
    ("sessions", [], ["unansweredSince"]),  # the reaper's removal of sessions whose create answered an error
    ("webhook_endpoints", ["teamId"], ["_id"]),  # webhooks.json
    ("webhook_deliveries", ["endpointId"], ["_id"]),  # deliveries.json
    ("webhook_deliveries", ["status"], ["nextAttemptAt"]),  # the reaper's due retries
]


def _prefix_serves(index_keys: list[str], equality: list[str], ordered: list[str]) -> bool:
    head = index_keys[: len(equality)]
    return sorted(head) == sorted(equality) and index_keys[len(equality) : len(equality) + len(ordered)] == ordered


def test_every_query_shape_has_a_serving_index(app):
    with app.app_context():
        db = get_db()
        for collection, equality, ordered in QUERY_SHAPES:
            indexes = [[key for key, _ in spec["key"]] for spec in db[collection].index_information().values()]
            assert any(_prefix_serves(keys, equality, ordered) for keys in indexes), (collection, equality, ordered)


def test_unique_indexes_are_enforced(app):
    import pytest
    from bson import ObjectId
    from pymongo.errors import DuplicateKeyError

    with app.app_context():
        db = get_db()
        session_id = ObjectId()
        db.session_events.insert_one({"sessionId": session_id, "seq": 1})
        with pytest.raises(DuplicateKeyError):
            db.session_events.insert_one({"sessionId": session_id, "seq": 1})
        db.accounts.insert_one({"email": "same@example.com"})
        with pytest.raises(DuplicateKeyError):
            db.accounts.insert_one({"email": "same@example.com"})
        db.api_keys.insert_one({"lookup": "abc"})
        with pytest.raises(DuplicateKeyError):
            db.api_keys.insert_one({"lookup": "abc"})
        db.idempotency_keys.insert_one({"accountId": session_id, "key": "k"})
        with pytest.raises(DuplicateKeyError):
            db.idempotency_keys.insert_one({"accountId": session_id, "key": "k"})


def test_indexes_are_created_idempotently(app):
    from agentcloud_clone.db import ensure_indexes

    with app.app_context():
        before = {name: spec["key"] for name, spec in get_db().sessions.index_information().items()}
        ensure_indexes(get_db())
        assert {name: spec["key"] for name, spec in get_db().sessions.index_information().items()} == before
