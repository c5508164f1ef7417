"""Part 5: what one write costs `make run`'s store as it fills up (the embedded store: mongoeco over SQLite).

One store per size (empty, then e.g. 10,000 and 100,000 transcript events with one session per ten events),
each in its own temp dir and its own server process started the way `make run` starts it. The stores are
seeded straight into their files, stored as the engine stores them (`devtools.embedded_store.bulk_load`), then
measured side by side: every round runs each operation once on every store, so whatever else loads the machine
loads them alike, and each size's cost is reported as a ratio to the empty store's. Writes carry the target
(<= 1.5x the empty store's); the reads are reported beside them for the record.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo
from bson import ObjectId
from mongoeco import MongoClient as InProcessClient
from pymongo import ReturnDocument

from devtools.embedded_store import EmbeddedSQLiteEngine, bulk_load
from devtools.servers import SQLITE_FILENAME, ManagedProcess, start_mongo

from .stats import summarize

DB = "bench_store"
TARGET_RATIO = 1.5
EVENTS_PER_SESSION = 10
LIVE_SESSIONS = 20  # running sessions each store appends to, as workers would
WATCHED_SESSIONS = 100  # running sessions a worker process's cancel watcher polls and heartbeats
WARM_UP_ROUNDS = 3  # the engine computes each collection's features once, on first use (a scan each)
WRITES = ("insert_one", "event_append")


@dataclass
class Store:
    """One seeded store, its server and what was measured on it."""

    events: int
    directory: Path
    seed_seconds: float
    server: ManagedProcess | None = None
    client: pymongo.MongoClient[dict[str, Any]] | None = None
    team: ObjectId = field(default_factory=ObjectId)
    seeded_sessions: list[ObjectId] = field(default_factory=list)
    live: list[ObjectId] = field(default_factory=list)
    watched: list[ObjectId] = field(default_factory=list)
    doomed: list[ObjectId] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)

    @property
    def db(self) -> Any:
        assert self.client is not None
        return self.client[DB]


def create_collections(path: Path) -> None:
    """The product's two hot collections and their indexes (agentcloud_clone/db.py), through the engine."""
    client = InProcessClient(EmbeddedSQLiteEngine(str(path)))
    try:
        db = client[DB]
        for name in ("sessions", "session_events"):
            db.create_collection(name)
        db.sessions.create_index([("teamId", 1), ("_id", -1)], name="team_sessions")
        db.sessions.create_index([("teamId", 1), ("status", 1), ("_id", -1)], name="team_status_sessions")
        db.sessions.create_index([("status", 1), ("heartbeatAt", 1)], name="status_heartbeat")
        db.session_events.create_index([("sessionId", 1), ("seq", 1)], unique=True, name="session_seq")
    finally:
        client.close()


