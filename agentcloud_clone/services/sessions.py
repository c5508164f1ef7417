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
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pymongo
from bson import ObjectId
from flask import current_app
from pymongo.errors import PyMongoError
from redis import RedisError

from .. import notices, queueing
from ..access import SYSTEM, Actor
from ..db import LONG_OPERATION
from ..errors import Conflict, NotFound, Unavailable
from ..repositories import apps as apps_repo
from ..repositories import sessions as repo
from ..repositories.sessions import NOT_CANCELLED, TeamScope, Visible
from ..timeutil import utcnow
from ..vocabulary import (
    CLAIMABLE_STATUSES,
    ENDED_STATUSES,
    MAX_QUEUED_TURNS,
    SHARING_MODES,
    STATUS_FOR_END,
    CancelSource,
    EndReason,
    EventType,
    OnBusy,
    SharingMode,
    Status,
)
from . import accounts, idempotency, webhooks

log = logging.getLogger(__name__)
CLAIMABLE: dict[str, Any] = {"status": {"$in": list(CLAIMABLE_STATUSES)}}
QUEUE_DOWN = "The job queue is unavailable; try again shortly."
START_LOST = "The session could not be started; try again."
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


def find_created_session(team_id: ObjectId, session_id: ObjectId) -> dict[str, Any] | None:
    """The session a create made in the team, or None (no permission checks: for what the caller created itself).
    One whose create answered an error (still unanswered) is None too: the reaper removes it, and a retry makes
    its own."""
    session = repo.find_session(team_id, session_id)
    return None if session is None or session.get("unansweredSince") else session


def is_ended(session: dict[str, Any]) -> bool:
    """True once the session has reached a final status."""
    return session.get("status") in ENDED_STATUSES


def state_of(session: dict[str, Any]) -> dict[str, Any]:
    """The session with the states derived from it: `cancelling` while a stamped session's turn is still being
    stopped, `turnInFlight` while a turn is queued or running, `queued` while it waits for a worker, and how
    many messages wait behind it."""
    live = not is_ended(session)
    in_flight = live and session.get("activeTurnId") is not None
    return {
        **session,
        "cancelling": live and bool(session.get("cancelledAt")),
        "turnInFlight": in_flight,
        "queued": in_flight and session.get("status") in CLAIMABLE_STATUSES,
        "queuedMessages": len(session.get("queuedTurns") or []),
        "needsVariables": missing_variables(session) if live else [],
        "pendingMessage": live and session.get("pendingTurnId") is not None,
    }


def missing_variables(session: dict[str, Any]) -> list[str]:
    """The variables the session's app needs that the session does not have yet."""
    have = session.get("variables") or {}
    return [name for name in session.get("requiredVariables") or [] if name not in have]


def sharing_mode(app: dict[str, Any] | None) -> SharingMode:
    """An app's sharing mode (`team` when it has none, or is gone)."""
    return _mode(((app or {}).get("sharingConfig") or {}).get("mode"))


def _mode(value: Any) -> SharingMode:
    return SharingMode(value) if value in SHARING_MODES else SharingMode.TEAM


