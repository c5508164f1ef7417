"""`make run`'s embedded store (mongoeco over SQLite, as the launcher builds it) as a real process on loopback.

Acknowledged writes survive a `kill -9`; unique indexes, `_id` included, are still enforced.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from bson import Int64, ObjectId
from pymongo.errors import DuplicateKeyError, PyMongoError

from agentcloud_clone.db import database_name
from agentcloud_clone.services import sessions as sessions_service
from devtools.servers import ManagedProcess, start_mongo

pytestmark = pytest.mark.integration

# That a write costs no more in a full collection than in an empty one is shown by counted work in
# tests/test_embedded_store_engine.py and timed by `make bench` (bench/store_growth.py), not here.


def client_for(server: ManagedProcess, **options: Any) -> pymongo.MongoClient[dict[str, Any]]:
    return pymongo.MongoClient(server.url, **{"serverSelectionTimeoutMS": 5000, **options})


def create_product_indexes(db: Any) -> None:
    """The indexes the product creates on the collections these tests write (agentcloud_clone/db.py)."""
    db.sessions.create_index([("teamId", 1), ("_id", -1)], name="team_sessions")
    db.sessions.create_index([("teamId", 1), ("status", 1), ("_id", -1)], name="team_status_sessions")
    db.sessions.create_index([("status", 1), ("heartbeatAt", 1)], name="status_heartbeat")
    db.session_events.create_index([("sessionId", 1), ("seq", 1)], unique=True, name="session_seq")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ManagedProcess]:
    with start_mongo(data_dir=str(tmp_path)) as server:
        yield server


@pytest.fixture
def mongo_uri_template(store: ManagedProcess) -> str:
    """The product's app (the `app` and `factory` fixtures) writes to this test's store."""
    return store.url.rstrip("/") + "/{db}"


def test_acknowledged_writes_survive_kill_9_and_a_restart(store: ManagedProcess, app: Any, factory: Any) -> None:
    user = factory.user("member")
    app_id = factory.app_record(user.team_id)
    sessions = [factory.session(user, app_id, f"turn {n}") for n in range(3)]
    with app.app_context():
        for session in sessions:
            assert sessions_service.claim_turn(session["teamId"], session["_id"], session["activeTurnId"], "w:1")
        database = database_name(app.config["MONGO_URI"])

    # A worker's output flushes, through the product's write path, until the store dies under them; only what
    # the product was told was stored is counted.
    acknowledged: list[tuple[ObjectId, int]] = []
    failure: list[BaseException] = []
    enough = threading.Event()

    def write_until_the_store_dies() -> None:
        try:
            with app.app_context():
                for n in range(100_000):
                    session = sessions[n % len(sessions)]
                    stored = sessions_service.record_output(
                        session["teamId"], session["_id"], session["activeTurnId"], [f"piece {n}"], 1
                    )
                    assert stored, "the session stopped running this turn"
                    acknowledged.extend((session["_id"], event["seq"]) for event in stored)
                    if len(acknowledged) >= 150:
                        enough.set()
        except BaseException as exc:  # reported by the test, not lost in the thread
            failure.append(exc)
        finally:
            enough.set()

    thread = threading.Thread(target=write_until_the_store_dies, name="writer")
    thread.start()
    assert enough.wait(60), "the writer made no progress"
    assert not failure, failure
    store.kill()
    thread.join(30)
    assert not thread.is_alive() and failure, "the writer should have lost its store"
    assert isinstance(failure[0], PyMongoError), failure

    store.start()
    client = client_for(store)
    db = client[database]
    stored = {(doc["sessionId"], doc["seq"]) for doc in db.session_events.find({"type": "output"})}
    assert set(acknowledged) <= stored
    # At most the write in flight at the kill got in without its acknowledgement (its events are then the
    # session's pending ones, which the next write or the reaper stores).
    assert len(stored) - len(acknowledged) <= 1
    for session in db.sessions.find({"_id": {"$in": [s["_id"] for s in sessions]}}):
        appended = [seq for sid, seq in acknowledged if sid == session["_id"]]
        assert session["eventSeq"] >= max(appended) and session["status"] == "running"
    # The unique index came back with the data.
    session_id, seq = acknowledged[0]
    with pytest.raises(DuplicateKeyError):
        db.session_events.insert_one({"sessionId": session_id, "seq": seq})
    client.close()


def test_duplicate_ids_and_duplicate_session_seqs_are_refused(store: ManagedProcess) -> None:
    client = client_for(store)
    db = client.agentcloud
    create_product_indexes(db)
    session_id, event_id = ObjectId(), ObjectId()
    db.session_events.insert_one({"_id": event_id, "sessionId": session_id, "seq": 1})
    db.session_events.insert_one({"sessionId": session_id, "seq": 2})
    db.session_events.insert_one({"sessionId": ObjectId(), "seq": 1})

    refused = [
        {"_id": event_id, "sessionId": ObjectId(), "seq": 9},  # the same `_id`
        {"sessionId": session_id, "seq": 1},  # the same (sessionId, seq)
        {"sessionId": session_id, "seq": 2.0},  # a double equal to a stored int
        {"sessionId": session_id, "seq": Int64(2)},  # an int64 equal to a stored int
    ]
    for doc in refused:
        with pytest.raises(DuplicateKeyError) as caught:
            db.session_events.insert_one(doc)
        assert caught.value.code == 11000
    with pytest.raises(DuplicateKeyError):
        db.session_events.update_one({"sessionId": session_id, "seq": 2}, {"$set": {"seq": 1}})
    with pytest.raises(pymongo.errors.BulkWriteError):
        db.session_events.insert_many([{"sessionId": session_id, "seq": 3}, {"sessionId": session_id, "seq": 3}])
    # Ordered: the batch's first document went in before its duplicate was refused.
    assert db.session_events.count_documents({"sessionId": session_id}) == 3
    assert db.session_events.count_documents({}) == 4
    client.close()
