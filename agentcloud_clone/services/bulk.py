"""Bulk cancel: an admin cancels many of a team's sessions by filter or by ids, applied by a job with the same
atomic per-session cancel, its progress readable as an operation until it is done."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from bson import ObjectId
from redis import RedisError

from .. import queueing
from ..access import Actor
from ..db import chunked
from ..errors import NotFound, Unavailable
from ..repositories import operations as repo
from ..repositories import sessions as sessions_repo
from ..timeutil import utcnow
from ..vocabulary import CancelSource, OperationStatus
from . import sessions

log = logging.getLogger(__name__)
# Sessions one operation may cancel; a larger set is several operations (or a narrower filter).
MAX_SESSIONS = 10_000
BATCH = 100


def _queries(team_id: ObjectId, criteria: dict[str, Any]) -> list[dict[str, Any]]:
    """The queries that together match the criteria: one per chunk of ids (so no `$in` list is too long)."""
    ids = criteria.get("ids")
    if not ids:
        return [sessions_repo.cancellable_query(team_id, criteria)]
    return [sessions_repo.cancellable_query(team_id, {**criteria, "ids": chunk}) for chunk in chunked(list(ids))]


def count(team_id: ObjectId, criteria: dict[str, Any]) -> int:
    """How many live sessions of the team a bulk cancel with these criteria would cancel now (a dry run)."""
    return sum(sessions_repo.count_matching(query) for query in _queries(team_id, criteria))


def start_bulk_cancel(team_id: ObjectId, actor: Actor, criteria: dict[str, Any], reason: str | None) -> dict[str, Any]:
    """Record the operation and queue the job that applies it; Unavailable when the queue is down (nothing kept)."""
    now = utcnow()
    operation = repo.insert_operation(
        {
            "teamId": team_id,
            "kind": "bulk_cancel",
            "status": OperationStatus.QUEUED,
            "criteria": criteria,
            "reason": reason,
            "by": actor.as_doc(),
            "total": min(count(team_id, criteria), MAX_SESSIONS),
            "processed": 0,
            "cancelled": 0,
            "alreadyDone": 0,
            "createdAt": now,
            "lastUpdatedDate": now,
            "finishedAt": None,
        }
    )
    try:
        queueing.enqueue_bulk_cancel(str(team_id), str(operation["_id"]))
    except RedisError:
        repo.delete_operation(team_id, operation["_id"])
        raise Unavailable("The job queue is unavailable; try again shortly.") from None
    return operation


def get_operation(scope: ObjectId | list[ObjectId], operation_id: ObjectId) -> dict[str, Any]:
    """The operation; NotFound when it is not the team's."""
    operation = repo.find_operation(scope, operation_id)
    if operation is None:
        raise NotFound("No such operation in this team.")
    return operation


def _targets(team_id: ObjectId, criteria: dict[str, Any]) -> Iterator[list[ObjectId]]:
    for query in _queries(team_id, criteria):
        after = None
        while True:
            batch = sessions_repo.next_matching(query, after, BATCH)
            if not batch:
                break
            yield batch
            after = batch[-1]


def apply_bulk_cancel(team_id: ObjectId, operation_id: ObjectId) -> dict[str, Any]:
    """Cancel every matching session, one atomic cancel each, recording progress after every batch."""
    operation = get_operation(team_id, operation_id)
    if operation["status"] == OperationStatus.DONE:
        return operation
    repo.update_operation(team_id, operation_id, {"$set": {"status": OperationStatus.RUNNING}})
    actor = Actor.from_doc(operation["by"])
    processed = cancelled = already = 0
    for batch in _targets(team_id, operation["criteria"]):
        for session_id in batch:
            if processed >= MAX_SESSIONS:
                break
            try:
                outcome = sessions.cancel_session(team_id, session_id, actor, CancelSource.BULK, operation["reason"])
            except NotFound:
                outcome = None  # deleted meanwhile
            processed += 1
            if outcome is not None and not (outcome.already_cancelled or outcome.already_ended):
                cancelled += 1
            else:
                already += 1
        repo.update_operation(
            team_id,
            operation_id,
            {"$set": {"processed": processed, "cancelled": cancelled, "alreadyDone": already}},
        )
        if processed >= MAX_SESSIONS:
            break
    done = repo.update_operation(
        team_id, operation_id, {"$set": {"status": OperationStatus.DONE, "finishedAt": utcnow(), "total": processed}}
    )
    log.info("bulk cancel %s done: %d cancelled, %d already ended", operation_id, cancelled, already)
    return done or operation
