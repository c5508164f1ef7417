"""Sessions and their transcript events (`session_events`, ordered by a per-session `seq`).

Every query names the session's team.

A change and its transcript events are two writes: one `findAndModify` on the session, which changes its state,
reserves the events' `seq`s and records the events themselves as the session's `pendingEvents`, then one
`insert_many` of the events. The first write is the commit; the second only materialises it, and anyone can
do that again, since an event's `_id` and `seq` are fixed by the first write (a repeat is a duplicate key, and
ignored). So a writer that dies, or loses its answer to a hung server, between the two writes leaves nothing
wrong for long: the next write to the session inserts the batch it finds pending before its own, and the
reaper's sweep (`unsettled`, `materialise_pending`) does it for a session that is written no more. Every
transcript stays gap-free and an ended session keeps its closing event.

A deleted session is first a tombstone (`deletedAt` set, its events removed at once) and is purged for good by
the reaper TOMBSTONE_GRACE later: a writer that reserved a `seq` just before the delete still finds its session
when its insert lands. A writer whose insert took longer than half the grace (a stalled process) checks its
session afterwards and removes what it wrote if the session is gone: no event outlives its session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pymongo
from bson import ObjectId
from flask import current_app
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError

from ..db import LONG_OPERATION, chunked, get_db
from ..timeutil import utcnow
from ..vocabulary import ENDED_STATUSES, LIVE_STATUSES, SharingMode, Status

log = logging.getLogger(__name__)
NOT_CANCELLED: dict[str, Any] = {"cancelledAt": {"$exists": False}}
# What reads of a session leave out: the last write's events, kept only until they are surely inserted.
HIDDEN: dict[str, Any] = {"pendingEvents": 0}
DUPLICATE_KEY = 11000
NOT_DELETED: dict[str, Any] = {"deletedAt": {"$exists": False}}
LIVE: dict[str, Any] = {"status": {"$in": list(LIVE_STATUSES)}}
ENDED: dict[str, Any] = {"status": {"$in": list(ENDED_STATUSES)}}
# The start of time for `$lt` on dates: MongoDB's `$lt` with a date never matches null, but not every
# MongoDB-wire server brackets by type (the embedded one orders null before dates), so queries say so.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def before(when: datetime) -> dict[str, Any]:
    """A date earlier than `when` (and not null)."""
    return {"$gt": EPOCH, "$lt": when}


@dataclass(frozen=True)
class Visible:
    """A team scope as one account sees it: a session of an `owner`-mode app only when the account created it."""

    teams: ObjectId | list[ObjectId]
    viewer: ObjectId


# A session's team, or one of several teams (the managed-agents API acts across the caller's teams), optionally
# as one account sees them.
TeamScope = ObjectId | list[ObjectId] | Visible


def visible_to(viewer: ObjectId) -> dict[str, Any]:
    """The sessions `viewer` may see among its teams': all but other people's sessions of `owner`-mode apps."""
    return {"$or": [{"sharingConfig.mode": {"$ne": SharingMode.OWNER}}, {"createdBy": viewer}]}


def in_scope(scope: TeamScope) -> Any:
    """The `teamId` filter of a scope."""
    if isinstance(scope, Visible):
        return in_scope(scope.teams)
    return {"$in": list(scope)} if isinstance(scope, list) else scope


def scope_filter(scope: TeamScope) -> dict[str, Any]:
    """The filter of a scope: its team(s), and what its viewer may see."""
    found: dict[str, Any] = {"teamId": in_scope(scope)}
    if isinstance(scope, Visible):
        found.update(visible_to(scope.viewer))
    return found


def _empty(scope: TeamScope) -> bool:
    teams = scope.teams if isinstance(scope, Visible) else scope
    return isinstance(teams, list) and not teams


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
    """Store a new session and its first transcript events (seq 1..n): two writes, whatever n is. (`doc` may carry
    its own `_id`, chosen before the write.)"""
    started = time.monotonic()
    now = doc.get("startDate") or utcnow()
    doc.setdefault("_id", ObjectId())
    pending = [_pending(now, e) for e in first_events]
    doc["eventSeq"] = len(pending)
    if pending:
        doc["pendingEvents"] = pending
    get_db().sessions.insert_one(doc)
    if pending:
        events = _materialised(doc["teamId"], doc["_id"], 0, pending)
        insert_events(events)
        _remember(doc["_id"], pending[-1]["_id"])
        _check_late_write(doc["_id"], started)
    doc.pop("pendingEvents", None)
    return doc


def delete_new_session(team_id: ObjectId, session_id: ObjectId) -> None:
    """Undo `insert_session` for a session nobody has seen yet (its start failed before the answer)."""
    db = get_db()
    _note_purged([session_id])
    db.session_events.delete_many({"sessionId": session_id})
    db.sessions.delete_one({"_id": session_id, "teamId": team_id})


def confirm_new_session(team_id: ObjectId, session_id: ObjectId) -> dict[str, Any] | None:
    """Mark a new session as answered (its create request is about to succeed) and return what `_enqueue`'s look
    after queuing needs (status, active turn): one round trip for both. None when it is gone (deleted, or removed
    as unanswered because its request took too long)."""
    return get_db().sessions.find_one_and_update(
        {"_id": session_id, "teamId": team_id, **NOT_DELETED},
        {"$unset": {"unansweredSince": ""}},
        projection={"status": 1, "activeTurnId": 1},
    )


def find_unanswered_sessions(created_before: datetime, limit: int = 1000) -> list[dict[str, Any]]:
    """Sessions whose create request never answered success (stored before `created_before` and never confirmed):
    the request failed after the insert and could not undo it. Served by a sparse index holding only them and the
    few creates in flight."""
    query = {"unansweredSince": before(created_before), **NOT_DELETED}
    return list(get_db().sessions.find(query, {"teamId": 1}).limit(limit))


def tombstone_unanswered_session(team_id: ObjectId, session_id: ObjectId, created_before: datetime) -> bool:
    """Delete a session whose create was answered with an error (see `find_unanswered_sessions`), live or not: a
    worker running its turn sees the deletion and stops. False when it was confirmed or deleted meanwhile."""
    query = {"_id": session_id, "teamId": team_id, "unansweredSince": before(created_before), **NOT_DELETED}
    return _tombstone(query, session_id)


def find_session(
    team_id: ObjectId, session_id: ObjectId, projection: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The session, only if it belongs to the team and is not deleted."""
    shown = HIDDEN if projection is None else projection
    return get_db().sessions.find_one({"_id": session_id, "teamId": team_id, **NOT_DELETED}, shown)


