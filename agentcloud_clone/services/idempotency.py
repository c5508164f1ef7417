"""`Idempotency-Key` for creating things: a retry with the same key returns the first result.

A key's record names the session it creates before that session exists (the caller chooses its id first), so
deleting the session always finds the record and removes it with it: no key outlives its session. A record
whose request never finished (its process died) is put right on the next retry with that key, or by the
reaper's sweep (`sweep_stale`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from bson import ObjectId
from flask import current_app
from pymongo.errors import DuplicateKeyError

from ..db import chunked, get_db
from ..errors import Conflict, InvalidInput, Mismatch
from ..repositories.sessions import existing_sessions
from ..timeutil import utcnow

MAX_KEY_LENGTH = 255


def fingerprint(payload: Any) -> str:
    """A stable hash of the request body, so the same key with a different body can be refused."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def check_key(key: str | None) -> None:
    """InvalidInput unless `key` (when sent) is 1 to MAX_KEY_LENGTH visible ASCII characters."""
    # Visible ASCII, as the IETF Idempotency-Key draft's sf-string allows; other bytes reach us as latin-1 guesses.
    if key is not None and (not key or len(key) > MAX_KEY_LENGTH or not (key.isascii() and key.isprintable())):
        raise InvalidInput(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.")


def _stale_after() -> timedelta:
    return timedelta(seconds=float(current_app.config.get("IDEMPOTENCY_STALE_AFTER", 300.0)))


def run_once(
    account_id: ObjectId,
    key: str | None,
    request_hash: str,
    action: Callable[[], tuple[dict[str, Any], ObjectId | None]],
    *,
    session_id: ObjectId | None = None,
    recover: Callable[[ObjectId], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Run `action` once per (account, key); later calls get its stored result. Keys live 48 hours, or until
    the session the action created is deleted.

    `action` returns its result and the id of the session it created: `session_id`, chosen by the caller before,
    so the record names it from the start. Conflict while the first request with the key is still running;
    Mismatch when the key was used with another body. A failed action stores nothing, so the caller may retry
    with the same key. When the first request never finished (IDEMPOTENCY_STALE_AFTER ago), `recover` gives the
    result for the session it created, if it did; otherwise the action runs again."""
    if key is None:
        return action()[0]
    check_key(key)
    keys = get_db().idempotency_keys
    for _ in range(2):
        now = utcnow()
        record: dict[str, Any] = {
            "accountId": account_id,
            "key": key,
            "requestHash": request_hash,
            "result": None,
            "createdAt": now,
            "pendingSince": now,
        }
        if session_id is not None:
            record["sessionId"] = session_id
        try:
            record_id = keys.insert_one(record).inserted_id
        except DuplicateKeyError:
            existing = keys.find_one({"accountId": account_id, "key": key}) or {}
            if existing.get("requestHash") != request_hash:
                raise Mismatch("This Idempotency-Key was already used with a different request body.") from None
            if existing.get("result") is not None:
                return {**existing["result"], "idempotentReplay": True}
            if not _abandoned(existing):
                raise Conflict("A request with this Idempotency-Key is still in progress; retry shortly.") from None
            recovered = recover(existing["sessionId"]) if recover and existing.get("sessionId") else None
            if recovered is not None:
                keys.update_one(
                    {"_id": existing["_id"]}, {"$set": {"result": recovered}, "$unset": {"pendingSince": ""}}
                )
                return {**recovered, "idempotentReplay": True}
            keys.delete_one({"_id": existing["_id"], "result": None})  # its request died before doing anything
            continue
        try:
            result, _created = action()
        except BaseException:
            keys.delete_one({"_id": record_id})
            raise
        keys.update_one({"_id": record_id}, {"$set": {"result": result}, "$unset": {"pendingSince": ""}})
        return result
    raise Conflict("A request with this Idempotency-Key is still in progress; retry shortly.")


def _abandoned(record: dict[str, Any]) -> bool:
    since = record.get("pendingSince") or record.get("createdAt")
    return since is not None and since < utcnow() - _stale_after()


def sweep_stale() -> int:
    """Remove records of requests that never finished (IDEMPOTENCY_STALE_AFTER ago) and created no session that
    still exists; returns how many. (A record whose session exists is left for the retry's `recover`.) Only
    unfinished records carry `pendingSince`, so its sparse index holds just them."""
    keys = get_db().idempotency_keys
    stale = list(keys.find({"pendingSince": {"$lt": utcnow() - _stale_after()}}, {"sessionId": 1}).limit(1000))
    alive = existing_sessions([doc["sessionId"] for doc in stale if doc.get("sessionId")])
    dead = [doc["_id"] for doc in stale if doc.get("sessionId") not in alive]
    removed = 0
    for chunk in chunked(dead):
        removed += keys.delete_many({"_id": {"$in": chunk}, "result": None}).deleted_count
    return removed
