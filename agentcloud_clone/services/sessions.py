"""Sessions: every rule of a session's life. Views, turn jobs, the reaper and the CLI all come through here.

- Every write is conditional on the session still being live, so an ended session never changes again.
- A state change and the transcript entries that record it go in one write that also reserves the entries'
  `seq` (`repositories.sessions.append_events`): the transcript is gap-free, and whoever ends a session
  writes its one closing `status` event.
- A cancel stamps `cancelledAt` once. A session no worker has claimed ends at once (its queued job is
  dropped); a running one is ended by its worker, which notices the stamp within a poll interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bson import ObjectId
from redis import RedisError

from .. import queueing
from ..access import Actor
from ..errors import Conflict, NotFound, Unavailable
from ..repositories import sessions as repo
from ..repositories.sessions import NOT_CANCELLED, TeamScope
from ..timeutil import utcnow
from ..vocabulary import (
    CLAIMABLE_STATUSES,
    ENDED_STATUSES,
    STATUS_FOR_END,
    CancelSource,
    EndReason,
    EventType,
    Status,
)

log = logging.getLogger(__name__)
CLAIMABLE: dict[str, Any] = {"status": {"$in": list(CLAIMABLE_STATUSES)}}
QUEUE_DOWN = "The job queue is unavailable; try again shortly."
# How many times a write that lost a race to another writer is tried again before giving up.
RETRIES = 5


@dataclass(frozen=True)
class CancelOutcome:
    """What a cancel request found and did."""

    session: dict[str, Any]
    already_cancelled: bool = False
    already_ended: bool = False


# --- reading -----------------------------------------------------------------------------------------------


def get_session(scope: TeamScope, session_id: ObjectId) -> dict[str, Any]:
    """The session in the team (or teams); NotFound when it is not there (wherever else it may be)."""
    session = repo.find_session_in_teams(scope, session_id)
    if session is None:
        raise NotFound("No such session in this team." if not isinstance(scope, list) else "No such session.")
    return session


def is_ended(session: dict[str, Any]) -> bool:
    """True once the session has reached a final status."""
    return session.get("status") in ENDED_STATUSES


def state_of(session: dict[str, Any]) -> dict[str, Any]:
    """The session with the states derived from it: `cancelling` while a stamped session's turn is still being
    stopped, `turnInFlight` while a turn is queued or running."""
    live = not is_ended(session)
    return {
        **session,
        "cancelling": live and bool(session.get("cancelledAt")),
        "turnInFlight": live and session.get("activeTurnId") is not None,
    }


def list_sessions_page(
    team_ids: list[ObjectId], before: ObjectId | None, limit: int, status: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of sessions, newest first, and the `before` cursor of the next page (None on the last)."""
    page = repo.list_sessions(team_ids, before=before, limit=limit + 1, status=status)
    next_before = str(page[limit - 1]["_id"]) if len(page) > limit else None
    return page[:limit], next_before


def transcript_is_final(session: dict[str, Any], last_seq_read: int) -> bool:
    """True once the session has ended and the reader has every event up to its closing one, so it can stop
    polling. (The closing event is the last `seq` the ending write reserved.)"""
    return is_ended(session) and last_seq_read >= int(session.get("eventSeq", 0))


# --- starting work -------------------------------------------------------------------------------------------


def _message_event(text: str, turn_id: ObjectId, actor: Actor) -> dict[str, Any]:
    return {"type": EventType.MESSAGE, "role": "user", "text": text, "turnId": str(turn_id), "by": actor.account_id}


def _enqueue(session_id: ObjectId, team_id: ObjectId, turn_id: ObjectId) -> None:
    queueing.enqueue_turn(str(team_id), str(session_id), str(turn_id))


