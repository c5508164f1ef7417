"""EmbeddedSQLiteEngine answers as mongoeco's stock SQLiteEngine does: the same documents, the same errors.

Each scenario runs the same operations, in process through mongoeco's own client, once on each engine (each on
its own SQLite file) and compares everything it observed. The scenarios aim at what the corrections touch:
uniqueness of `_id` and of compound indexes (numeric aliases, missing fields, arrays, partial indexes, updates),
the cached collection features (a write that changes an answer after it was cached), sorted reads and `_id`
lookups in filters.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bson import Decimal128, Int64, ObjectId
from mongoeco import MongoClient
from mongoeco.engines import SQLiteEngine

from devtools.embedded_store import EmbeddedSQLiteEngine

Scenario = Callable[[Any], list[Any]]
OID = [ObjectId() for _ in range(6)]
SESSION_IDS = [ObjectId() for _ in range(301)]


def fixed_id(n: int) -> ObjectId:
    """The same `_id` in both runs (errors quote the documents they refuse)."""
    return ObjectId(f"{n:024x}")


def attempt(action: Callable[[], Any]) -> Any:
    """The action's result, or its error's class and message (what a client would see)."""
    try:
        return action()
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def plain(docs: Any) -> list[dict[str, Any]]:
    """Documents as comparable dicts (cursor order kept)."""
    return [dict(doc) for doc in docs]


def run_on_both(tmp_path: Path, scenario: Scenario) -> tuple[list[Any], list[Any]]:
    observed = []
    for engine_class in (SQLiteEngine, EmbeddedSQLiteEngine):
        client = MongoClient(engine_class(str(tmp_path / f"{engine_class.__name__}.sqlite3")))
        try:
            observed.append(scenario(client.db))
        finally:
            client.close()
    return observed[0], observed[1]


def id_duplicates(db: Any) -> list[Any]:
    c = db.c
    return [
        attempt(lambda: c.insert_one({"_id": OID[0]}).inserted_id),
        attempt(lambda: c.insert_one({"_id": OID[0], "again": True}).inserted_id),
        attempt(lambda: c.insert_one({"_id": 1}).inserted_id),
        attempt(lambda: c.insert_one({"_id": 1.0}).inserted_id),
        attempt(lambda: c.insert_one({"_id": Int64(1)}).inserted_id),
        attempt(lambda: c.insert_one({"_id": Decimal128("1")}).inserted_id),
        attempt(lambda: c.insert_one({"_id": "s"}).inserted_id),
        attempt(lambda: c.insert_one({"_id": "s"}).inserted_id),
        attempt(lambda: c.insert_one({"_id": {"a": 1}}).inserted_id),
        attempt(lambda: c.insert_one({"_id": {"a": 1.0}}).inserted_id),
        attempt(lambda: c.insert_many([{"_id": OID[1]}, {"_id": OID[1]}]).inserted_ids),
        attempt(lambda: c.replace_one({"_id": OID[2]}, {"x": 1}, upsert=True).upserted_id),
        attempt(lambda: c.update_one({"_id": OID[2]}, {"$set": {"x": 2}}, upsert=True).modified_count),
        attempt(lambda: c.count_documents({})),
    ]


def compound_unique(db: Any) -> list[Any]:
    c = db.events
    c.create_index([("sessionId", 1), ("seq", 1)], unique=True, name="session_seq")
    s = OID[0]
    out = [attempt(lambda: c.insert_one({"sessionId": s, "seq": 1}).acknowledged)]
    for seq in (1, 1.0, Int64(1), Decimal128("1"), Decimal128("1.0"), 2, Int64(3), 3, 3.0, "1", True):
        out.append(attempt(lambda seq=seq: c.insert_one({"sessionId": s, "seq": seq}).acknowledged))
    # Missing and null are one key; a string session id; another session with the same seq.
    for doc in ({"sessionId": s}, {"sessionId": s, "seq": None}, {"sessionId": "s", "seq": 1}, {"sessionId": "s"}):
        out.append(attempt(lambda doc=doc: c.insert_one(dict(doc)).acknowledged))
    out.append(attempt(lambda: c.insert_one({"sessionId": "s", "seq": 1}).acknowledged))
    out.append(attempt(lambda: c.insert_one({"sessionId": OID[1], "seq": 1}).acknowledged))
    out.append(attempt(lambda: c.insert_one({"seq": 1}).acknowledged))
    out.append(attempt(lambda: c.insert_one({"seq": 1.0}).acknowledged))
    # Updates: onto another document's key fails; rewriting a document's own key does not.
    out.append(attempt(lambda: c.update_one({"sessionId": s, "seq": 2}, {"$set": {"seq": 1}}).modified_count))
    out.append(attempt(lambda: c.update_one({"sessionId": s, "seq": 2}, {"$set": {"seq": 2.0}}).modified_count))
    out.append(attempt(lambda: c.update_one({"sessionId": s, "seq": 2}, {"$set": {"seq": 7, "m": 1}}).modified_count))
    out.append(attempt(lambda: c.update_many({"sessionId": s}, {"$set": {"seq": 9}}).modified_count))
    batch = [{"_id": fixed_id(n), "sessionId": OID[2], "seq": seq} for n, seq in enumerate((1, 2, 2, 3))]
    out.append(attempt(lambda: c.insert_many(batch).inserted_ids))
    # An array turns the index multikey: the engine's other path, before and after.
    out.append(attempt(lambda: c.insert_one({"sessionId": [OID[3], OID[4]], "seq": 5}).acknowledged))
    out.append(attempt(lambda: c.insert_one({"sessionId": OID[3], "seq": 5}).acknowledged))
    out.append(attempt(lambda: c.insert_one({"sessionId": OID[5], "seq": 5}).acknowledged))
    out.append(plain(c.find({}, {"_id": 0}).sort([("sessionId", 1), ("seq", 1)])))
    return out


def partial_and_string_keys(db: Any) -> list[Any]:
    c = db.keys
    c.create_index([("account", 1), ("key", 1)], unique=True, partial_filter_expression={"live": True})
    out = []
    for doc in (
        {"account": OID[0], "key": "k", "live": True},
        {"account": OID[0], "key": "k", "live": False},
        {"account": OID[0], "key": "k", "live": True},
        {"account": OID[0], "key": "K", "live": True},
        {"account": OID[1], "key": "k", "live": True},
    ):
        out.append(attempt(lambda doc=doc: c.insert_one(dict(doc)).acknowledged))
    out.append(attempt(lambda: c.update_one({"live": False}, {"$set": {"live": True}}).modified_count))
    out.append(plain(c.find({}, {"_id": 0}).sort([("account", 1), ("key", 1), ("live", 1)])))
    return out


def features_change_after_caching(db: Any) -> list[Any]:
    """Each read caches collection features; the write after it changes the answer the next read needs."""
    c = db.f
    c.create_index([("sessionId", 1), ("seq", 1)], unique=True)
    s = OID[0]
    c.insert_many([{"sessionId": s, "seq": n, "tag": "x"} for n in range(1, 6)])
    out: list[Any] = []

    def reads() -> None:
        out.append(plain(c.find({"sessionId": s, "seq": {"$gt": 2}}, {"_id": 0}).sort("seq", 1).limit(10)))
        out.append(plain(c.find({"sessionId": s}, {"_id": 0}).sort("seq", -1).limit(3)))
        out.append(plain(c.find({"tag": "x"}, {"_id": 0, "seq": 1}).sort("seq", 1)))
        out.append(plain(c.find({"seq": {"$lt": 3}}, {"_id": 0, "seq": 1}).sort("seq", 1)))
        out.append(c.count_documents({"sessionId": s, "seq": {"$gte": 2}}))

    reads()
    for change in (
        lambda: c.insert_one({"sessionId": s, "seq": Decimal128("4.5"), "tag": "x"}),
        lambda: c.insert_one({"sessionId": s, "seq": 2.5, "tag": ["x", "y"]}),
        lambda: c.insert_one({"sessionId": s, "seq": "text", "tag": "ü"}),
        lambda: c.insert_one({"sessionId": s, "seq": [7, 8], "tag": "x"}),
        lambda: c.update_one({"seq": 3}, {"$set": {"seq": datetime.datetime(2026, 1, 1)}}),
        lambda: c.update_one({"seq": 4}, {"$set": {"tag": {"nested": True}}}),
        lambda: c.delete_many({"tag": "x"}),
        lambda: c.insert_one({"sessionId": [s, OID[1]], "seq": 10, "tag": "x"}),
        lambda: c.delete_many({}),
        lambda: c.insert_many([{"sessionId": s, "seq": n, "tag": "x"} for n in (3, 1, 2)]),
    ):
        out.append(attempt(lambda change=change: bool(change())))
        reads()
    return out


def id_filters(db: Any) -> list[Any]:
    c = db.sessions
    c.create_index([("teamId", 1), ("_id", -1)])
    team, other = OID[0], OID[1]
    ids, absent = SESSION_IDS[:300], SESSION_IDS[300]
    c.insert_many([{"_id": oid, "teamId": team if n % 3 else other, "n": n} for n, oid in enumerate(ids)])
    c.insert_many([{"_id": "text-id", "teamId": team, "n": -1}, {"_id": 7, "teamId": team, "n": -2}])
    bump = {"$inc": {"n": 1000}}
    return [
        plain(c.find({"_id": {"$in": [*ids[:50], absent]}, "teamId": {"$in": [team]}}).sort("n", 1)),
        plain(c.find({"_id": {"$in": [ids[5], "text-id", 7, 7.0]}}).sort("n", 1)),
        plain(c.find({"_id": ids[7], "teamId": team})),
        plain(c.find({"_id": ids[8], "teamId": team})),
        plain(c.find({"teamId": team, "_id": {"$lt": ids[200]}}).sort("_id", -1).limit(11)),
        attempt(lambda: c.update_many({"_id": {"$in": ids[:40]}, "teamId": team}, bump).matched_count),
        attempt(lambda: c.delete_many({"_id": {"$in": ids[250:]}}).deleted_count),
        attempt(lambda: c.count_documents({"_id": {"$in": ids[:100]}, "n": {"$gt": 1000}})),
        plain(c.find({"$or": [{"_id": ids[1]}, {"_id": {"$in": ids[2:4]}}, {"n": 299}]}).sort("n", 1)),
        attempt(lambda: c.find_one_and_update({"_id": ids[10], "teamId": team}, {"$inc": {"n": 1}})),
        plain(c.find({}).sort("n", 1)),
    ]


def object_id_ranges(db: Any) -> list[Any]:
    """Keyset pages over ObjectId `_id`s, while the collection holds only ObjectIds and after it no longer does."""
    c = db.pages
    c.create_index([("teamId", 1), ("_id", -1)])
    ids = SESSION_IDS[:200]
    c.insert_many([{"_id": oid, "teamId": OID[n % 2], "n": n} for n, oid in enumerate(ids)])
    out: list[Any] = []

    def reads() -> None:
        for operator in ("$lt", "$lte", "$gt", "$gte"):
            page = c.find({"teamId": OID[0], "_id": {operator: ids[100]}}).sort("_id", -1).limit(11)
            out.append(plain(page))
        out.append(plain(c.find({"_id": {"$lt": ids[50], "$gte": ids[10]}}).sort("_id", 1)))
        out.append(plain(c.find({}, {"n": 1, "teamId": 1}).sort("teamId", 1).limit(20)))
        out.append(plain(c.find({"n": {"$gte": 150}}).sort("_id", -1).skip(3).limit(5)))
        out.append(c.count_documents({"_id": {"$gt": ids[20]}}))

    reads()
    for change in (
        lambda: c.insert_many([{"_id": "text", "teamId": OID[0], "n": -1}, {"_id": 5, "teamId": OID[0], "n": -2}]),
        lambda: c.delete_many({"n": {"$lt": 0}}),
        lambda: c.insert_one({"_id": None, "teamId": OID[0], "n": -3}),
        lambda: c.delete_one({"_id": None}),
        lambda: c.insert_one({"_id": fixed_id(1), "n": -4}),  # no teamId: sorting by it is no longer uniform
        lambda: c.update_one({"_id": fixed_id(1)}, {"$set": {"teamId": "not an ObjectId"}}),
    ):
        out.append(attempt(lambda change=change: bool(change())))
        reads()
    return out


def string_in_lists(db: Any) -> list[Any]:
    """`$in` over strings, while the field holds only scalars and after it holds an array."""
    c = db.statuses
    c.create_index([("teamId", 1), ("status", 1), ("_id", -1)])
    statuses = ["running", "waiting", "terminated", "Running", "", '{"a": 1}']
    c.insert_many(
        [{"_id": fixed_id(n), "teamId": OID[n % 2], "status": statuses[n % 6], "n": n} for n in range(60)]
        + [{"_id": fixed_id(100), "teamId": OID[0], "status": {"a": 1}, "n": 100}]
        + [{"_id": fixed_id(101), "teamId": OID[0], "n": 101}, {"_id": fixed_id(102), "teamId": OID[0], "status": 7}]
    )
    out: list[Any] = []

    def reads() -> None:
        for values in (["running", "waiting"], ["running"], ['{"a": 1}'], ["", "terminated"], ["absent"]):
            out.append(plain(c.find({"teamId": OID[0], "status": {"$in": values}}, {"n": 1}).sort("n", 1)))
            out.append(c.count_documents({"teamId": OID[0], "status": {"$in": values}, "n": {"$gte": 10}}))
        out.append(plain(c.find({"status": {"$in": ["running", None]}}, {"n": 1}).sort("n", 1)))

    reads()
    for change in (
        lambda: c.insert_one({"_id": fixed_id(103), "teamId": OID[0], "status": ["running", "x"], "n": 103}),
        lambda: c.delete_one({"_id": fixed_id(103)}),
        lambda: c.update_many({"status": "waiting"}, {"$set": {"status": "running"}}),
    ):
        out.append(attempt(lambda change=change: bool(change())))
        reads()
    return out


def object_id_in_lists(db: Any) -> list[Any]:
    """`$in` over ObjectIds on a field other than `_id` (a purge's `sessionId`s), while the field holds only
    scalars and after it holds an array; lists that mix in other types keep the engine's own way."""
    c = db.events
    c.create_index([("sessionId", 1), ("seq", 1)], unique=True)
    owners: list[Any] = [OID[0], OID[1], OID[2], str(OID[3]), None, {"id": OID[4]}]
    c.insert_many(
        [{"_id": fixed_id(n), "sessionId": owners[n % 6], "seq": n, "n": n} for n in range(60)]
        + [{"_id": fixed_id(100), "seq": 100, "n": 100}]
    )
    out: list[Any] = []

    def reads() -> None:
        for values in ([OID[0], OID[1]], [OID[2]], [OID[5]], [OID[3]], [str(OID[3]), OID[0]], [OID[4], None]):
            out.append(plain(c.find({"sessionId": {"$in": values}}, {"n": 1}).sort("n", 1)))
            out.append(c.count_documents({"sessionId": {"$in": values}, "n": {"$gte": 10}}))

    reads()
    for change in (
        lambda: c.insert_one({"_id": fixed_id(103), "sessionId": [OID[5], OID[0]], "seq": 103, "n": 103}),
        lambda: c.delete_many({"sessionId": {"$in": [OID[5]]}}).deleted_count,
        lambda: c.delete_many({"sessionId": {"$in": [OID[1], OID[5]]}, "n": {"$lt": 30}}).deleted_count,
        lambda: c.update_many({"sessionId": {"$in": [OID[2]]}}, {"$set": {"sessionId": OID[0]}}).modified_count,
    ):
        out.append(attempt(change))
        reads()
    return out


def cursors_beside_writes(db: Any) -> list[Any]:
    """Reads fetched in several batches while documents are inserted, changed and deleted between the batches:
    each read answers as of its start."""
    c = db.cursors
    c.create_index([("teamId", 1), ("seq", 1)])
    c.insert_many([{"_id": fixed_id(n), "teamId": OID[0], "seq": n, "text": "x" * 50} for n in range(40)])
    out: list[Any] = []
    for sort in (None, [("seq", 1)], [("seq", -1)]):
        cursor = c.find({"teamId": OID[0]}, {"seq": 1}, batch_size=7)
        if sort is not None:
            cursor = cursor.sort(sort)
        rows = iter(cursor)
        seen = [next(rows)["seq"] for _ in range(7)]
        c.insert_one({"_id": ObjectId(), "teamId": OID[0], "seq": 1000})
        c.update_many({"seq": {"$lt": 20}}, {"$inc": {"seq": 100}})
        c.delete_many({"seq": {"$gte": 30, "$lt": 40}})
        seen += [doc["seq"] for doc in rows]
        out.append(seen if sort is not None else sorted(seen))
        c.delete_many({"seq": 1000})
        c.update_many({"seq": {"$gte": 100}}, {"$inc": {"seq": -100}})
        c.insert_many([{"_id": fixed_id(n), "teamId": OID[0], "seq": n, "text": "x" * 50} for n in range(30, 40)])
    out.append(plain(c.find({}, {"seq": 1}).sort("seq", 1)))
    return out


@pytest.mark.parametrize(
    "scenario",
    [
        id_duplicates,
        string_in_lists,
        object_id_in_lists,
        compound_unique,
        partial_and_string_keys,
        features_change_after_caching,
        id_filters,
        object_id_ranges,
        cursors_beside_writes,
    ],
    ids=lambda scenario: scenario.__name__,
)
def test_the_corrected_engine_observes_what_the_stock_engine_does(tmp_path: Path, scenario: Scenario) -> None:
    stock, corrected = run_on_both(tmp_path, scenario)
    assert corrected == stock


def test_duplicate_keys_are_still_refused_with_the_stock_message(tmp_path: Path) -> None:
    stock, corrected = run_on_both(tmp_path, compound_unique)
    refusals = [entry for entry in corrected if isinstance(entry, tuple) and entry[0] == "DuplicateKeyError"]
    assert len(refusals) >= 8  # the scenario is only a check if it really collides
    assert corrected == stock


def test_an_id_list_longer_than_the_stock_engine_accepts(tmp_path: Path) -> None:
    # The stock engine refuses about 490 ids or more ("Expression tree is too large").
    client = MongoClient(EmbeddedSQLiteEngine(str(tmp_path / "store.sqlite3")))
    try:
        ids = client.db.c.insert_many([{"n": n} for n in range(1500)]).inserted_ids
        assert client.db.c.count_documents({"_id": {"$in": ids[:1200]}}) == 1200
        result = client.db.c.update_many({"_id": {"$in": ids}, "n": {"$lt": 5}}, {"$set": {"seen": True}})
        assert result.matched_count == 5
    finally:
        client.close()


class Counting:
    """Counts the work an engine does: SQLite VM steps (in thousands) and documents decoded in Python."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0
        self.decoded = 0

    def _create_sqlite_connection(self) -> Any:
        conn = super()._create_sqlite_connection()
        conn.set_progress_handler(self._step, 1000)
        return conn

    def _step(self) -> int:
        self.steps += 1
        return 0  # carry on

    def _deserialize_document(self, payload: str, **kwargs: Any) -> Any:
        self.decoded += 1
        return super()._deserialize_document(payload, **kwargs)


class CountingEngine(Counting, EmbeddedSQLiteEngine):
    """The launcher's engine, counting its work."""


def product_operations(db: Any, team: ObjectId, sessions: list[ObjectId]) -> dict[str, Callable[[int], Any]]:
    """The product's hot operations (agentcloud_clone/repositories/sessions.py, jobs/watcher.py), n-th call."""
    live = sessions[0]

    def append(n: int) -> Any:
        session = db.sessions.find_one_and_update(
            {"_id": live, "teamId": team}, {"$inc": {"eventSeq": 1}}, projection={"eventSeq": 1}, return_document=True
        )
        return db.events.insert_one({"sessionId": live, "teamId": team, "seq": session["eventSeq"]})

    return {
        "insert_one": lambda n: db.events.insert_one({"sessionId": ObjectId(), "teamId": team, "seq": 1}),
        "event_append": append,
        "list_events": lambda n: list(db.events.find({"sessionId": sessions[5], "seq": {"$gt": 2}}).sort("seq", 1)),
        "list_sessions": lambda n: list(
            db.sessions.find({"teamId": team, "_id": {"$lt": sessions[-5]}}).sort("_id", -1).limit(11)
        ),
        "watcher_poll": lambda n: list(db.sessions.find({"_id": {"$in": sessions[:20]}, "teamId": {"$in": [team]}})),
        "heartbeat": lambda n: db.sessions.update_many({"_id": {"$in": sessions[:10]}}, {"$set": {"hb": n}}),
        "delete_transcript": lambda n: db.events.delete_many({"sessionId": sessions[10 + n]}),
        "purge_transcripts": lambda n: db.events.delete_many({"sessionId": {"$in": sessions[14 + 3 * n : 17 + 3 * n]}}),
        "count_live": lambda n: db.sessions.count_documents(
            {"teamId": team, "appId": live, "status": {"$in": ["started", "running", "waiting", "warning"]}}
        ),
    }


def work_per_operation(
    path: Path, sessions_count: int, engine_class: type[Counting] = CountingEngine
) -> dict[str, tuple[float, float]]:
    """Per product operation, the mean SQLite steps and decoded documents of one call, after a warm-up call."""
    engine = engine_class(str(path))
    client = MongoClient(engine)
    try:
        db = client.db
        db.sessions.create_index([("teamId", 1), ("_id", -1)])
        db.sessions.create_index([("teamId", 1), ("status", 1), ("_id", -1)])
        db.events.create_index([("sessionId", 1), ("seq", 1)], unique=True)
        team = ObjectId()
        sessions = db.sessions.insert_many(
            [{"teamId": team, "status": "terminated", "eventSeq": 10} for _ in range(sessions_count)]
        ).inserted_ids
        db.events.insert_many([{"sessionId": s, "teamId": team, "seq": q} for s in sessions for q in range(1, 11)])
        work = {}
        for name, operation in product_operations(db, team, sessions).items():
            operation(0)  # a collection's features are computed once, on first use
            engine.steps = engine.decoded = 0
            for n in range(1, 4):
                operation(n)
            work[name] = (engine.steps / 3, engine.decoded / 3)
        return work
    finally:
        client.close()


def test_no_product_operation_scans_the_collection(tmp_path: Path) -> None:
    # Deterministic: counted work, not time. Ten times the documents must not mean more work per operation;
    # the stock engine does about ten times the work on the writes here.
    small = work_per_operation(tmp_path / "small.sqlite3", 30)
    large = work_per_operation(tmp_path / "large.sqlite3", 300)
    for name, (steps, decoded) in large.items():
        small_steps, small_decoded = small[name]
        assert steps <= 2 * small_steps + 20, f"{name}: {steps:.0f}k SQLite steps vs {small_steps:.0f}k"
        assert decoded <= small_decoded + 5, f"{name}: {decoded:.0f} documents decoded vs {small_decoded:.0f}"


class LockWatchingEngine(EmbeddedSQLiteEngine):
    """The launcher's engine, noting every use of its shared connection by a thread that does not hold its lock
    (the engine's own readers bind connections of their own, thread by thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unlocked_uses: list[str] = []

    def _require_connection(self, context: Any = None) -> Any:
        conn = super()._require_connection(context)
        bound = getattr(self._thread_local, "connection", None)
        if conn is self._connection and bound is None and not self._lock._is_owned():
            self.unlocked_uses.append(threading.current_thread().name)
        return conn


def twenty_running_sessions(db: Any) -> tuple[ObjectId, list[ObjectId]]:
    """The product's indexes on sessions and events, and 20 running sessions of one team: (team, their ids)."""
    db.sessions.create_index([("teamId", 1), ("_id", -1)])
    db.events.create_index([("sessionId", 1), ("seq", 1)], unique=True)
    team = ObjectId()
    sessions = db.sessions.insert_many([{"teamId": team, "status": "running", "eventSeq": 0} for _ in range(20)])
    return team, list(sessions.inserted_ids)


def test_every_operation_uses_the_shared_connection_under_the_engine_lock(tmp_path: Path) -> None:
    # mongoeco explains a find (as its profiler does for every read) in its thread pool, on the connection its
    # writers share and without their lock; under load a plan's SQL then ran on that connection beside a write
    # and read the write's rows ("another row available", a `sessions` write refused for the `(sessionId, seq)`
    # index of another collection). Counted use, not a race to provoke: without the correction every explained
    # read (and so every read while the profiler is on) is a use outside the lock.
    engine = LockWatchingEngine(str(tmp_path / "store.sqlite3"))
    client = MongoClient(engine)
    try:
        db = client.db
        team, ids = twenty_running_sessions(db)
        operations = product_operations(db, team, ids)
        db.command({"profile": 2})  # what an operator turns on to see where the time goes (bench/workload.py)
        for n in range(1, 4):
            for operation in operations.values():
                operation(n)
            db.events.find({"sessionId": ids[0], "seq": {"$gt": n}}).sort("seq", 1).explain()
            db.sessions.find({"teamId": team}).sort("_id", -1).hint([("teamId", 1), ("_id", -1)]).explain()
    finally:
        client.close()
    assert engine.unlocked_uses == []


class StatementCountingEngine(EmbeddedSQLiteEngine):
    """The launcher's engine, noting the tables each SQL statement on its connections names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements: list[str] = []

    def _create_sqlite_connection(self) -> Any:
        conn = super()._create_sqlite_connection()
        conn.set_trace_callback(self.statements.append)
        return conn


def test_a_write_records_and_delivers_no_change_and_watch_still_sees_it(tmp_path: Path) -> None:
    # The stock engine follows every write with an outbox delivery (a lease on `change_outbox_consumers`, a
    # heartbeat thread, a read of the outbox, a checkpoint): about a third of a write's time, for change streams
    # that the wire server refuses to open; and before that it records the change in the outbox, where nothing
    # reads it. Counted statements, not time.
    engine = StatementCountingEngine(str(tmp_path / "store.sqlite3"))
    client = MongoClient(engine)
    try:
        db = client.db
        db.events.create_index([("sessionId", 1), ("seq", 1)], unique=True)
        session = db.sessions.insert_one({"eventSeq": 0}).inserted_id
        stream = db.sessions.watch()
        engine.statements.clear()
        for _ in range(5):
            seq = db.sessions.find_one_and_update({"_id": session}, {"$inc": {"eventSeq": 1}}, return_document=True)
            db.events.insert_one({"sessionId": session, "seq": seq["eventSeq"]})
        # The delivery's statements: the consumer's lease, the read of the outbox, the consumer's checkpoint.
        delivery = [
            s for s in engine.statements if "lease_" in s or "SET checkpoint" in s or "SELECT sequence, kind" in s
        ]
        assert delivery == [], delivery[:3]
        recorded = [s for s in engine.statements if "change_outbox" in s]
        assert recorded == [], recorded[:3]
        seen = [stream.try_next() for _ in range(5)]
        stream.close()
        assert [(c["operationType"], c["documentKey"]["_id"]) for c in seen] == [("update", session)] * 5
    finally:
        client.close()


class ConnectionCountingEngine(EmbeddedSQLiteEngine):
    """The launcher's engine, counting the SQLite connections it opens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened = 0

    def _create_sqlite_connection(self) -> Any:
        self.opened += 1
        return super()._create_sqlite_connection()


def test_a_read_opens_no_sqlite_connection_of_its_own(tmp_path: Path) -> None:
    # The stock engine opens (and closes) a SQLite connection for every read of more than one document, which
    # then reads the schema of every table and index again: about a quarter of a small read's time in the server.
    engine = ConnectionCountingEngine(str(tmp_path / "store.sqlite3"))
    client = MongoClient(engine)
    try:
        db = client.db
        operations = product_operations(db, *twenty_running_sessions(db))
        opened = engine.opened
        for n in range(1, 4):
            for operation in operations.values():
                operation(n)
        assert engine.opened == opened
    finally:
        client.close()
