"""Sessions and their transcript events (`session_events`, ordered by a per-session `seq`).

Every query names the session's team. A deleted session is first a tombstone (`deletedAt` set, its events
removed at once) and is purged for good by the reaper a while later: a writer that reserved a `seq` just
before the delete still finds its session when its insert lands, so no event ever outlives its session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument

from ..db import chunked, get_db
from ..timeutil import utcnow
from ..vocabulary import ENDED_STATUSES, LIVE_STATUSES, Status

NOT_CANCELLED: dict[str, Any] = {"cancelledAt": {"$exists": False}}
NOT_DELETED: dict[str, Any] = {"deletedAt": {"$exists": False}}
LIVE: dict[str, Any] = {"status": {"$in": list(LIVE_STATUSES)}}
ENDED: dict[str, Any] = {"status": {"$in": list(ENDED_STATUSES)}}
# The start of time for `$lt` on dates: MongoDB's `$lt` with a date never matches null, but not every
# MongoDB-wire server brackets by type (the embedded one orders null before dates), so queries say so.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def before(when: datetime) -> dict[str, Any]:
    """A date earlier than `when` (and not null)."""
    return {"$gt": EPOCH, "$lt": when}


# A session's team, or one of several teams (the managed-agents API acts across the caller's teams).
TeamScope = ObjectId | list[ObjectId]


def in_scope(scope: TeamScope) -> Any:
    """The `teamId` filter of a scope."""
    return {"$in": list(scope)} if isinstance(scope, list) else scope


def _applied(
    doc: dict[str, Any],
    set_fields: dict[str, Any],
    inc: dict[str, int],
    push: dict[str, Any] | None = None,
    pop: dict[str, int] | None = None,
) -> dict[str, Any]:
    """`doc` as it is after `$set`, `$inc`, `$push` (one value, or `$each` with `$position`) and `$pop`
    (dotted keys set one level down)."""
    after = dict(doc)
    for key, value in (push or {}).items():
        items = list(after.get(key) or [])
        if isinstance(value, dict) and "$each" in value:
            position = value.get("$position", len(items))
            items[position:position] = value["$each"]
        else:
            items.append(value)
        after[key] = items
    for key, end in (pop or {}).items():
        items = list(after.get(key) or [])
        after[key] = items[1:] if end == -1 else items[:-1]
    for key, value in set_fields.items():
        head, _, tail = key.partition(".")
        if tail:
            after[head] = {**(after.get(head) or {}), tail: value}
        else:
            after[key] = value
    for key, amount in inc.items():
        after[key] = after.get(key, 0) + amount
    return after


def insert_session(doc: dict[str, Any], first_events: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Store a new session and its first transcript events (seq 1..n): two writes, whatever n is."""
    now = doc.get("startDate") or utcnow()
    doc["eventSeq"] = len(first_events)
    doc["_id"] = get_db().sessions.insert_one(doc).inserted_id
    if first_events:
        events = [_event(doc["teamId"], doc["_id"], seq, now, e) for seq, e in enumerate(first_events, start=1)]
        get_db().session_events.insert_many(events, ordered=True)
    return doc


def delete_new_session(team_id: ObjectId, session_id: ObjectId) -> None:
    """Undo `insert_session` for a session nobody has seen yet (its start failed before the answer)."""
    db = get_db()
    db.session_events.delete_many({"sessionId": session_id})
    db.sessions.delete_one({"_id": session_id, "teamId": team_id})