def create_session(
    team: dict[str, Any], actor: Actor, app: dict[str, Any], name: str | None, message: str | None
) -> dict[str, Any]:
    """A new `started` session from the team's app; with a first message, its first turn is queued.

    When the turn cannot be queued the session is removed again and Unavailable raised: an error answer
    leaves nothing behind."""
    now = utcnow()
    turn_id = ObjectId() if message else None
    doc: dict[str, Any] = {
        "orgId": team["orgId"],
        "teamId": team["_id"],
        "appId": app["_id"],
        "name": name or app["name"],
        "status": Status.STARTED,
        "startDate": now,
        "lastUpdatedDate": now,
        "tokensUsed": 0,
        "previewLabel": (message or "")[:80] or None,
        "sharingConfig": {"mode": "team"},
        "createdBy": actor.account_id,
        "activeTurnId": turn_id,
    }
    events = [_message_event(message, turn_id, actor)] if message and turn_id else []
    session = repo.insert_session(doc, events)
    if turn_id is not None:
        try:
            _enqueue(session["_id"], team["_id"], turn_id)
        except RedisError:
            repo.delete_new_session(team["_id"], session["_id"])
            raise Unavailable(QUEUE_DOWN) from None
    return session


def send_message(team_id: ObjectId, session_id: ObjectId, actor: Actor, text: str) -> dict[str, Any]:
    """Record a message and queue the turn that answers it; Conflict when the session has ended or a turn is
    in flight. When the turn cannot be queued the message is taken back and Unavailable raised."""
    turn_id = ObjectId()
    written = repo.append_events(
        team_id,
        session_id,
        [_message_event(text, turn_id, actor)],
        where={"activeTurnId": None, **NOT_CANCELLED},
        set_fields={"activeTurnId": turn_id},
    )
    if written is None:
        current = get_session(team_id, session_id)
        if is_ended(current) or current.get("cancelledAt"):
            raise Conflict("This session has ended; start a new one.")
        raise Conflict("A turn is already in flight; wait for it or cancel it.")
    _, after, (event,) = written
    try:
        _enqueue(session_id, team_id, turn_id)
    except RedisError:
        _take_back_message(team_id, session_id, turn_id, event)
        raise Unavailable(QUEUE_DOWN) from None
    return after


def _take_back_message(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, event: dict[str, Any]) -> None:
    """Undo a message whose turn could not be queued. The event goes first and the `seq` is given back only if
    nothing was written since; if something was (a cancel), the event is put back so the transcript keeps
    no gap, and the session, which that write ended, keeps the message."""
    repo.remove_event(session_id, event["_id"])
    if not repo.release_turn(team_id, session_id, turn_id, event["seq"]):
        repo.restore_event(event)


# --- cancelling ------------------------------------------------------------------------------------------------


def _closing_event(reason: EndReason, message: str, turn_id: Any = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": EventType.STATUS,
        "status": STATUS_FOR_END[reason],
        "endReason": reason,
        "message": message,
    }
    if turn_id is not None:
        event["turnId"] = str(turn_id)
    return event


def _ending(reason: EndReason, now: Any) -> dict[str, Any]:
    """The fields every end sets, whoever ends the session."""
    return {"status": STATUS_FOR_END[reason], "endReason": reason, "endedAt": now, "activeTurnId": None}


