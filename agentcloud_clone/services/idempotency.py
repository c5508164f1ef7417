"""`Idempotency-Key` for creating things: a retry with the same key returns the first result."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from ..db import get_db
from ..errors import Conflict, InvalidInput, Mismatch
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


def run_once(
    account_id: ObjectId,
    key: str | None,
    request_hash: str,
    action: Callable[[], tuple[dict[str, Any], ObjectId | None]],
) -> dict[str, Any]:
    """Run `action` once per (account, key); later calls get its stored result. Keys live 48 hours, or until
    the session the action created is deleted.

    `action` returns its result and the id of the session it created. Conflict while the first request with
    the key is still running; Mismatch when the key was used with another body. A failed action stores
    nothing, so the caller may retry with the same key."""
    if key is None:
        return action()[0]
    check_key(key)
    keys = get_db().idempotency_keys
    try:
        record_id = keys.insert_one(
            {"accountId": account_id, "key": key, "requestHash": request_hash, "result": None, "createdAt": utcnow()}
        ).inserted_id
    except DuplicateKeyError:
        existing = keys.find_one({"accountId": account_id, "key": key}) or {}
        if existing.get("requestHash") != request_hash:
            raise Mismatch("This Idempotency-Key was already used with a different request body.") from None
        if existing.get("result") is None:
            raise Conflict("A request with this Idempotency-Key is still in progress; retry shortly.") from None
        return {**existing["result"], "idempotentReplay": True}
    try:
        result, session_id = action()
    except BaseException:
        keys.delete_one({"_id": record_id})
        raise
    keys.update_one({"_id": record_id}, {"$set": {"result": result, "sessionId": session_id}})
    return result