def find_session(
    team_id: ObjectId, session_id: ObjectId, projection: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The session, only if it belongs to the team and is not deleted."""
    return get_db().sessions.find_one({"_id": session_id, "teamId": team_id, **NOT_DELETED}, projection)


def find_session_in_teams(scope: TeamScope, session_id: ObjectId) -> dict[str, Any] | None:
    """The session, only if it belongs to the team (or one of the teams) and is not deleted."""
    if isinstance(scope, list) and not scope:
        return None
    return get_db().sessions.find_one({"_id": session_id, "teamId": in_scope(scope), **NOT_DELETED})


def list_sessions(
    team_ids: list[ObjectId], *, before: ObjectId | None, limit: int, status: str | None = None
) -> list[dict[str, Any]]:
    """Newest first, keyset-paginated on `_id`; served by the `(teamId, [status,] _id)` indexes."""
    query: dict[str, Any] = {"teamId": team_ids[0] if len(team_ids) == 1 else in_scope(team_ids), **NOT_DELETED}
    if status:
        query["status"] = status
    if before is not None:
        query["_id"] = {"$lt": before}
    return list(get_db().sessions.find(query).sort("_id", -1).limit(limit))


def update_session(
    team_id: ObjectId, session_id: ObjectId, where: dict[str, Any], update: dict[str, Any]
) -> dict[str, Any] | None:
    """Apply `update` only while the session is live and matches `where`; the document after, or None."""
    return get_db().sessions.find_one_and_update(
        {"_id": session_id, "teamId": team_id, **NOT_DELETED, **LIVE, **where},
        update,
        return_document=ReturnDocument.AFTER,
    )


def append_events(
    scope: TeamScope,
    session_id: ObjectId,
    events: Sequence[dict[str, Any]],
    *,
    where: dict[str, Any],
    set_fields: dict[str, Any] | None = None,
    inc: dict[str, int] | None = None,
    push: dict[str, Any] | None = None,
    pop: dict[str, int] | None = None,
    projection: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
    """Append transcript events to a live session matching `where`, applying `set_fields`/`inc`/`push`/`pop`
    in the same write: one update reserves the events' `seq`s (and changes the state), one insert writes them.

    Returns (session before, session after, events stored), or None when no live session matched, in which
    case nothing was written."""
    now = utcnow()
    set_all = {"lastUpdatedDate": now, **(set_fields or {})}
    inc_all = {"eventSeq": len(events), **(inc or {})}
    update: dict[str, Any] = {"$set": set_all, "$inc": inc_all}
    if push:
        update["$push"] = push
    if pop:
        update["$pop"] = pop
    before = get_db().sessions.find_one_and_update(
        {"_id": session_id, "teamId": in_scope(scope), **NOT_DELETED, **LIVE, **where},
        update,
        projection={**projection, "teamId": 1, "eventSeq": 1} if projection else None,
        return_document=ReturnDocument.BEFORE,
    )
    if before is None:
        return None
    first = int(before.get("eventSeq", 0)) + 1
    stored = [_event(before["teamId"], session_id, seq, now, e) for seq, e in enumerate(events, start=first)]
    if stored:
        get_db().session_events.insert_many(stored, ordered=True)
    return before, _applied(before, set_all, inc_all, push, pop), stored


def _event(team_id: ObjectId, session_id: ObjectId, seq: int, now: datetime, fields: dict[str, Any]) -> dict[str, Any]:
    return {"_id": ObjectId(), "sessionId": session_id, "teamId": team_id, "seq": seq, "createdAt": now, **fields}


def remove_event(session_id: ObjectId, event_id: ObjectId) -> None:
    """Take back one event this process just wrote (a start whose queueing failed)."""
    get_db().session_events.delete_one({"_id": event_id, "sessionId": session_id})


def restore_event(event: dict[str, Any]) -> None:
    """Put back an event `remove_event` took, when the take-back could not be completed."""
    get_db().session_events.insert_one(event)


def release_turn(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, seq: int) -> bool:
    """Give back a turn that was never queued and the `seq` of its message, if nothing was written since."""
    done = get_db().sessions.find_one_and_update(
        {"_id": session_id, "teamId": team_id, "activeTurnId": turn_id, "eventSeq": seq, **NOT_DELETED},
        {"$set": {"activeTurnId": None}, "$inc": {"eventSeq": -1}},
        projection={"_id": 1},
    )
    return done is not None


def list_events(session_id: ObjectId, *, after: int, limit: int) -> list[dict[str, Any]]:
    """Transcript events with `seq > after`, oldest first; served by the `(sessionId, seq)` index."""
    cursor = get_db().session_events.find({"sessionId": session_id, "seq": {"$gt": after}}).sort("seq", 1)
    return list(cursor.limit(limit))


def recent_events(session_id: ObjectId, limit: int) -> list[dict[str, Any]]:
    """The session's latest `limit` transcript events, oldest first."""
    cursor = get_db().session_events.find({"sessionId": session_id}).sort("seq", -1).limit(limit)
    return list(cursor)[::-1]


def cancellable_query(team_id: ObjectId, criteria: dict[str, Any]) -> dict[str, Any]:
    """The team's live, not yet cancelled sessions matching `criteria` (ids, status, appId, createdBy,
    createdBefore); served by the `(teamId, _id)` index."""
    query: dict[str, Any] = {"teamId": team_id, **LIVE, **NOT_CANCELLED, **NOT_DELETED}
    id_range: dict[str, Any] = {}
    if criteria.get("ids"):
        id_range["$in"] = list(criteria["ids"])
    if criteria.get("createdBefore") is not None:
        id_range["$lt"] = ObjectId.from_datetime(criteria["createdBefore"])
    if id_range:
        query["_id"] = id_range
    if criteria.get("status"):
        query["status"] = criteria["status"]
    for field in ("appId", "createdBy"):
        if criteria.get(field) is not None:
            query[field] = criteria[field]
    return query


def count_matching(query: dict[str, Any]) -> int:
    """How many sessions match a query built by `cancellable_query`."""
    return get_db().sessions.count_documents(query)


def next_matching(query: dict[str, Any], after: ObjectId | None, limit: int) -> list[ObjectId]:
    """Ids of the next `limit` sessions matching `query` with `_id > after`, oldest first."""
    page = dict(query)
    if after is not None:
        page["_id"] = {**(page.get("_id") or {}), "$gt": after} if isinstance(page.get("_id"), dict) else {"$gt": after}
    return [doc["_id"] for doc in get_db().sessions.find(page, {"_id": 1}).sort("_id", 1).limit(limit)]


def count_live_sessions_for_app(team_id: ObjectId, app_id: ObjectId) -> int:
    """How many live sessions were started from the app."""
    return get_db().sessions.count_documents({"teamId": team_id, "appId": app_id, **LIVE, **NOT_DELETED})


def tombstone_ended_session(scope: TeamScope, session_id: ObjectId) -> bool:
    """Delete an ended session: hide it at once and remove its transcript; False when no ended session matched.

    The document itself stays as a tombstone until `purge_tombstones`, so a transcript write that was already
    on its way lands on a session that still exists and is purged with it."""
    db = get_db()
    done = db.sessions.find_one_and_update(
        {"_id": session_id, "teamId": in_scope(scope), **ENDED, **NOT_DELETED},
        {"$set": {"deletedAt": utcnow()}},
        projection={"_id": 1},
    )
    if done is None:
        return False
    db.session_events.delete_many({"sessionId": session_id})
    db.idempotency_keys.delete_many({"sessionId": session_id})
    return True


def purge_tombstones(deleted_before: datetime, limit: int = 500) -> int:
    """Remove sessions deleted before `deleted_before` for good, with anything written to them since."""
    db = get_db()
    ids = [doc["_id"] for doc in db.sessions.find({"deletedAt": before(deleted_before)}, {"_id": 1}).limit(limit)]
    for chunk in chunked(ids):
        db.session_events.delete_many({"sessionId": {"$in": chunk}})
        db.idempotency_keys.delete_many({"sessionId": {"$in": chunk}})
        db.sessions.delete_many({"_id": {"$in": chunk}, "deletedAt": {"$exists": True}})
    return len(ids)


def find_past_deadline(now: datetime, limit: int = 1000) -> list[dict[str, Any]]:
    """Live sessions whose limit deadline (queue TTL, turn duration, idle timeout) has passed."""
    query = {"deadline": before(now), **LIVE, **NOT_DELETED}
    projection = {"teamId": 1, "deadline": 1, "deadlineReason": 1, "status": 1}
    return list(get_db().sessions.find(query, projection).limit(limit))


def find_unqueued_turns(queued_before: datetime, limit: int = 1000) -> list[dict[str, Any]]:
    """Sessions with a turn waiting for a worker since before `queued_before` (its job may have been lost)."""
    query = {"turnQueuedAt": before(queued_before), "activeTurnId": {"$ne": None}, **LIVE, **NOT_DELETED}
    projection = {"teamId": 1, "activeTurnId": 1, "status": 1, "turnQueuedAt": 1}
    return list(get_db().sessions.find(query, projection).limit(limit))


def touch_queued_turn(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, now: datetime) -> None:
    """Note that a waiting turn was queued again."""
    get_db().sessions.update_one(
        {"_id": session_id, "teamId": team_id, "activeTurnId": turn_id}, {"$set": {"turnQueuedAt": now}}
    )


def find_lost_turns(heartbeat_before: datetime, limit: int = 1000) -> list[dict[str, Any]]:
    """Running sessions whose heartbeat is older than `heartbeat_before` (their worker is gone)."""
    query = {"status": Status.RUNNING, "heartbeatAt": before(heartbeat_before), **NOT_DELETED}
    projection = {"teamId": 1, "activeTurnId": 1, "heartbeatAt": 1}
    return list(get_db().sessions.find(query, projection).limit(limit))


def _in_teams(teams_by_session: Mapping[ObjectId, ObjectId], chunk: list[ObjectId]) -> dict[str, Any]:
    return {"_id": {"$in": chunk}, "teamId": {"$in": list({teams_by_session[sid] for sid in chunk})}}


def watch_states(teams_by_session: Mapping[ObjectId, ObjectId]) -> list[dict[str, Any]]:
    """What a worker's watcher needs of the sessions it runs (session id → team id): cancel stamp, status,
    deletion. One query per chunk of ids."""
    found: list[dict[str, Any]] = []
    projection = {
        "cancelledAt": 1,
        "status": 1,
        "deletedAt": 1,
        "interruptTurnId": 1,
        "deadline": 1,
        "deadlineReason": 1,
    }
    for chunk in chunked(list(teams_by_session)):
        found.extend(get_db().sessions.find(_in_teams(teams_by_session, chunk), projection))
    return found


def heartbeat(teams_by_session: Mapping[ObjectId, ObjectId], now: datetime) -> None:
    """Stamp `heartbeatAt` on the running sessions among these (session id → team id)."""
    for chunk in chunked(list(teams_by_session)):
        get_db().sessions.update_many(
            {**_in_teams(teams_by_session, chunk), "status": Status.RUNNING, **NOT_DELETED},
            {"$set": {"heartbeatAt": now}},
        )


def count_by_status() -> dict[str, int]:
    """How many sessions there are in each status (deleted ones aside)."""
    pipeline = [{"$match": NOT_DELETED}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
    return {row["_id"]: row["n"] for row in get_db().sessions.aggregate(pipeline)}