def cancel_session(
    scope: TeamScope,
    session_id: ObjectId,
    actor: Actor,
    source: CancelSource,
    reason: str | None = None,
    *,
    end_reason: EndReason = EndReason.CANCELLED,
) -> CancelOutcome:
    """Stamp `cancelledAt` once, with a `cancellation` record (who, from where, why, when).

    A session no worker has claimed ends at once and its queued turn is dropped from the queue; a running one
    is ended by its worker. At most three MongoDB round trips; a repeat never moves the stamp. NotFound when
    the session is not in `scope`."""
    now = utcnow()
    cancellation: dict[str, Any] = {
        "by": actor.as_doc(),
        "source": source,
        "requestedAt": now,
        "endReason": end_reason,
    }
    if reason:
        cancellation["reason"] = reason
    cancel_event: dict[str, Any] = {"type": EventType.CANCEL, "by": actor.account_id, "at": now, "source": source}
    if reason:
        cancel_event["reason"] = reason
    stamp = {"cancelledAt": now, "cancelledBy": actor.account_id}
    for _ in range(RETRIES):
        # Running: its worker ends it. Tried first, as the case a cancel is mostly for.
        stamped = repo.append_events(
            scope,
            session_id,
            [cancel_event],
            where={"status": Status.RUNNING, **NOT_CANCELLED},
            set_fields={**stamp, "cancellation": cancellation},
        )
        if stamped is not None:
            queueing.publish_cancel(str(session_id))
            return CancelOutcome(stamped[1])
        # Idle, or a turn queued that no worker has claimed: nobody else would end it, so it ends now. The claim
        # requires no stamp, so either the worker claimed first (the write above applies next time round) or
        # this wins and the worker skips the turn.
        ended = repo.append_events(
            scope,
            session_id,
            [cancel_event, _closing_event(end_reason, _cancel_message(end_reason, reason))],
            where={**CLAIMABLE, **NOT_CANCELLED},
            set_fields={**stamp, "cancellation": {**cancellation, "completedAt": now}, **_ending(end_reason, now)},
        )
        if ended is not None:
            before, after, _ = ended
            if before.get("activeTurnId") is not None:
                queueing.drop_queued_turn(str(before["activeTurnId"]))
            return CancelOutcome(after)
        current = get_session(scope, session_id)
        if current.get("cancelledAt"):
            return CancelOutcome(current, already_cancelled=True)
        if is_ended(current):
            return CancelOutcome(current, already_ended=True)
        # Live and unstamped, but its status changed between the two writes (a turn was claimed or finished).
    raise Conflict("The session changed while it was being cancelled; try again.")


def _cancel_message(end_reason: EndReason, reason: str | None) -> str:
    base = {
        EndReason.CANCELLED: "Cancelled.",
        EndReason.EXPIRED: "Ended by a time limit.",
        EndReason.BUDGET_EXCEEDED: "Ended: the token budget was reached.",
        EndReason.TIMED_OUT: "The turn ran over its time limit.",
    }.get(end_reason, "Ended.")
    return f"{base[:-1]}: {reason}" if reason else base


# --- the turn's side: claim, output, complete, end ----------------------------------------------------------


def claim_turn(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, worker_id: str) -> dict[str, Any] | None:
    """Mark a queued turn running on this worker, once. None when it cannot start: the session ended, was
    cancelled or deleted, or another worker already claimed it (a job RQ handed out again)."""
    now = utcnow()
    return repo.update_session(
        team_id,
        session_id,
        {"activeTurnId": turn_id, **CLAIMABLE, **NOT_CANCELLED},
        {"$set": {"status": Status.RUNNING, "workerId": worker_id, "heartbeatAt": now, "turnStartedAt": now}},
    )


def record_output(
    team_id: ObjectId,
    session_id: ObjectId,
    turn_id: ObjectId,
    texts: list[str],
    tokens: int,
    *,
    interrupted: bool = False,
) -> list[dict[str, Any]] | None:
    """Append output pieces of the running turn (two round trips however many); None when the session is no
    longer running this turn (ended, or deleted), which tells the worker to stop."""
    events: list[dict[str, Any]] = [
        {"type": EventType.OUTPUT, "role": "agent", "text": text, "turnId": str(turn_id)} for text in texts
    ]
    if not events:
        return []
    if tokens:
        events[-1]["tokens"] = tokens
    if interrupted:
        events[-1]["interrupted"] = True
    written = repo.append_events(
        team_id,
        session_id,
        events,
        where={"activeTurnId": turn_id, "status": Status.RUNNING},
        inc={"tokensUsed": tokens},
        projection={"eventSeq": 1, "tokensUsed": 1},
    )
    return None if written is None else written[2]


def mark_interrupted(session_id: ObjectId, event_id: ObjectId) -> None:
    """Mark an output event as cut off (its turn was stopped after it was written)."""
    repo.mark_event(session_id, event_id, interrupted=True)


def complete_turn(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, *, end_session: bool) -> bool:
    """Finish a turn that ran to its end: the session waits for the next message, or ends `completed` when
    the agent said so. False when a cancel (or anything else) got there first; that then decides the end."""
    where = {"activeTurnId": turn_id, "status": Status.RUNNING, **NOT_CANCELLED}
    if end_session:
        event = _closing_event(EndReason.COMPLETED, "The agent ended the session.", turn_id)
        written = repo.append_events(
            team_id, session_id, [event], where=where, set_fields=_ending(EndReason.COMPLETED, utcnow())
        )
    else:
        event = {"type": EventType.TURN_END, "turnId": str(turn_id), "status": Status.WAITING}
        written = repo.append_events(
            team_id, session_id, [event], where=where, set_fields={"status": Status.WAITING, "activeTurnId": None}
        )
    return written is not None