def find_session_in_teams(scope: TeamScope, session_id: ObjectId) -> dict[str, Any] | None:
    """The session, only if it belongs to the team (or one of the teams), is not deleted, and (for a `Visible`
    scope) its viewer may see it."""
    if _empty(scope):
        return None
    return get_db().sessions.find_one({"_id": session_id, **scope_filter(scope), **NOT_DELETED}, HIDDEN)


def list_sessions(
    team_ids: list[ObjectId],
    *,
    before: ObjectId | None,
    limit: int,
    status: str | None = None,
    viewer: ObjectId | None = None,
) -> list[dict[str, Any]]:
    """Newest first, keyset-paginated on `_id`; served by the `(teamId, [status,] _id)` indexes. With a `viewer`,
    only the sessions it may see. A session whose create has not answered success is not listed: one whose
    create answered an error waits there for the reaper, and its creator was told it does not exist."""
    query: dict[str, Any] = {
        "teamId": team_ids[0] if len(team_ids) == 1 else in_scope(team_ids),
        **NOT_DELETED,
        "unansweredSince": {"$exists": False},
    }
    if viewer is not None:
        query.update(visible_to(viewer))
    if status:
        query["status"] = status
    if before is not None:
        query["_id"] = {"$lt": before}
    return list(get_db().sessions.find(query, HIDDEN).sort("_id", -1).limit(limit))


