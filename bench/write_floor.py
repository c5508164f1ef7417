"""`python -m bench.write_floor`: what one document write costs the embedded store, alone and in batches.

Starts `make run`'s store (`--memory` for mongoeco's memory engine instead) in a scratch directory, with the
product's indexes and 200 session documents, and times 50 documents written each way: one command per document
(`find_one_and_update`, `update_one`, `insert_one`) against one command for all 50 (`bulk_write`,
`update_many` over `$in`, `insert_many`), with the reads beside them (`find_one` each, `find` over `$in`).
A first round warms the store's caches; each figure is the best of the three rounds after it. Each grouped way is
printed beside its one-per-document way, as a ratio: what grouping saves is the per-command cost, and what a
document still costs in a group is the floor that no grouping of the product's writes goes below on this store
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pymongo
from bson import ObjectId
from pymongo import ReturnDocument, UpdateOne

from agentcloud_clone.db import ensure_indexes
from devtools.servers import start_mongo

DOCUMENTS = 50
ROUNDS = 3
# Each grouped way and the one-per-document way it is compared with.
GROUPED = {
    "bulk_write of UpdateOne, one command": "update_one, one per document",
    "update_many over $in, one command": "update_one, one per document",
    "insert_many, one command": "insert_one, one per document",
    "find over $in, one command (read)": "find_one, one per document (read)",
}


def measure(memory: bool) -> dict[str, float]:
    """Milliseconds per document for each way of writing (and reading) DOCUMENTS documents."""
    with tempfile.TemporaryDirectory(prefix="bench-write-floor-") as scratch:
        server = start_mongo() if memory else start_mongo(data_dir=scratch)
        try:
            return _measure_on(server.url)
        finally:
            server.stop()


def _measure_on(url: str) -> dict[str, float]:
    """`measure` on the store at `url`."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(url)
    db = client["bench_write_floor"]
    ensure_indexes(db)
    team, now = ObjectId(), datetime.now(UTC)
    sessions = [ObjectId() for _ in range(200)]
    db.sessions.insert_many(
        [{"_id": sid, "teamId": team, "status": "running", "eventSeq": 0, "heartbeatAt": now} for sid in sessions]
    )
    some = sessions[:DOCUMENTS]
    seq = iter(range(1, 10**9))

    def event(sid: ObjectId) -> dict[str, Any]:
        return {"sessionId": sid, "teamId": team, "seq": next(seq), "type": "output", "text": "w " * 20, "at": now}

    def by_id(sid: ObjectId) -> dict[str, Any]:
        return {"_id": sid, "teamId": team}

    ways: dict[str, Callable[[], object]] = {
        "find_one_and_update, one per document": lambda: [
            db.sessions.find_one_and_update(by_id(s), {"$inc": {"eventSeq": 1}}, return_document=ReturnDocument.AFTER)
            for s in some
        ],
        "update_one, one per document": lambda: [
            db.sessions.update_one(by_id(s), {"$inc": {"eventSeq": 1}}) for s in some
        ],
        "bulk_write of UpdateOne, one command": lambda: db.sessions.bulk_write(
            [UpdateOne(by_id(s), {"$inc": {"eventSeq": 1}}) for s in some]
        ),
        "update_many over $in, one command": lambda: db.sessions.update_many(
            {"_id": {"$in": some}, "teamId": team}, {"$inc": {"eventSeq": 1}}
        ),
        "insert_one, one per document": lambda: [db.session_events.insert_one(event(s)) for s in some],
        "insert_many, one command": lambda: db.session_events.insert_many([event(s) for s in some]),
        "find_one, one per document (read)": lambda: [db.sessions.find_one(by_id(s)) for s in some],
        "find over $in, one command (read)": lambda: list(db.sessions.find({"_id": {"$in": some}, "teamId": team})),
    }
    figures: dict[str, float] = {}
    for measured in (False, *[True] * ROUNDS):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            ms = (time.perf_counter() - started) * 1000 / DOCUMENTS
            if measured:
                figures[name] = min(ms, figures.get(name, ms))
    client.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="mongoeco's memory engine instead of make run's")
    args = parser.parse_args()
    engine = "memory engine" if args.memory else "make run's on-disk engine"
    print(f"{DOCUMENTS} documents, {engine}: ms per document")
    figures = measure(args.memory)
    for name, ms in figures.items():
        versus = GROUPED.get(name)
        ratio = f"  {ms / figures[versus]:.2f}× {versus.split(',')[0]}" if versus else ""
        print(f"  {name:<42}{ms:7.2f}{ratio}")


if __name__ == "__main__":
    main()