def end_turn(
    team_id: ObjectId,
    session_id: ObjectId,
    turn_id: ObjectId | None,
    reason: EndReason,
    message: str,
    *,
    where: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """End a live session whose active turn is `turn_id` (None: whatever it is), with its closing event.

    A session that was cancelled ends as its cancellation asked (cancelled, or the limit's reason), whatever
    stopped the turn; otherwise with `reason`. None when it had already ended or moved on to another turn."""
    for _ in range(RETRIES):
        current = repo.find_session(team_id, session_id)
        if current is None or is_ended(current):
            return None
        if turn_id is not None and current.get("activeTurnId") != turn_id:
            return None
        now = utcnow()
        cancelled_at = current.get("cancelledAt")
        ending_reason, text, extra = reason, message, {}
        if cancelled_at is not None:
            cancellation = current.get("cancellation") or {}
            ending_reason = EndReason(cancellation.get("endReason", EndReason.CANCELLED))
            if reason is not EndReason.CANCELLED or ending_reason is not EndReason.CANCELLED:
                text = _cancel_message(ending_reason, cancellation.get("reason"))
                if reason is not EndReason.CANCELLED:
                    text += f" ({message})"
            extra = {"cancellation.completedAt": now}
        guard = {
            "activeTurnId": current.get("activeTurnId"),
            "cancelledAt": cancelled_at if cancelled_at is not None else {"$exists": False},
            **(where or {}),
        }
        written = repo.append_events(
            team_id,
            session_id,
            [_closing_event(ending_reason, text, current.get("activeTurnId"))],
            where=guard,
            set_fields={**_ending(ending_reason, now), **extra},
        )
        if written is not None:
            before = written[0]
            if before.get("activeTurnId") is not None and before.get("status") != Status.RUNNING:
                queueing.drop_queued_turn(str(before["activeTurnId"]))
            return written[1]
        if where:
            return None  # the caller's own condition no longer holds (a heartbeat arrived, say)
    return None


def end_turn_of_killed_job(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, detail: str) -> bool:
    """The process running this turn died: end the session now rather than when its heartbeat goes stale."""
    ended = end_turn(team_id, session_id, turn_id, EndReason.WORKER_LOST, f"Worker lost: {detail}.")
    if ended is not None:
        log.warning("session %s ended: worker lost (%s)", session_id, detail)
    return ended is not None


def reap_lost_turns(timeout: float, tombstone_grace: float = 60.0) -> list[str]:
    """End running sessions whose worker stopped heartbeating, and purge deleted sessions' tombstones.

    A system-wide sweep (it spans teams by design); each end still names the session's own team and is
    conditional on the heartbeat still being stale, so several reapers racing end a session once."""
    cutoff = utcnow() - timedelta(seconds=timeout)
    reaped = []
    for doc in repo.find_lost_turns(cutoff):
        message = f"Worker lost: no heartbeat for over {timeout:g} s; the session was ended."
        stale = {"heartbeatAt": {"$lt": cutoff}}
        if end_turn(doc["teamId"], doc["_id"], doc.get("activeTurnId"), EndReason.WORKER_LOST, message, where=stale):
            reaped.append(str(doc["_id"]))
    if reaped:
        log.warning("reaped %d sessions with lost workers: %s", len(reaped), ", ".join(reaped))
    repo.purge_tombstones(utcnow() - timedelta(seconds=tombstone_grace))
    return reaped


# --- deleting --------------------------------------------------------------------------------------------------


def delete_session(scope: TeamScope, session_id: ObjectId) -> None:
    """Remove an ended session and its whole transcript; Conflict while it is live, NotFound when not in scope."""
    if repo.tombstone_ended_session(scope, session_id):
        return
    get_session(scope, session_id)
    raise Conflict("This session is still active; cancel it first, then delete it.")
