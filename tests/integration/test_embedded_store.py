"""`make run`'s embedded store (mongoeco over SQLite, as the launcher builds it) as a real process on loopback.

Acknowledged writes survive a `kill -9`; unique indexes, `_id` included, are still enforced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from bson import Int64, ObjectId
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

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


def append_event(db: Any, team: ObjectId, session_id: ObjectId) -> int:
    """The product's event append (repositories/sessions.py): take the next seq, then store the event."""
    session = db.sessions.find_one_and_update(
        {"_id": session_id, "teamId": team},
        {"$inc": {"eventSeq": 1, "tokensUsed": 1}, "$set": {"lastUpdatedDate": time.time()}},
        projection={"eventSeq": 1},
        return_document=ReturnDocument.AFTER,
    )
    seq = int(session["eventSeq"])
    db.session_events.insert_one({"sessionId": session_id, "teamId": team, "seq": seq, "type": "output"})
    return seq


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ManagedProcess]:
    with start_mongo(data_dir=str(tmp_path)) as server:
        yield server


def test_acknowledged_writes_survive_kill_9_and_a_restart(store: ManagedProcess) -> None:
    client = client_for(store)
    db = client.agentcloud
    create_product_indexes(db)
    team = ObjectId()
    sessions = db.sessions.insert_many(
        [{"teamId": team, "status": "running", "eventSeq": 0, "tokensUsed": 0} for _ in range(3)]
    ).inserted_ids
    db.sessions.update_many({"_id": {"$in": sessions}}, {"$set": {"heartbeatAt": "before the crash"}})
    client.close()

    # A writer appends events until the store dies under it; only what it was told succeeded is counted.
    acknowledged: list[tuple[ObjectId, int]] = []
    failure: list[BaseException] = []
    enough = threading.Event()

    def write_until_the_store_dies() -> None:
        writer = client_for(store, serverSelectionTimeoutMS=2000, socketTimeoutMS=5000)
        try:
            for n in range(100_000):
                session_id = sessions[n % len(sessions)]
                acknowledged.append((session_id, append_event(writer.agentcloud, team, session_id)))
                if len(acknowledged) >= 150:
                    enough.set()
        except BaseException as exc:  # reported by the test, not lost in the thread
            failure.append(exc)
        finally:
            enough.set()
            writer.close()

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
    db = client.agentcloud
    stored = {(doc["sessionId"], doc["seq"]) for doc in db.session_events.find({}, {"sessionId": 1, "seq": 1})}
    assert set(acknowledged) <= stored
    # At most the one write in flight at the kill got in without its acknowledgement.
    assert len(stored) - len(acknowledged) <= 1
    for session in db.sessions.find({"_id": {"$in": sessions}}):
        appended = [seq for sid, seq in acknowledged if sid == session["_id"]]
        assert session["eventSeq"] >= max(appended) and session["heartbeatAt"] == "before the crash"
    # The unique index came back with the data.
    session_id, seq = acknowledged[0]
    with pytest.raises(DuplicateKeyError):
        db.session_events.insert_one({"sessionId": session_id, "teamId": team, "seq": seq})
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