def seed(events: int, root: Path) -> Store:
    """A store file holding `events` transcript events and their sessions, all of one team."""
    directory = root / f"events-{events}"
    directory.mkdir()
    path = directory / SQLITE_FILENAME
    started = time.monotonic()
    create_collections(path)
    store = Store(events=events, directory=directory, seed_seconds=0.0)
    now = time.time()
    sessions = [
        {"_id": ObjectId(), "teamId": store.team, "status": "terminated", "eventSeq": EVENTS_PER_SESSION,
         "tokensUsed": 0, "name": f"session {n}", "lastUpdatedDate": now}
        for n in range(events // EVENTS_PER_SESSION)
    ]  # fmt: skip
    bulk_load(str(path), DB, "sessions", sessions)
    bulk_load(
        str(path),
        DB,
        "session_events",
        (
            {"_id": ObjectId(), "sessionId": s["_id"], "teamId": store.team, "seq": seq, "type": "output",
             "text": "a line of agent output " * 4, "createdAt": now}
            for s in sessions
            for seq in range(1, EVENTS_PER_SESSION + 1)
        ),
    )  # fmt: skip
    store.seeded_sessions = [s["_id"] for s in sessions]
    store.seed_seconds = time.monotonic() - started
    return store


def file_bytes(directory: Path) -> int:
    """The store's size on disk: the SQLite file and its write-ahead log."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith(SQLITE_FILENAME))


def operations(store: Store) -> dict[str, Callable[[int], object]]:
    """The product's hot operations on this store, the n-th call of each."""
    db, team = store.db, store.team
    seeded = store.seeded_sessions or store.live
    probe = seeded[len(seeded) // 2]

    def append(n: int) -> object:
        # repositories/sessions.py append_event: take the session's next seq, then store the event.
        session_id = store.live[n % len(store.live)]
        session = db.sessions.find_one_and_update(
            {"_id": session_id, "teamId": team},
            {"$inc": {"eventSeq": 1, "tokensUsed": 3}, "$set": {"lastUpdatedDate": time.time()}},
            projection={"eventSeq": 1},
            return_document=ReturnDocument.AFTER,
        )
        return db.session_events.insert_one(
            {"sessionId": session_id, "teamId": team, "seq": session["eventSeq"], "type": "output", "text": "ok"}
        )

    return {
        "insert_one": lambda n: db.session_events.insert_one(
            {"sessionId": ObjectId(), "teamId": team, "seq": 1, "type": "output", "text": "ok"}
        ),
        "event_append": append,
        "list_events": lambda n: list(
            db.session_events.find({"sessionId": probe, "seq": {"$gt": 2}}).sort("seq", 1).limit(100)
        ),
        "list_sessions": lambda n: list(
            db.sessions.find({"teamId": team, "_id": {"$lt": probe}}).sort("_id", -1).limit(11)
        ),
        "watcher_poll": lambda n: list(
            db.sessions.find(
                {"_id": {"$in": store.watched}, "teamId": {"$in": [team]}}, {"cancelledAt": 1, "status": 1}
            )
        ),
        "heartbeat_update": lambda n: db.sessions.update_many(
            {"_id": {"$in": store.watched}, "teamId": {"$in": [team]}, "status": "running"},
            {"$set": {"heartbeatAt": time.time()}},
        ),
        "count_live": lambda n: db.sessions.count_documents(
            {"teamId": team, "appId": probe, "status": {"$in": ["started", "running", "waiting", "warning"]}}
        ),
        "delete_transcript": lambda n: db.session_events.delete_many({"sessionId": store.doomed[n]}),
    }


@contextlib.contextmanager
def serving(stores: list[Store], read_rounds: int) -> Iterator[None]:
    """Every store's server up (as `make run` starts it) with a client, and the same working set in each: the live
    sessions appended to, the sessions a watcher polls, the transcripts the delete rounds remove."""
    try:
        for store in stores:
            store.server = start_mongo(data_dir=str(store.directory))
            # Patient timeouts: a slow command must show up in the figures, not as an error.
            store.client = pymongo.MongoClient(store.server.url, serverSelectionTimeoutMS=30000, socketTimeoutMS=120000)
            store.live = store.db.sessions.insert_many(
                [
                    {"teamId": store.team, "status": "running", "eventSeq": 0, "tokensUsed": 0}
                    for _ in range(LIVE_SESSIONS)
                ]
            ).inserted_ids
            store.watched = store.db.sessions.insert_many(
                [{"teamId": store.team, "status": "running", "eventSeq": 0} for _ in range(WATCHED_SESSIONS)]
            ).inserted_ids
            store.doomed = [ObjectId() for _ in range(WARM_UP_ROUNDS + read_rounds)]
            store.db.session_events.insert_many(
                [
                    {"sessionId": s, "teamId": store.team, "seq": q, "type": "output"}
                    for s in store.doomed
                    for q in range(10)
                ]
            )
        yield
    finally:
        for store in stores:
            if store.client is not None:
                store.client.close()
            if store.server is not None:
                store.server.stop()


def measure(stores: list[Store], write_rounds: int, read_rounds: int) -> None:
    """Interleaved: each round runs one operation once on every store, the smallest first."""
    ops = {store.events: operations(store) for store in stores}
    for name in ops[stores[0].events]:
        rounds = write_rounds if name in WRITES else read_rounds
        for n in range(WARM_UP_ROUNDS + rounds):
            for store in stores:
                started = time.perf_counter()
                ops[store.events][name](n)
                if n >= WARM_UP_ROUNDS:
                    store.timings.setdefault(name, []).append(time.perf_counter() - started)


def run(*, sizes: list[int], write_rounds: int = 200, read_rounds: int = 30) -> dict[str, Any]:
    """Seed one store per size, measure them side by side, and report each size's cost as a ratio to the first's."""
    if sizes[0] != 0:
        raise ValueError("the first size is the baseline and must be 0 (an empty store)")
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        stores = [seed(events, root) for events in sizes]
        with serving(stores, read_rounds):
            sizes_on_disk = {store.events: file_bytes(store.directory) for store in stores}
            measure(stores, write_rounds, read_rounds)
            counted = {store.events: store.db.session_events.estimated_document_count() for store in stores}
        baseline = {name: summarize(values)["p50"] for name, values in stores[0].timings.items()}
        results = []
        for store in stores:
            per_op = {}
            for name, values in store.timings.items():
                stats = summarize(values)
                ratio = stats["p50"] / baseline[name] if baseline[name] else None
                per_op[name] = {
                    "write": name in WRITES,
                    "seconds": stats,
                    "ratio_to_empty": ratio,
                    "target_ratio": TARGET_RATIO if name in WRITES else None,
                    "target_met": (ratio is not None and ratio <= TARGET_RATIO) if name in WRITES else None,
                }
            results.append(
                {
                    "events": store.events,
                    "sessions": len(store.seeded_sessions),
                    "events_after_run": counted[store.events],
                    "seed_seconds": store.seed_seconds,
                    "file_bytes": sizes_on_disk[store.events],
                    "operations": per_op,
                }
            )
        return {
            "engine": f"{EmbeddedSQLiteEngine.__module__}.{EmbeddedSQLiteEngine.__name__}",
            "write_rounds": write_rounds,
            "read_rounds": read_rounds,
            "target_ratio": TARGET_RATIO,
            "stores": results,
            "targets_met": all(
                op["target_met"] for store in results for op in store["operations"].values() if op["write"]
            ),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