def update_session(
    team_id: ObjectId, session_id: ObjectId, where: dict[str, Any], update: dict[str, Any]
) -> dict[str, Any] | None:
    """Apply `update` only while the session is live and matches `where`; the document after, or None."""
    return get_db().sessions.find_one_and_update(
        {"_id": session_id, "teamId": team_id, **NOT_DELETED, **LIVE, **where},
        update,
        projection=HIDDEN,
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
    committed: Callable[[], None] | None = None,
    reserved: Callable[[list[dict[str, Any]], bool], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
    """Append transcript events to a live session matching `where`, applying `set_fields`/`inc`/`push`/`pop`
    in the same write: one update reserves the events' `seq`s (and changes the state), one insert writes them.
    (An event may carry its own `_id`, chosen before the write: a caller trying again after losing the answer
    names the same events.) `committed` runs between the two, once the state change is stored: what it announces
    (a cancel, to the worker that must act on it) need not wait for the events' insert. `reserved` runs then too,
    with this write's events as they will be stored and whether the write before it may still have events to
    store (they are then inserted first): this write's are committed from that moment (see the module
    docstring), so readers may hear of them before their insert.

    Returns (session before, session after, events stored), or None when no live session matched, in which
    case nothing was written. The events stored are this write's, preceded by those of the write before it when
    that writer never inserted them (see the module docstring)."""
    started = time.monotonic()
    now = utcnow()
    pending = [_pending(now, e) for e in events]
    set_all = {"lastUpdatedDate": now, **(set_fields or {})}
    if pending:
        set_all["pendingEvents"] = pending
    inc_all = {"eventSeq": len(events), **(inc or {})}
    update: dict[str, Any] = {"$set": set_all, "$inc": inc_all}
    if push:
        update["$push"] = push
    if pop:
        update["$pop"] = pop
    before = get_db().sessions.find_one_and_update(
        {"_id": session_id, **scope_filter(scope), **NOT_DELETED, **LIVE, **where},
        update,
        projection={**projection, "teamId": 1, "eventSeq": 1, "pendingEvents": 1} if projection else None,
        return_document=ReturnDocument.BEFORE,
    )
    if before is None:
        return None
    if committed is not None:
        committed()
    first = int(before.get("eventSeq", 0))
    stored = _materialised(before["teamId"], session_id, first, pending)
    earlier = _unconfirmed(session_id, before)
    if reserved is not None and stored:
        reserved(stored, bool(earlier))
    if earlier or stored:
        inserted = insert_events(earlier + stored)
        if pending:
            _remember(session_id, pending[-1]["_id"])
        _check_late_write(session_id, started)
        stored = [e for e in earlier if e["_id"] in inserted] + stored
    before.pop("pendingEvents", None)
    after = _applied(before, set_all, inc_all, push, pop)
    after.pop("pendingEvents", None)
    return before, after, stored


def settle_batch(team_id: ObjectId, session_id: ObjectId, event_ids: Sequence[ObjectId]) -> list[dict[str, Any]]:
    """A write the server applied but whose answer was lost: store its events if they are still only pending
    (the session's last write), and return them as stored."""
    session = get_db().sessions.find_one(
        {"_id": session_id, "teamId": team_id, **NOT_DELETED}, {"teamId": 1, "eventSeq": 1, "pendingEvents": 1}
    )
    pending = (session or {}).get("pendingEvents") or []
    if session is not None and pending and pending[-1]["_id"] == event_ids[-1]:
        insert_events(pending_batch(session))
    found = {doc["_id"]: doc for doc in get_db().session_events.find({"_id": {"$in": list(event_ids)}})}
    return [found[event_id] for event_id in event_ids if event_id in found]


def _pending(now: datetime, fields: dict[str, Any]) -> dict[str, Any]:
    """An event as the write that reserves it records it: everything but what follows from its session."""
    return {"_id": ObjectId(), "createdAt": now, **fields}


def _materialised(
    team_id: ObjectId, session_id: ObjectId, after_seq: int, pending: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The event documents of a reserved batch whose first `seq` follows `after_seq`."""
    return [
        {**event, "sessionId": session_id, "teamId": team_id, "seq": seq}
        for seq, event in enumerate(pending, start=after_seq + 1)
    ]


def pending_batch(session: dict[str, Any]) -> list[dict[str, Any]]:
    """The event documents of the session's last write (its `pendingEvents`, with their `seq`s)."""
    pending = session.get("pendingEvents") or []
    return _materialised(session["teamId"], session["_id"], int(session.get("eventSeq", 0)) - len(pending), pending)


# The last event of the batch each session's latest write from this process inserted (a bounded cache), so a
# writer following its own write does not insert that batch again.
_confirmed: OrderedDict[ObjectId, ObjectId] = OrderedDict()
_confirmed_lock = threading.Lock()
CONFIRMED_KEPT = 10_000


def _remember(session_id: ObjectId, last_event_id: ObjectId) -> None:
    with _confirmed_lock:
        _confirmed[session_id] = last_event_id
        _confirmed.move_to_end(session_id)
        while len(_confirmed) > CONFIRMED_KEPT:
            _confirmed.popitem(last=False)


def _unconfirmed(session_id: ObjectId, before: dict[str, Any]) -> list[dict[str, Any]]:
    """The previous write's events, unless this process saw them inserted."""
    pending = before.get("pendingEvents") or []
    if not pending:
        return []
    with _confirmed_lock:
        if _confirmed.get(session_id) == pending[-1]["_id"]:
            return []
    return pending_batch({**before, "_id": session_id})


def insert_events(events: Sequence[dict[str, Any]], *, _again: bool = True) -> set[ObjectId]:
    """Insert transcript events whose `seq`s the caller's write reserved, some of which may be there already
    (another writer materialised the same batch): the `_id`s this call inserted.

    A reserved `seq` can only be held by the event reserved for it, so anything else found there is a leftover (a
    message taken back, or a stand-in for an event its writer never wrote) and gives way."""
    if not events:
        return set()
    try:
        get_db().session_events.insert_many(list(events), ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(error.get("code") != DUPLICATE_KEY for error in errors):
            raise
        failed = [events[int(error["index"])] for error in errors]
        # A duplicate `_id` is the event itself, already stored by another writer: servers name the index that
        # refused each insert (`keyPattern`), so only the others need a look at what holds their `seq`.
        there = {events[int(error["index"])]["_id"] for error in errors if error.get("keyPattern") == {"_id": 1}}
        unsure = [e["_id"] for e in failed if e["_id"] not in there]
        if unsure:
            there |= {doc["_id"] for doc in get_db().session_events.find({"_id": {"$in": unsure}}, {"_id": 1})}
        displaced = [e for e in failed if e["_id"] not in there]
        for event in displaced:
            get_db().session_events.delete_many(
                {"sessionId": event["sessionId"], "seq": event["seq"], "_id": {"$ne": event["_id"]}}
            )
        inserted = {e["_id"] for e in events} - {e["_id"] for e in failed}
        if displaced and not _again:
            raise
        return inserted | (insert_events(displaced, _again=False) if displaced else set())
    return {event["_id"] for event in events}


def _late_after() -> float:
    return float(current_app.config.get("TOMBSTONE_GRACE", 60.0)) / 2


def _check_late_write(session_id: ObjectId, started: float) -> None:
    """A write that took so long that its session may have been deleted and purged meanwhile (the process stalled):
    if the session is gone, what was written to it goes too. (Purging removes the events before the session, so an
    insert that lands later than that finds no session here.)"""
    if time.monotonic() - started <= _late_after():
        return
    if get_db().sessions.find_one({"_id": session_id, **NOT_DELETED}, {"_id": 1}) is None:
        removed = get_db().session_events.delete_many({"sessionId": session_id}).deleted_count
        if removed:
            log.warning("removed %d transcript events written late to deleted session %s", removed, session_id)
            from ..metrics import store_for

            store_for(current_app.config).increment("reaper_swept_total", removed, kind="orphan_event")


def remove_event(session_id: ObjectId, event_id: ObjectId) -> None:
    """Take back one event this process just wrote, once its session gave back its `seq` (a message whose turn
    could not be queued)."""
    get_db().session_events.delete_one({"_id": event_id, "sessionId": session_id})


def release_turn(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, seq: int) -> bool:
    """Give back a turn that was never queued and the `seq` of its message, if nothing was written since."""
    done = get_db().sessions.find_one_and_update(
        {"_id": session_id, "teamId": team_id, "activeTurnId": turn_id, "eventSeq": seq, **NOT_DELETED},
        {"$set": {"activeTurnId": None, "pendingEvents": []}, "$inc": {"eventSeq": -1}},
        projection={"_id": 1},
    )
    return done is not None


def list_events(session_id: ObjectId, *, after: int, limit: int) -> list[dict[str, Any]]:
    """Transcript events with `seq > after`, oldest first; served by the `(sessionId, seq)` index."""
    cursor = get_db().session_events.find({"sessionId": session_id, "seq": {"$gt": after}}).sort("seq", 1)
    return list(cursor.limit(limit))


def event_seq(session_id: ObjectId, event_id: ObjectId) -> int | None:
    """The `seq` of one of the session's transcript events (an `_id` lookup), or None when it has no such event."""
    found = get_db().session_events.find_one({"_id": event_id, "sessionId": session_id}, {"seq": 1})
    return None if found is None else int(found["seq"])


def release_started_turn(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, pending: bool) -> bool:
    """Give back a turn `start` reserved but could not queue (its message, if any, waits again); False when
    something else happened to the session meanwhile."""
    done = get_db().sessions.find_one_and_update(
        {"_id": session_id, "teamId": team_id, "activeTurnId": turn_id, **NOT_DELETED, **LIVE},
        {"$set": {"activeTurnId": None, "turnQueuedAt": None, "pendingTurnId": turn_id if pending else None}},
        projection={"_id": 1},
    )
    return done is not None


def set_sharing_mode(team_id: ObjectId, app_id: ObjectId, mode: str) -> None:
    """Copy an app's sharing mode onto its sessions, which lists and loaders filter by."""
    get_db().sessions.update_many({"teamId": team_id, "appId": app_id}, {"$set": {"sharingConfig.mode": mode}})


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
    return _tombstone({"_id": session_id, **scope_filter(scope), **ENDED, **NOT_DELETED}, session_id)


def _tombstone(query: dict[str, Any], session_id: ObjectId) -> bool:
    """Hide the session `query` matches at once and remove its transcript and Idempotency-Key records; False when
    nothing matched."""
    db = get_db()
    done = db.sessions.find_one_and_update(
        query, {"$set": {"deletedAt": utcnow()}, "$unset": {"pendingEvents": ""}}, projection={"_id": 1}
    )
    if done is None:
        return False
    db.session_events.delete_many({"sessionId": session_id})
    db.idempotency_keys.delete_many({"sessionId": session_id})
    return True


def _note_purged(session_ids: Sequence[ObjectId]) -> None:
    """Record that these sessions are about to be gone for good (before they are: a purge that dies midway is
    done again, and noted again), so `remove_orphan_events` knows whose late events to look for."""
    if not session_ids:
        return
    now = utcnow()
    try:
        get_db().purged_sessions.insert_many([{"_id": i, "purgedAt": now} for i in session_ids], ordered=False)
    except BulkWriteError as exc:
        if any(error.get("code") != DUPLICATE_KEY for error in exc.details.get("writeErrors", [])):
            raise  # only a purge noted before (and then interrupted) is expected here


def purge_tombstones(deleted_before: datetime, limit: int = 500) -> int:
    """Remove sessions deleted before `deleted_before` for good, with anything written to them since (the events
    first: a late writer that finds its session gone afterwards removes what it wrote itself)."""
    db = get_db()
    with pymongo.timeout(LONG_OPERATION):
        ids = [doc["_id"] for doc in db.sessions.find({"deletedAt": before(deleted_before)}, {"_id": 1}).limit(limit)]
        for chunk in chunked(ids):
            _note_purged(chunk)
            db.session_events.delete_many({"sessionId": {"$in": chunk}})
            db.idempotency_keys.delete_many({"sessionId": {"$in": chunk}})
            db.sessions.delete_many({"_id": {"$in": chunk}, "deletedAt": {"$exists": True}})
    return len(ids)


def unsettled(written_since: datetime, written_before: datetime, limit: int = 5000) -> list[dict[str, Any]]:
    """Sessions (not deleted) whose last transcript write happened in the window, oldest first, with the ids of
    that write's events (the events themselves are read only for a session that needs them)."""
    query = {
        "lastUpdatedDate": {"$gte": written_since, "$lte": written_before},
        "pendingEvents.0": {"$exists": True},
        **NOT_DELETED,
    }
    projection = {"teamId": 1, "eventSeq": 1, "pendingEvents._id": 1}
    return list(get_db().sessions.find(query, projection).sort("lastUpdatedDate", 1).limit(limit))


# What stands in for a transcript entry that can no longer be recovered (its writer, and the next writer too,
# died between their two writes): an empty piece of output, so the transcript stays gap-free.
LOST_ENTRY: dict[str, Any] = {"type": "output", "role": "agent", "text": "", "lost": True}


def materialise_pending(sessions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Store the events of each session's last write that were never stored (sessions from `unsettled`), and a
    stand-in for any older entry missing with them; returns the events stored. (Every write inserts the batch
    before it too, so when a session's last batch is stored, so is everything before it.)"""
    started = time.monotonic()
    last = {s["_id"]: s["pendingEvents"][-1]["_id"] for s in sessions if s.get("pendingEvents")}
    present: set[ObjectId] = set()
    for chunk in chunked(list(last.values())):
        present |= {doc["_id"] for doc in get_db().session_events.find({"_id": {"$in": chunk}}, {"_id": 1})}
    stored: list[dict[str, Any]] = []
    for light in sessions:
        if light["_id"] not in last or last[light["_id"]] in present:
            continue
        projection = {"teamId": 1, "eventSeq": 1, "pendingEvents": 1}
        session = get_db().sessions.find_one({"_id": light["_id"], **NOT_DELETED}, projection)
        if session is None or not session.get("pendingEvents"):
            continue
        batch = pending_batch(session)
        inserted = insert_events(batch)
        stored += [event for event in batch if event["_id"] in inserted]
        stored += _fill_gaps(session)
        _check_late_write(session["_id"], started)
    return stored


def _fill_gaps(session: dict[str, Any]) -> list[dict[str, Any]]:
    """Stand-ins for the entries missing below the session's last reserved `seq`."""
    seqs = {doc["seq"] for doc in get_db().session_events.find({"sessionId": session["_id"]}, {"seq": 1})}
    now = utcnow()
    gaps = [seq for seq in range(1, int(session.get("eventSeq", 0)) + 1) if seq not in seqs]
    missing = [{**LOST_ENTRY, "_id": ObjectId(), "createdAt": now} for _ in gaps]
    missing = _materialised(session["teamId"], session["_id"], 0, missing)
    for event, seq in zip(missing, gaps, strict=True):
        event["seq"] = seq
    inserted = insert_events(missing)
    if missing:
        log.warning("session %s: %d transcript entries lost with their writers", session["_id"], len(missing))
    return [event for event in missing if event["_id"] in inserted]


def remove_orphan_events(purged_since: datetime) -> int:
    """Remove the transcript events of sessions purged since `purged_since`; returns how many. What this finds is
    the insert of a writer that landed after its session was purged and whose writer died before
    `_check_late_write` could take it back. Cost: one read of the purges since then (none, mostly), and per
    IN_CHUNK of them one read of `_id`s and one delete over the events' `(sessionId, seq)` index: nothing in
    proportion to the transcripts written meanwhile, as a look at every recent event's session was.

    A purge is noted before its session goes, so a noted session whose removal was cut off still has its document
    (a tombstone, which the purge is done again for, or a failed start that lived on and runs): only the events of
    a session with no document left are removed."""
    db = get_db()
    removed = 0
    with pymongo.timeout(LONG_OPERATION):
        purged = [doc["_id"] for doc in db.purged_sessions.find({"purgedAt": {"$gte": purged_since}}, {"_id": 1})]
        for chunk in chunked(purged):
            present = {doc["_id"] for doc in db.sessions.find({"_id": {"$in": chunk}}, {"_id": 1})}
            gone = [session_id for session_id in chunk if session_id not in present]
            if gone:
                removed += int(db.session_events.delete_many({"sessionId": {"$in": gone}}).deleted_count)
    return removed


def existing_sessions(session_ids: Sequence[ObjectId]) -> set[ObjectId]:
    """Which of these sessions exist and are not deleted (a system-wide check, for the reaper's sweeps)."""
    found: set[ObjectId] = set()
    for chunk in chunked(list(session_ids)):
        found |= {doc["_id"] for doc in get_db().sessions.find({"_id": {"$in": chunk}, **NOT_DELETED}, {"_id": 1})}
    return found


def turn_states(session_ids: Sequence[ObjectId]) -> dict[ObjectId, dict[str, Any]]:
    """Status and active turn of these sessions (not deleted), for the reaper's sweep of the queue."""
    found: dict[ObjectId, dict[str, Any]] = {}
    for chunk in chunked(list(session_ids)):
        query = {"_id": {"$in": chunk}, **NOT_DELETED}
        for doc in get_db().sessions.find(query, {"status": 1, "activeTurnId": 1}):
            found[doc["_id"]] = doc
    return found


def find_past_deadline(now: datetime, limit: int = 1000) -> list[dict[str, Any]]:
    """Live sessions whose limit deadline (queue TTL, turn duration, idle timeout) has passed."""
    query = {"deadline": before(now), **LIVE, **NOT_DELETED}
    projection = {"teamId": 1, "deadline": 1, "deadlineReason": 1, "status": 1}
    return list(get_db().sessions.find(query, projection).limit(limit))


def find_unqueued_turns(queued_before: datetime, limit: int = 1000) -> list[dict[str, Any]]:
    """Sessions with a turn waiting for a worker since before `queued_before` (its job may have been lost)."""
    query = {
        "turnQueuedAt": before(queued_before),
        "activeTurnId": {"$ne": None},
        "unansweredSince": {"$exists": False},  # its create answered an error: removed, not queued again
        **LIVE,
        **NOT_DELETED,
    }
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
    deletion, and what ending a cancelled turn needs (its cancellation, the turn it names). One query per chunk
    of ids."""
    found: list[dict[str, Any]] = []
    projection = {
        "cancelledAt": 1,
        "cancellation": 1,
        "activeTurnId": 1,
        "status": 1,
        "deletedAt": 1,
        "interruptTurnId": 1,
        "deadline": 1,
        "deadlineReason": 1,
    }
    for chunk in chunked(list(teams_by_session)):
        found.extend(get_db().sessions.find(_in_teams(teams_by_session, chunk), projection))
    return found


def transcript_heads(teams_by_session: Mapping[ObjectId, ObjectId]) -> dict[ObjectId, int]:
    """The last reserved `seq` of each of these sessions (session id → team id) that is not deleted: what a web
    process's live streams check their notices against. One query per chunk of ids, on `_id`."""
    heads: dict[ObjectId, int] = {}
    for chunk in chunked(list(teams_by_session)):
        query = {**_in_teams(teams_by_session, chunk), **NOT_DELETED}
        for doc in get_db().sessions.find(query, {"eventSeq": 1}):
            heads[doc["_id"]] = int(doc.get("eventSeq", 0))
    return heads


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