def list_sessions_page(
    team_ids: list[ObjectId],
    before: ObjectId | None,
    limit: int,
    status: str | None,
    viewer: ObjectId | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of sessions, newest first, and the `before` cursor of the next page (None on the last); with a
    `viewer`, only those it may see (other people's sessions of `owner`-mode apps are not)."""
    page = repo.list_sessions(team_ids, before=before, limit=limit + 1, status=status, viewer=viewer)
    next_before = str(page[limit - 1]["_id"]) if len(page) > limit else None
    return page[:limit], next_before


def events_after(
    session: dict[str, Any], after: int, limit: int, *, after_event: ObjectId | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The session's transcript events after a cursor, oldest first, and the `seq` the page starts after: `after`
    (a `seq`), or `after_event` (an event's `_id`, Agentcloud's `messageId`), resolved to its `seq` with one `_id`
    lookup scoped to the session; NotFound when the session has no such event. Both use the `(sessionId, seq)`
    index. A reader already past the session's last reserved `seq` (`eventSeq`, as read with the session) is
    answered without a query: no event can come after it yet (a poll of an idle session costs no transcript read)."""
    session_id = session["_id"]
    if after_event is not None:
        seq = repo.event_seq(session_id, after_event)
        if seq is None:
            raise NotFound("No message with this id in this session (messageId names one of its transcript events).")
        after = seq
    last_reserved = session.get("eventSeq")
    if isinstance(last_reserved, int) and after >= last_reserved:
        return [], after
    return repo.list_events(session_id, after=after, limit=limit), after


def transcript_is_final(session: dict[str, Any], last_seq_read: int) -> bool:
    """True once the session has ended and the reader has every event up to its closing one, so it can stop
    polling. (The closing event is the last `seq` the ending write reserved.)"""
    return is_ended(session) and last_seq_read >= int(session.get("eventSeq", 0))


def _append(
    scope: TeamScope, session_id: ObjectId, events: list[dict[str, Any]], **changes: Any
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
    """`repositories.sessions.append_events`, announcing what was written without waiting for anyone to hear it,
    as soon as the write is committed (before its events' insert, one store round trip sooner): to live streams,
    unless the write before it may still have events to store (both are announced then once stored, in order),
    and to webhooks in any case (each delivery stands alone; the earlier write's events, when this one had to
    store them, are announced once stored, and an event announced twice is delivered once).

    A webhook's delivery is recorded, queued and claimed, each a store round trip, after this write's own insert
    was sent: what a receiver reads back on receipt includes these events unless that insert failed, and then the
    next write to the session, or the reaper, stores them. What the webhook states (say, that the session ended)
    is already true at commit."""
    at_commit: list[dict[str, Any]] = []
    streams_heard: list[bool] = []

    def announce(reserved: list[dict[str, Any]], after_earlier: bool) -> None:
        at_commit.extend(reserved)
        webhooks.on_transcript(reserved)
        if not after_earlier:
            streams_heard.append(True)
            notices.publish_events(session_id, reserved)

    written = repo.append_events(scope, session_id, events, reserved=announce, **changes)
    if written is not None:
        if not streams_heard:
            notices.publish_events(session_id, written[2])
        announced = {event["_id"] for event in at_commit}
        rest = [event for event in written[2] if event["_id"] not in announced]
        if rest:
            webhooks.on_transcript(rest)
    return written


# --- limits ----------------------------------------------------------------------------------------------------

LIMIT_FIELDS = ("queueTtl", "maxTurnSeconds", "idleTimeout", "tokenBudget")


def effective_limits(team: dict[str, Any], app: dict[str, Any]) -> dict[str, Any]:
    """The limits a new session runs under: the app's own, else its team's defaults (kept on the session, so
    later edits do not change sessions already running)."""
    team_limits, app_limits = team.get("limits") or {}, app.get("limits") or {}
    merged = {key: app_limits.get(key, team_limits.get(key)) for key in LIMIT_FIELDS}
    return {key: value for key, value in merged.items() if value is not None}


def _deadline(limits: dict[str, Any], phase: str, now: datetime) -> dict[str, Any]:
    """The deadline of the phase a session enters: a queued turn (queue TTL), a running one (turn duration),
    or waiting for input (idle timeout); none when that limit is not set."""
    setting, reason = {
        "queued": ("queueTtl", EndReason.EXPIRED),
        "running": ("maxTurnSeconds", EndReason.TIMED_OUT),
        "idle": ("idleTimeout", EndReason.EXPIRED),
    }[phase]
    seconds = limits.get(setting)
    if not seconds:
        return {"deadline": None, "deadlineReason": None}
    return {"deadline": now + timedelta(seconds=float(seconds)), "deadlineReason": reason}


def _queued(turn_id: ObjectId, limits: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The fields of a turn that waits for a worker (a message still waiting for `start` is superseded: it is
    history for this turn)."""
    return {
        "activeTurnId": turn_id,
        "turnQueuedAt": now,
        "interruptTurnId": None,
        "pendingTurnId": None,
        **_deadline(limits, "queued", now),
    }


# --- starting work -------------------------------------------------------------------------------------------


def _message_event(text: str, turn_id: ObjectId, actor: Actor, *, queued: bool = False) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": EventType.MESSAGE,
        "role": "user",
        "text": text,
        "turnId": str(turn_id),
        "by": actor.account_id,
    }
    if queued:
        event["queued"] = True
    return event


def _enqueue(session_id: ObjectId, team_id: ObjectId, turn_id: ObjectId, *, new_session: bool = False) -> None:
    """Queue the turn, then look at the session once more: an end that came between the reservation and the queue
    (a cancel, whose drop of the queued job found nothing yet) takes the job out again. Either the end's drop sees
    the job or this look sees the end, so no queue entry outlives its session.

    For a `new_session` the look also marks it answered (`unansweredSince` goes): a session still unanswered
    later is one whose create answered an error, which the reaper removes rather than queue its turn again (and
    which no worker claims). So here the look must land: it is tried again (it is idempotent, so an answer lost
    on the way costs nothing), and when it still fails, or finds the session gone, the job is taken out again and
    the error raised (PyMongoError, or Unavailable). (Left: a mark that landed with every answer lost; the turn then
    runs for a request answered 503, which a retry with its Idempotency-Key recovers.)"""
    queueing.enqueue_turn(str(team_id), str(session_id), str(turn_id), accounts.team_turn_slots(team_id))
    try:
        if new_session:
            current = _confirm_new_session(team_id, session_id)
        else:
            current = repo.find_session(team_id, session_id, {"status": 1, "activeTurnId": 1})
    except PyMongoError:
        if new_session:
            queueing.drop_queued_turn(str(turn_id))
            raise
        return  # a worker skips the job of an ended session, and the reaper's sweep removes it
    if current is None or is_ended(current):
        queueing.drop_queued_turn(str(turn_id))
        if new_session and current is None:
            raise Unavailable(START_LOST)


CONFIRM_ATTEMPTS = 3


def _confirm_new_session(team_id: ObjectId, session_id: ObjectId) -> dict[str, Any] | None:
    for attempt in range(CONFIRM_ATTEMPTS - 1):
        try:
            return repo.confirm_new_session(team_id, session_id)
        except PyMongoError:
            time.sleep(0.05 * 2**attempt)
    return repo.confirm_new_session(team_id, session_id)  # the last try: its error is the create's answer


def create_session(
    team: dict[str, Any],
    actor: Actor,
    app: dict[str, Any],
    name: str | None,
    message: str | None,
    *,
    skip_run: bool = False,
    variables: dict[str, str] | None = None,
    share: dict[str, Any] | None = None,
    session_id: ObjectId | None = None,
) -> dict[str, Any]:
    """A new `started` session from the team's app; with a first message, its first turn is queued.

    With `skip_run` (Agentcloud's `skipRun`), or while the app needs variables the session lacks, no turn is
    queued: a first message is recorded as pending and `start_session` answers it. `share` records how a
    visitor from outside the team may reach the session (services.sharing). The session takes the app's sharing
    mode, which lists and loaders filter by. `session_id` is the new session's id when the caller chose it
    beforehand (an Idempotency-Key record names it first).

    When the turn cannot be queued the session is removed again and Unavailable raised: an error answer
    leaves nothing behind."""
    now = utcnow()
    variables = dict(variables or {})
    required = list(app.get("requiredVariables") or [])
    turn_id = ObjectId() if message else None
    run_now = turn_id is not None and not skip_run and all(name in variables for name in required)
    limits = effective_limits(team, app)
    mode = sharing_mode(app)
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
        "sharingConfig": {"mode": str(mode)},
        "createdBy": actor.account_id,
        "limits": limits,
        "queuedTurns": [],
        "variables": variables,
        "requiredVariables": required,
        # Unanswered until its turn is queued and the create about to succeed (see `_enqueue`).
        **(
            {**_queued(turn_id, limits, now), "unansweredSince": now}
            if run_now and turn_id
            else {"activeTurnId": None, "pendingTurnId": turn_id, **_deadline(limits, "idle", now)}
        ),
    }
    if share:
        doc["share"] = share
    if session_id is not None:
        doc["_id"] = session_id
    events = [_message_event(message, turn_id, actor)] if message and turn_id else []
    session = repo.insert_session(doc, events)
    _follow_sharing_mode(session, mode)
    if run_now and turn_id is not None:
        try:
            _enqueue(session["_id"], team["_id"], turn_id, new_session=True)
        except RedisError:
            _undo_new_session(team["_id"], session["_id"])
            raise Unavailable(QUEUE_DOWN) from None
        session.pop("unansweredSince", None)
    webhooks.on_session_started(session)
    return session


def _undo_new_session(team_id: ObjectId, session_id: ObjectId) -> None:
    """Remove a new session whose start failed; when the store fails too, it stays unanswered, and the reaper's
    `remove_unanswered_sessions` removes it instead of queuing its turn."""
    try:
        repo.delete_new_session(team_id, session_id)
    except PyMongoError as exc:
        log.warning("could not remove new session %s whose start failed (%s); the reaper will", session_id, exc)


def _follow_sharing_mode(session: dict[str, Any], mode: SharingMode) -> None:
    """An admin may change the app's mode while the session is being created: the change is copied onto the
    app's sessions (services.apps) after it is stored, and read again here after the insert, so whichever
    comes second leaves the session with the app's current mode."""
    current = _mode(apps_repo.sharing_mode(session["teamId"], session["appId"]))
    if current is not mode:
        repo.set_sharing_mode(session["teamId"], session["appId"], current)
        session["sharingConfig"] = {"mode": str(current)}


def start_session(team_id: ObjectId, session_id: ObjectId) -> dict[str, Any]:
    """Run a turn for a session that has none in flight (Agentcloud's `start`): the turn answers the message
    recorded without one (skipRun, or variables needed first), or runs on the session's variables alone.

    Conflict when the session has ended, a turn is already queued or running, or variables the app needs are
    missing. When the turn cannot be queued nothing changes and Unavailable is raised."""
    for _ in range(RETRIES):
        current = get_session(team_id, session_id)
        if is_ended(current) or current.get("cancelledAt"):
            raise Conflict("This session has ended; start a new one.")
        if current.get("activeTurnId") is not None:
            raise Conflict("A turn is already in flight; wait for it, or cancel it.")
        missing = missing_variables(current)
        if missing:
            raise Conflict(f"Set the session's variables first: {', '.join(missing)}.")
        pending = current.get("pendingTurnId")
        turn_id = pending or ObjectId()
        written = repo.append_events(
            team_id,
            session_id,
            [],
            where={"activeTurnId": None, "pendingTurnId": pending, **NOT_CANCELLED},
            set_fields=_queued(turn_id, current.get("limits") or {}, utcnow()),
        )
        if written is None:
            continue  # a message or another start got there first: look again
        try:
            _enqueue(session_id, team_id, turn_id)
        except RedisError:
            repo.release_started_turn(team_id, session_id, turn_id, pending is not None)
            raise Unavailable(QUEUE_DOWN) from None
        return written[1]
    raise Conflict("The session changed while it was being started; try again.")


def set_variables(team_id: ObjectId, session_id: ObjectId, variables: dict[str, str]) -> dict[str, Any]:
    """Replace the session's variables (Agentcloud's edit); the next turn's runner sees them. Conflict once the
    session has ended."""
    updated = repo.update_session(
        team_id,
        session_id,
        dict(NOT_CANCELLED),
        {"$set": {"variables": dict(variables), "lastUpdatedDate": utcnow()}},
    )
    if updated is not None:
        return updated
    get_session(team_id, session_id)
    raise Conflict("This session has ended; its variables can no longer change.")


def send_message(
    team_id: ObjectId,
    session_id: ObjectId,
    actor: Actor,
    text: str,
    on_busy: OnBusy = OnBusy.REJECT,
    *,
    viewer: ObjectId | None = None,
) -> dict[str, Any]:
    """Record a message and queue the turn that answers it. With a turn in flight, `on_busy` decides: reject
    (Conflict), enqueue (it runs after the current turn), or interrupt (the current turn is stopped, its
    output kept and marked interrupted, and this one runs next).

    Conflict when the session has ended or still needs variables. When a turn cannot be queued the message is
    taken back and Unavailable raised. With a `viewer`, a session it may not see is not found."""
    for _ in range(RETRIES):
        current = get_session(team_id if viewer is None else Visible(team_id, viewer), session_id)
        if is_ended(current) or current.get("cancelledAt"):
            raise Conflict("This session has ended; start a new one.")
        missing = missing_variables(current)
        if missing:
            raise Conflict(f"Set the session's variables first: {', '.join(missing)}.")
        now, turn_id = utcnow(), ObjectId()
        limits = current.get("limits") or {}
        active = current.get("activeTurnId")
        if active is None:
            written = _append(
                team_id,
                session_id,
                [_message_event(text, turn_id, actor)],
                where={"activeTurnId": None, **NOT_CANCELLED},
                set_fields=_queued(turn_id, limits, now),
            )
            if written is None:
                continue  # a turn started meanwhile: look again
            after, event = written[1], written[2][-1]
            try:
                _enqueue(session_id, team_id, turn_id)
            except RedisError:
                _take_back_message(team_id, session_id, turn_id, event)
                raise Unavailable(QUEUE_DOWN) from None
            return after
        if on_busy is OnBusy.REJECT:
            raise Conflict("A turn is already in flight; wait for it, cancel it, or send with onBusy.")
        if len(current.get("queuedTurns") or []) >= MAX_QUEUED_TURNS:
            raise Conflict(f"{MAX_QUEUED_TURNS} messages are already waiting; wait for some to be answered.")
        interrupt = on_busy is OnBusy.INTERRUPT
        written = _append(
            team_id,
            session_id,
            [_message_event(text, turn_id, actor, queued=True)],
            where={"activeTurnId": active, **NOT_CANCELLED},
            # An interrupting message goes to the front of the line and asks the turn in flight to stop.
            push={"queuedTurns": {"$each": [turn_id], "$position": 0} if interrupt else turn_id},
            set_fields={"interruptTurnId": active} if interrupt else None,
            # An interrupt wakes the worker running the turn as soon as it is stored.
            committed=(lambda: queueing.publish_cancel(str(session_id))) if interrupt else None,
        )
        if written is None:
            continue  # the turn in flight finished meanwhile: look again
        return written[1]
    raise Conflict("The session changed while the message was being sent; try again.")


def _take_back_message(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, event: dict[str, Any]) -> None:
    """Undo a message whose turn could not be queued, if nothing was written since (otherwise the session, which
    that write changed, keeps the message). The session gives back the `seq` first and the event goes after:
    until the first write the message is the session's last write, which anyone may store again (the reaper's
    repair, the next writer), so removing the event before would let it come back above the session's `seq`.
    A leftover of a writer that dies in between gives way to the next event reserved for its `seq`."""
    if repo.release_turn(team_id, session_id, turn_id, event["seq"]):
        repo.remove_event(session_id, event["_id"])


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
    return {
        "status": STATUS_FOR_END[reason],
        "endReason": reason,
        "endedAt": now,
        "activeTurnId": None,
        "turnQueuedAt": None,
        "deadline": None,
        "deadlineReason": None,
    }


def cancel_session(
    scope: TeamScope,
    session_id: ObjectId,
    actor: Actor,
    source: CancelSource,
    reason: str | None = None,
    *,
    end_reason: EndReason = EndReason.CANCELLED,
    guard: dict[str, Any] | None = None,
) -> CancelOutcome:
    """Stamp `cancelledAt` once, with a `cancellation` record (who, from where, why, when).

    A session no worker has claimed ends at once and its queued turn is dropped from the queue; a running one
    is ended by its worker. At most three MongoDB round trips; a repeat never moves the stamp. NotFound when
    the session is not in `scope`. Limits pass the reason they end the session with (`end_reason`) and a
    `guard` that must still hold (the deadline they saw), so a session that moved on is left alone."""
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
        # The worker hears of the stamp as soon as it is stored, before the cancel event is inserted.
        stamped = _append(
            scope,
            session_id,
            [cancel_event],
            where={"status": Status.RUNNING, **NOT_CANCELLED, **(guard or {})},
            set_fields={**stamp, "cancellation": cancellation},
            committed=lambda: queueing.publish_cancel(
                str(session_id), {"cancelledAt": now, "cancellation": cancellation}
            ),
        )
        if stamped is not None:
            return CancelOutcome(stamped[1])
        # Idle, or a turn queued that no worker has claimed: nobody else would end it, so it ends now. The claim
        # requires no stamp, so either the worker claimed first (the write above applies next time round) or
        # this wins and the worker skips the turn.
        ended = _append(
            scope,
            session_id,
            [cancel_event, _closing_event(end_reason, _cancel_message(end_reason, reason))],
            where={**CLAIMABLE, **NOT_CANCELLED, **(guard or {})},
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
        if guard:
            return CancelOutcome(current, already_ended=False)  # the limit no longer applies: nothing done
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
    cancelled or deleted, another worker already claimed it (a job RQ handed out again), or it was interrupted
    by a newer message before it started (then the next waiting turn is queued instead)."""
    for _ in range(RETRIES):
        current = _answered(team_id, session_id, repo.find_session(team_id, session_id))
        if current is None or is_ended(current) or current.get("activeTurnId") != turn_id:
            return None
        if current.get("status") == Status.RUNNING and current.get("workerId") == worker_id:
            # This worker's own claim, whose answer was lost (MongoDB hung or the connection broke): it holds.
            return current
        if current.get("status") not in CLAIMABLE_STATUSES or current.get("cancelledAt"):
            return None
        if current.get("interruptTurnId") == turn_id:
            _advance(team_id, session_id, turn_id, interrupted=True, started=False)
            return None
        now = utcnow()
        remaining = _remaining_budget(current)
        if remaining is not None and remaining <= 0:
            cancel_session(
                team_id, session_id, SYSTEM, CancelSource.LIMIT, BUDGET_SPENT, end_reason=EndReason.BUDGET_EXCEEDED
            )
            return None
        claimed = repo.update_session(
            team_id,
            session_id,
            {
                "activeTurnId": turn_id,
                **CLAIMABLE,
                **NOT_CANCELLED,
                "interruptTurnId": {"$ne": turn_id},
                "unansweredSince": {"$exists": False},
            },
            {
                "$set": {
                    "status": Status.RUNNING,
                    "workerId": worker_id,
                    "heartbeatAt": now,
                    "turnStartedAt": now,
                    "turnQueuedAt": None,
                    **_deadline(current.get("limits") or {}, "running", now),
                }
            },
        )
        if claimed is not None:
            return claimed
    return None


BUDGET_SPENT = "The session's token budget is spent."
# How long a worker that took a new session's turn waits for its create to be answered (the look after queuing
# marks it; a worker is often faster than that look), before leaving the turn to the reaper.
ANSWER_WAIT = 5.0


def _answered(team_id: ObjectId, session_id: ObjectId, current: dict[str, Any] | None) -> dict[str, Any] | None:
    """The session once its create has been answered (at once for any other), read again while it waits for
    that, up to ANSWER_WAIT; None when it is gone or still unanswered then. A turn never runs for a create that
    answered an error: that session stays unanswered, and the reaper removes it. One left unclaimed here whose
    create did succeed (its answer took longer) is queued again by the reaper as a lost job."""
    deadline, pause = time.monotonic() + ANSWER_WAIT, 0.01
    while current is not None and current.get("unansweredSince") is not None:
        if time.monotonic() + pause > deadline:
            log.warning("session %s: its create has not been answered; its turn is left to the reaper", session_id)
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.2)
        current = repo.find_session(team_id, session_id)
    return current


def _remaining_budget(session: dict[str, Any]) -> int | None:
    budget = (session.get("limits") or {}).get("tokenBudget")
    return None if budget is None else int(budget) - int(session.get("tokensUsed", 0))


def remaining_budget(session: dict[str, Any]) -> int | None:
    """Tokens the session may still spend (None: no budget)."""
    return _remaining_budget(session)


def _output_events(turn_id: ObjectId, texts: list[str], tokens: int, *, interrupted: bool) -> list[dict[str, Any]]:
    """The transcript events of a piece of a turn's output (its tokens and its cut-off on the last)."""
    events: list[dict[str, Any]] = [
        {"type": EventType.OUTPUT, "role": "agent", "text": text, "turnId": str(turn_id)} for text in texts
    ]
    if events and tokens:
        events[-1]["tokens"] = tokens
    if events and interrupted:
        events[-1]["interrupted"] = True
    return events


def record_output(
    team_id: ObjectId,
    session_id: ObjectId,
    turn_id: ObjectId,
    texts: list[str],
    tokens: int,
    *,
    interrupted: bool = False,
    batch: str | None = None,
    event_ids: list[ObjectId] | None = None,
) -> list[dict[str, Any]] | None:
    """Append output pieces of the running turn (two round trips however many); None when the session is no
    longer running this turn (ended, or deleted), which tells the worker to stop. Only the turn's own worker
    writes its output, so the write is a heartbeat too (the watcher skips sessions written this recently).

    `batch` names this piece of output (with `event_ids`, its events' ids) so that a worker that lost the answer
    may call again with the same: the output is then written once, whichever attempt the server applied."""
    events = _output_events(turn_id, texts, tokens, interrupted=interrupted)
    if not events:
        return []
    if event_ids is not None:
        for event, event_id in zip(events, event_ids, strict=True):
            event["_id"] = event_id
    where: dict[str, Any] = {"activeTurnId": turn_id, "status": Status.RUNNING}
    if batch is not None:
        where["outputBatch"] = {"$ne": batch}
    written = _append(
        team_id,
        session_id,
        events,
        where=where,
        set_fields={"heartbeatAt": utcnow(), **({"outputBatch": batch} if batch is not None else {})},
        inc={"tokensUsed": tokens},
        projection={"eventSeq": 1, "tokensUsed": 1},
    )
    if written is not None:
        return written[2]
    if batch is None:
        return None
    # Written already by an attempt whose answer was lost? Then make sure its events are stored, and go on.
    current = repo.find_session(team_id, session_id, {"outputBatch": 1, "activeTurnId": 1, "status": 1})
    if current is None or current.get("outputBatch") != batch or current.get("activeTurnId") != turn_id:
        return None
    if current.get("status") != Status.RUNNING:
        return None
    return repo.settle_batch(team_id, session_id, [e["_id"] for e in events])


def complete_turn(
    team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, *, end_session: bool, interrupted: bool = False
) -> bool:
    """Finish a turn that ran to its end (or was interrupted by a newer message): the next waiting message's
    turn is queued, or the session waits for input, or it ends `completed` when the agent said so. False when
    a cancel (or anything else) got there first; that then decides the end."""
    if end_session and not interrupted:
        where = {"activeTurnId": turn_id, "status": Status.RUNNING, **NOT_CANCELLED}
        event = _closing_event(EndReason.COMPLETED, "The agent ended the session.", turn_id)
        ending = _ending(EndReason.COMPLETED, utcnow())
        return _append(team_id, session_id, [event], where=where, set_fields=ending) is not None
    return _advance(team_id, session_id, turn_id, interrupted=interrupted, started=True)


def _advance(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, *, interrupted: bool, started: bool) -> bool:
    """Move on from a finished (or interrupted) turn: queue the next waiting message's turn, or wait for input."""
    for _ in range(RETRIES):
        current = repo.find_session(team_id, session_id)
        if current is None or current.get("activeTurnId") != turn_id or current.get("cancelledAt"):
            return False
        now = utcnow()
        limits = current.get("limits") or {}
        waiting = list(current.get("queuedTurns") or [])
        event: dict[str, Any] = {"type": EventType.TURN_END, "turnId": str(turn_id), "status": Status.WAITING}
        if interrupted:
            event["interrupted"] = True
        where: dict[str, Any] = {
            "activeTurnId": turn_id,
            "status": Status.RUNNING if started else {"$in": list(CLAIMABLE_STATUSES)},
            **NOT_CANCELLED,
        }
        if waiting:
            where["queuedTurns.0"] = waiting[0]
            fields = {"status": Status.WAITING, **_queued(waiting[0], limits, now)}
            written = _append(team_id, session_id, [event], where=where, set_fields=fields, pop={"queuedTurns": -1})
            if written is not None:
                _enqueue_or_leave_to_reaper(team_id, session_id, waiting[0])
                return True
        else:
            where["queuedTurns.0"] = {"$exists": False}
            fields = {
                "status": Status.WAITING,
                "activeTurnId": None,
                "turnQueuedAt": None,
                "interruptTurnId": None,
                **_deadline(limits, "idle", now),
            }
            if _append(team_id, session_id, [event], where=where, set_fields=fields) is not None:
                return True
    return False


def _enqueue_or_leave_to_reaper(team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId) -> None:
    try:
        _enqueue(session_id, team_id, turn_id)
    except RedisError:
        log.warning(
            "turn %s of session %s not queued (Redis unavailable); the reaper queues it again", turn_id, session_id
        )


def end_turn(
    team_id: ObjectId,
    session_id: ObjectId,
    turn_id: ObjectId | None,
    reason: EndReason,
    message: str,
    *,
    where: dict[str, Any] | None = None,
    interrupted: bool = False,
    output: tuple[list[str], int] | None = None,
    seen: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """End a live session whose active turn is `turn_id` (None: whatever it is), with its closing event.

    A session that was cancelled ends as its cancellation asked (cancelled, or the limit's reason), whatever
    stopped the turn; otherwise with `reason`. None when it had already ended or moved on to another turn.
    `output` (texts, tokens) is the turn's last output, cut off: written in the same write, before the closing
    event, so a stopping turn ends one write sooner than if it flushed first. `seen` is the session as the caller
    last read it (the worker's cancel watcher): the first attempt starts from it, and reads the session only if
    it changed since (the write is guarded by what it decided from)."""
    texts, tokens = output or ([], 0)
    for attempt in range(RETRIES):
        current = seen if attempt == 0 and seen is not None else repo.find_session(team_id, session_id)
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
        closing = _closing_event(ending_reason, text, current.get("activeTurnId"))
        if interrupted or texts:
            closing["interrupted"] = True  # the turn's output stops short
        written = _append(
            team_id,
            session_id,
            [*_output_events(turn_id or current["activeTurnId"], texts, tokens, interrupted=True), closing],
            where=guard,
            set_fields={**_ending(ending_reason, now), **extra},
            inc={"tokensUsed": tokens} if tokens else None,
        )
        if written is not None:
            before = written[0]
            if before.get("activeTurnId") is not None and before.get("status") != Status.RUNNING:
                queueing.drop_queued_turn(str(before["activeTurnId"]))
            return written[1]
        if where:
            return None  # the caller's own condition no longer holds (a heartbeat arrived, say)
    return None


RETRY_MESSAGE = "The worker shut down before the turn finished; the turn will run again from your message."


def requeue_interrupted_turn(
    team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, max_retries: int, *, interrupted: bool
) -> str | None:
    """A worker shutting down interrupted this running turn: hand it back to the queue rather than end the session.

    The session waits for a worker again (the same turn, so its job runs again from the user's message), and the
    transcript gets a `turn_end` marked `interrupted` and `retry` (the attempt number) saying so. Each turn is
    handed back at most `max_retries` times. Returns "requeued"; "exhausted" when it has been handed back that often
    already (the caller ends it); None when the session no longer runs this turn (cancelled, ended, deleted: that
    decides the end). The caller then asks RQ to queue the job again."""
    for _ in range(RETRIES):
        current = repo.find_session(team_id, session_id)
        if current is None or is_ended(current) or current.get("cancelledAt"):
            return None
        if current.get("activeTurnId") != turn_id or current.get("status") != Status.RUNNING:
            return None
        retry_turn, retry_count = current.get("retryTurnId"), current.get("retryCount")
        count = int(retry_count or 0) if retry_turn == turn_id else 0
        if count >= max_retries:
            return "exhausted"
        now = utcnow()
        event: dict[str, Any] = {
            "type": EventType.TURN_END,
            "turnId": str(turn_id),
            "status": Status.WAITING,
            "retry": count + 1,
            "message": RETRY_MESSAGE,
        }
        if interrupted:
            event["interrupted"] = True  # the turn's output stops short
        where = {
            "activeTurnId": turn_id,
            "status": Status.RUNNING,
            **NOT_CANCELLED,
            # Optimistic: nobody else handed it back (or claimed it again) since it was read.
            "retryTurnId": retry_turn,
            "retryCount": retry_count,
        }
        fields = {
            "status": Status.WAITING,
            "turnQueuedAt": now,
            "turnStartedAt": None,
            "retryTurnId": turn_id,
            "retryCount": count + 1,
            **_deadline(current.get("limits") or {}, "queued", now),
        }
        if _append(team_id, session_id, [event], where=where, set_fields=fields) is not None:
            log.warning("turn %s of session %s interrupted by a worker shutdown; queued again (%d)", turn_id,
                        session_id, count + 1)  # fmt: skip
            return "requeued"
    return None


def end_turn_of_killed_job(
    team_id: ObjectId, session_id: ObjectId, turn_id: ObjectId, detail: str, *, only_if_silent: bool = False
) -> bool:
    """The process running this turn died: end the session now rather than when its heartbeat goes stale. With
    `only_if_silent`, only a running turn that has missed its heartbeats (a claimable one is queued again, and a
    heartbeating one is running elsewhere)."""
    where = None
    if only_if_silent:
        config = current_app.config
        # Stamps come at most 2.5 intervals apart (watcher.CancelWatcher.beat_once); the rest allows for a slow one.
        quiet = 3 * float(config["HEARTBEAT_INTERVAL"]) + float(config["CANCEL_POLL_INTERVAL"])
        where = {"status": Status.RUNNING, "heartbeatAt": repo.before(utcnow() - timedelta(seconds=quiet))}
    ended = end_turn(team_id, session_id, turn_id, EndReason.WORKER_LOST, f"Worker lost: {detail}.", where=where)
    if ended is not None:
        log.warning("session %s ended: worker lost (%s)", session_id, detail)
    return ended is not None


def enforce_deadline(team_id: ObjectId, doc: dict[str, Any]) -> bool:
    """Cancel a session whose limit deadline (`doc`'s, as just read) has passed, for the limit's reason; False
    when the session moved on meanwhile (the deadline changed) or was already cancelled."""
    reason = EndReason(doc.get("deadlineReason") or EndReason.EXPIRED)
    outcome = cancel_session(
        team_id,
        doc["_id"],
        SYSTEM,
        CancelSource.LIMIT,
        LIMIT_MESSAGES[reason],
        end_reason=reason,
        guard={"deadline": doc["deadline"]},
    )
    return (
        not outcome.already_cancelled
        and (outcome.session.get("cancellation") or {}).get("source") == CancelSource.LIMIT
    )


def enforce_deadlines() -> list[str]:
    """End sessions past a limit's deadline: a queued turn past its queue TTL (`expired`), a turn over its
    duration (`timed_out`, stopped by its worker), a session idle past its idle timeout (`expired`)."""
    return [str(doc["_id"]) for doc in repo.find_past_deadline(utcnow()) if enforce_deadline(doc["teamId"], doc)]


LIMIT_MESSAGES = {
    EndReason.EXPIRED: "A time limit of the app passed (queue TTL or idle timeout).",
    EndReason.TIMED_OUT: "The turn ran longer than the app allows.",
    EndReason.BUDGET_EXCEEDED: BUDGET_SPENT,
}


def requeue_lost_jobs(older_than: float) -> list[str]:
    """Queue again turns that have waited longer than `older_than` seconds with no job in the queue (the
    process that should have queued them died, or Redis lost the job)."""
    cutoff, requeued = utcnow() - timedelta(seconds=older_than), []
    for doc in repo.find_unqueued_turns(cutoff):
        turn = str(doc["activeTurnId"])
        # Not waiting in the queue, and not claimed this long: lost, even if RQ still has it started (a worker
        # claims a turn first thing, so one that took it and never did died, or lost Redis, before it could).
        if doc.get("status") in CLAIMABLE_STATUSES and not queueing.turn_is_waiting(turn):
            queueing.forget_taken_turn(turn)
            _enqueue(doc["_id"], doc["teamId"], doc["activeTurnId"])
            requeued.append(str(doc["_id"]))
        repo.touch_queued_turn(doc["teamId"], doc["_id"], doc["activeTurnId"], utcnow())
    if requeued:
        log.warning("queued %d lost turns again: %s", len(requeued), ", ".join(requeued))
    return requeued


def remove_unanswered_sessions(older_than: float) -> list[str]:
    """Remove sessions created more than `older_than` seconds ago whose create request answered an error (it
    failed after storing the session and could not take it back), so that no turn runs for a request its client
    was told failed; returns their ids. A worker already running one stops when it sees the deletion."""
    cutoff, removed = utcnow() - timedelta(seconds=older_than), []
    for doc in repo.find_unanswered_sessions(cutoff):
        if repo.tombstone_unanswered_session(doc["teamId"], doc["_id"], cutoff):
            removed.append(str(doc["_id"]))
    if removed:
        log.warning("removed %d sessions whose create answered an error: %s", len(removed), ", ".join(removed))
    return removed


def reap_lost_turns(timeout: float, tombstone_grace: float | None = None) -> list[str]:
    """End running sessions whose worker stopped heartbeating, and purge deleted sessions' tombstones.

    A system-wide sweep (it spans teams by design); each end still names the session's own team and is
    conditional on the heartbeat still being stale, so several reapers racing end a session once."""
    cutoff = utcnow() - timedelta(seconds=timeout)
    reaped = []
    for doc in repo.find_lost_turns(cutoff):
        message = f"Worker lost: no heartbeat for over {timeout:g} s; the session was ended."
        stale = {"heartbeatAt": repo.before(cutoff)}
        if end_turn(doc["teamId"], doc["_id"], doc.get("activeTurnId"), EndReason.WORKER_LOST, message, where=stale):
            reaped.append(str(doc["_id"]))
    if reaped:
        log.warning("reaped %d sessions with lost workers: %s", len(reaped), ", ".join(reaped))
    grace = float(current_app.config["TOMBSTONE_GRACE"]) if tombstone_grace is None else tombstone_grace
    repo.purge_tombstones(utcnow() - timedelta(seconds=grace))
    return reaped


def sweep(heartbeat_timeout: float, requeue_after: float, *, since: datetime | None = None) -> dict[str, Any]:
    """The reaper's pass: end lost turns, enforce limit deadlines, remove sessions whose create answered an error,
    queue lost jobs again, purge tombstones, and put
    right what a crash (or a lost answer) can leave behind: transcript writes whose events were never stored,
    transcript events whose session is gone, Idempotency-Key records of requests that never finished, queue
    entries of sessions that have ended. `since` bounds how far back those sweeps look (the start of the
    caller's last complete pass, less a margin).

    Each step is on its own, with LONG_OPERATION to work in (nobody waits on the reaper, and a busy store is not
    a dead one): a step that fails (MongoDB or Redis away, or too slow) is named under `failed` and the others
    still run, so a slow clean-up never keeps lost turns from being queued again."""
    config = current_app.config
    window_start = utcnow() - timedelta(seconds=float(config["REPAIR_WINDOW"]))
    since = window_start if since is None else max(since, window_start)
    steps: list[tuple[str, Callable[[], Any], Any]] = [
        ("reaped", lambda: reap_lost_turns(heartbeat_timeout), []),
        ("expired", enforce_deadlines, []),
        ("unanswered", lambda: remove_unanswered_sessions(requeue_after), []),
        ("requeued", lambda: requeue_lost_jobs(requeue_after), []),
        ("repaired", lambda: repair_transcripts(since), 0),
        ("keys", idempotency.sweep_stale, 0),
        ("orphans", lambda: remove_orphan_events(since), 0),
        ("jobs", sweep_queue, 0),
    ]
    result: dict[str, Any] = {}
    failed = []
    for name, step, nothing in steps:
        try:
            with pymongo.timeout(LONG_OPERATION):
                result[name] = step()
        except (PyMongoError, RedisError) as exc:
            log.warning("reaper step %s failed (%s); the next pass tries again", name, exc)
            result[name] = nothing
            failed.append(name)
    if failed:
        result["failed"] = failed
    return result


def repair_transcripts(since: datetime) -> int:
    """Store the events of transcript writes whose second half never landed (writes since `since`, settled for
    REPAIR_SETTLE), and announce them; returns how many events were stored."""
    settled = utcnow() - timedelta(seconds=float(current_app.config["REPAIR_SETTLE"]))
    if settled <= since:
        return 0
    stored = repo.materialise_pending(repo.unsettled(since, settled))
    for session_id in {event["sessionId"] for event in stored}:
        events = [event for event in stored if event["sessionId"] == session_id]
        notices.publish_events(session_id, events)
        webhooks.on_transcript(events)
    if stored:
        log.warning("stored %d transcript events their writers never stored", len(stored))
    return len(stored)


def remove_orphan_events(since: datetime) -> int:
    """Remove transcript events whose session is gone (not a tombstone: gone), of the sessions purged since
    `since` less TOMBSTONE_GRACE; returns how many. Such an event landed after its session's purge: looking back a
    grace further than the last pass finds one that landed since then, if its writer took that long to write it
    after the purge (one that took longer and lived removes it itself). Bounded by REPAIR_WINDOW, like the other
    sweeps."""
    config = current_app.config
    window_start = utcnow() - timedelta(seconds=float(config["REPAIR_WINDOW"]))
    purged_since = max(since - timedelta(seconds=float(config["TOMBSTONE_GRACE"])), window_start)
    removed = repo.remove_orphan_events(purged_since)
    if removed:
        log.warning("removed %d transcript events whose sessions are gone", removed)
    return removed


def sweep_queue() -> int:
    """Take out of the queue the turn jobs no session will run (it ended, was deleted, or moved on); returns how
    many. Best effort: nothing is swept while Redis is away."""
    try:
        jobs = queueing.queued_turn_jobs()
    except RedisError:
        return 0
    ids = [ObjectId(session_id) for _, session_id, _ in jobs if ObjectId.is_valid(session_id)]
    states = repo.turn_states(ids)
    dropped = 0
    for _, session_id, turn_id in jobs:
        state = states.get(ObjectId(session_id)) if ObjectId.is_valid(session_id) else None
        if state is not None and not is_ended(state) and str(state.get("activeTurnId")) == turn_id:
            continue
        try:
            dropped += bool(queueing.drop_queued_turn_now(turn_id))
        except RedisError:
            break
    if dropped:
        log.warning("took %d turn jobs of ended or deleted sessions out of the queue", dropped)
    return dropped


# --- deleting --------------------------------------------------------------------------------------------------


def delete_session(scope: TeamScope, session_id: ObjectId) -> None:
    """Remove an ended session and its whole transcript; Conflict while it is live, NotFound when not in scope."""
    if repo.tombstone_ended_session(scope, session_id):
        return
    get_session(scope, session_id)
    raise Conflict("This session is still active; cancel it first, then delete it.")
