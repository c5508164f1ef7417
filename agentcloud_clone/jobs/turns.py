"""The turn job: run the app's agent for one user message, stream its output, stop when cancelled.

Every change to the session goes through services.sessions (claim, output, complete, end); this module only
drives the runner and decides which of those to call.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis
from bson import ObjectId
from flask import Flask, current_app
from pymongo.errors import ConnectionFailure, PyMongoError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from .. import metrics, queueing
from ..access import SYSTEM
from ..db import is_unavailable, note_failure
from ..errors import InvalidInput
from ..logs import set_job_context
from ..repositories import apps as apps_repo
from ..repositories import sessions as sessions_repo
from ..sealing import UnsealError
from ..services import apps as apps_service
from ..services import sessions
from ..vocabulary import CancelSource, EndReason, EventType, Runner
from .runners import RUNNERS, Piece, RunnerError, TurnContext, TurnGrant
from .watcher import CancelHandle, watcher_for

log = logging.getLogger(__name__)
# Output events hold at most this many characters, so no write comes near MongoDB's 16 MB document limit
# whatever a runner yields.
MAX_EVENT_CHARS = 64 * 1024
# Output events per transcript write: at most 1 Mi characters (4 MiB of UTF-8) in one write.
EVENTS_PER_WRITE = 16
# A turn writes its output no more often than every WRITE_SPACING times its last write's round trip (and at
# least every MAX_SPACING): on a quiet store a write takes milliseconds and OUTPUT_FLUSH_INTERVAL holds, while
# on a saturated one every turn batches more per write, which is what lets the store catch up with the reads
# and cancels queued behind those writes.
WRITE_SPACING = 10
MAX_SPACING = 5.0
# Turns read this many of the latest transcript entries as context.
HISTORY_EVENTS = 400


# Failures to reach the installation's own parts: their text names hosts, ports and paths of the operator's network
# and machines, which the transcript (seen by the team, and by visitors of a shared session) must not show.
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (ConnectionFailure, redis.RedisError)


def _shown_error(exc: BaseException) -> str:
    """An error as a transcript may show it: its kind only when it is a failure to reach a part of the
    installation (the worker's log has the rest); otherwise its kind and text (a store's refusal says why)."""
    if isinstance(exc, UNREACHABLE_ERRORS):
        return f"{exc.__class__.__name__} (the details are in the worker's log)."
    return f"{exc.__class__.__name__}: {exc}"


def _shown_failure(exc: BaseException) -> str:
    """What the transcript says of a turn that raised: a runner's own message verbatim, anything else through
    `_shown_error` (an app's own code's errors in full)."""
    return str(exc) if isinstance(exc, RunnerError) else f"The agent failed: {_shown_error(exc)}"


class TranscriptWriteError(Exception):
    """The transcript refused a write; the turn ends `error` with this reason."""


class OutputTooLongError(Exception):
    """The turn produced more output than TURN_MAX_OUTPUT_CHARS allows."""


# Thread mode's per-job control (workers/pool.py), when a worker installs it: rq stop-job, the job's time limit
# and a worker's shutdown reach a turn through it. None in fork mode, where RQ signals the work horse instead.
_control_provider: Callable[[], Any] | None = None
STOP_MESSAGES = {
    "timeout": "The turn ran past TURN_TIMEOUT and was stopped.",
    # Only once the turn was queued again TURN_SHUTDOWN_RETRIES times (see _hand_back): the session has ended.
    "shutdown": "The worker shut down before the turn finished, and the turn had already been queued again as often "
    "as TURN_SHUTDOWN_RETRIES allows; the session was ended.",
}


class TurnRequeued(Exception):  # noqa: N818 - named for what happened, like rq's StopRequested
    """Raised by a turn that a worker's shutdown interrupted and that was handed back to the queue: RQ's own retry
    (the job's `retries_left`) queues the job again, so another worker runs the turn from the user's message."""


def set_control_provider(provider: Callable[[], Any] | None) -> None:
    """Install the function that returns the running job's control (thread mode)."""
    global _control_provider
    _control_provider = provider


def _link_control(app: Flask, cancel: CancelHandle, tid: ObjectId, sid: ObjectId) -> None:
    """Let the worker's stop reasons stop the turn: rq stop-job as an operator's cancel, a time limit or a
    shutdown as the end it names."""
    control = _control_provider() if _control_provider else None
    if control is None:
        return

    def stop() -> None:
        if control.reason == "stopped":
            with app.app_context():  # hooks run on a thread of their own
                sessions.cancel_session(tid, sid, SYSTEM, CancelSource.API, "Stopped by an operator (rq stop-job).")
            cancel.trigger("cancelled")
        else:
            cancel.trigger(control.reason)

    control.on_stop(stop)


def worker_id() -> str:
    """Host and pid of the process running the turn (after any fork)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _split(text: str) -> list[str]:
    return [text[i : i + MAX_EVENT_CHARS] for i in range(0, len(text), MAX_EVENT_CHARS)] or [""]


class OutputWriter:
    """Batches streamed pieces into transcript events: one write per flush interval (or per MAX_EVENT_CHARS
    buffered) rather than per token, each event bounded in size, the whole turn bounded by `max_chars`."""

    def __init__(
        self, session: dict[str, Any], turn_id: ObjectId, interval: float, max_chars: int, cancel: CancelHandle
    ) -> None:
        self.team_id, self.session_id, self.turn_id = session["teamId"], session["_id"], turn_id
        self.interval, self.max_chars, self.cancel = interval, max_chars, cancel
        # Tokens this turn may spend before the session's budget is reached (None: no budget).
        self.budget = sessions.remaining_budget(session)
        self.buffer: list[str] = []
        self.buffered = 0
        self.tokens = 0
        self.turn_tokens = 0
        self.last_flush = time.monotonic()
        self.spacing = 0.0  # from the last write's round trip (WRITE_SPACING)
        self.chars_written = 0
        self.batches = 0

    def add(self, piece: Any) -> None:
        """Take one piece from the runner; raises OutputTooLongError past the turn's output limit."""
        piece = piece if isinstance(piece, Piece) else Piece(str(piece))
        room = self.max_chars - self.chars_written - self.buffered
        text = piece.text[: max(room, 0)]
        self.buffer.append(text)
        self.buffered += len(text)
        self.tokens += piece.tokens
        self.turn_tokens += piece.tokens
        if len(text) < len(piece.text):
            raise OutputTooLongError(f"The agent's output passed the limit of {self.max_chars} characters.")
        if self.budget is not None and self.turn_tokens >= self.budget:
            # The budget is reached: keep what came, stop asking the upstream for more.
            self.flush()
            sessions.cancel_session(
                self.team_id,
                self.session_id,
                SYSTEM,
                CancelSource.LIMIT,
                sessions.BUDGET_SPENT,
                end_reason=EndReason.BUDGET_EXCEEDED,
            )
            self.cancel.trigger("cancelled")
            return
        due = max(self.interval, self.spacing)
        if self.buffered >= MAX_EVENT_CHARS or time.monotonic() - self.last_flush >= due:
            self.flush()

    def flush(self, *, interrupted: bool = False) -> None:
        """Write what is buffered. A session no longer running this turn (ended elsewhere, deleted) sets the
        cancel handle, so the turn stops; a write MongoDB refuses raises TranscriptWriteError.

        `interrupted` marks the output written now as cut off. (The transcript is append-only: when nothing
        is left to write, the turn's closing event says it was interrupted instead.)"""
        self.last_flush = time.monotonic()
        text, tokens = "".join(self.buffer), self.tokens
        if not text and not tokens:
            return
        self.buffer, self.buffered, self.tokens = [], 0, 0
        texts = _split(text)
        # A write records its events on the session document too (until they are surely inserted), so one huge
        # piece is written in several writes, each well within MongoDB's 16 MB document limit.
        writes = [texts[i : i + EVENTS_PER_WRITE] for i in range(0, len(texts), EVENTS_PER_WRITE)]
        for number, part in enumerate(writes, start=1):
            last = number == len(writes)
            if not self._write(part, tokens if number == 1 else 0, interrupted=interrupted and last):
                self.cancel.trigger("ended")
                return
            self.chars_written += sum(map(len, part))

    def take_rest(self) -> tuple[list[str], int] | None:
        """What is buffered (texts, tokens), taken for the turn's closing write to carry; counted as written. None
        when it is more than one write holds (the caller flushes it first)."""
        text, tokens = "".join(self.buffer), self.tokens
        texts = _split(text) if text or tokens else []
        if len(texts) > EVENTS_PER_WRITE:
            return None
        self.buffer, self.buffered, self.tokens = [], 0, 0
        self.chars_written += len(text)
        return texts, tokens

    def _write(self, texts: list[str], tokens: int, *, interrupted: bool) -> bool:
        """One output write; False when the session no longer runs this turn."""
        self.batches += 1
        # Named once: an attempt whose answer is lost and the attempt after it are the same write.
        batch, ids = f"{self.turn_id}:{self.batches}", [ObjectId() for _ in texts]
        began = time.monotonic()
        try:
            events = persist(
                lambda: sessions.record_output(
                    self.team_id,
                    self.session_id,
                    self.turn_id,
                    texts,
                    tokens,
                    interrupted=interrupted,
                    batch=batch,
                    event_ids=ids,
                )
            )
        except PyMongoError as exc:
            log.warning("turn %s of session %s: output write failed: %s", self.turn_id, self.session_id, exc)
            raise TranscriptWriteError(f"The transcript could not be written: {_shown_error(exc)}") from exc
        if events is None:
            return False
        if events:
            self.cancel.note_stamp(began)
        self.spacing = min(MAX_SPACING, WRITE_SPACING * (time.monotonic() - began))
        return True


def persist[T](call: Callable[[], T]) -> T:
    """Run one of the turn's MongoDB calls, trying it again while MongoDB is away or hangs, for up to
    HEARTBEAT_TIMEOUT (after which the reaper takes the turn for lost anyway). Every call passed here is safe to
    repeat: each is conditional on the state it moves on from, and output names its batch."""
    config = current_app.config
    deadline = time.monotonic() + float(config["HEARTBEAT_TIMEOUT"])
    pause = 0.1
    while True:
        try:
            return call()
        except PyMongoError as exc:
            if not is_unavailable(exc) or time.monotonic() + pause > deadline:
                raise
            note_failure(exc)
            log.warning("MongoDB unavailable during a turn (%s); trying again in %.1f s", exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def _context_from_transcript(session_id: ObjectId, turn_id: ObjectId) -> tuple[str, list[dict[str, str]], int]:
    """This turn's user message, the earlier conversation as chat messages, and the turn's number."""
    events = sessions_repo.recent_events(session_id, HISTORY_EVENTS)
    user_message, history, turns = "", [], 0
    for event in events:
        if event["type"] == EventType.MESSAGE:
            if event.get("turnId") == str(turn_id):
                user_message = event.get("text", "")
                continue
            turns += 1
            history.append({"role": "user", "content": event.get("text", "")})
        elif event["type"] == EventType.OUTPUT:
            if event.get("turnId") == str(turn_id):
                continue  # an earlier attempt of this turn, cut off by a worker's shutdown: it runs again afresh
            if history and history[-1]["role"] == "assistant":
                history[-1]["content"] += event.get("text", "")
            else:
                history.append({"role": "assistant", "content": event.get("text", "")})
    return user_message, history, turns + 1


def run_turn(team_id: str, session_id: str, turn_id: str) -> dict[str, Any]:
    """Run one queued turn. Returns a summary; the RQ job finishes normally even when cancelled."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    config = app.config
    job = get_current_job()
    set_job_context(session_id=session_id, turn_id=turn_id, job_id=job.id if job else "")
    tid, sid, turn = ObjectId(team_id), ObjectId(session_id), ObjectId(turn_id)
    # Claimed once: a job that RQ hands out again after its worker died finds the turn `running` and leaves it
    # to the reaper, and a turn cancelled while queued was ended by the cancel itself.
    me = worker_id()
    session = persist(lambda: sessions.claim_turn(tid, sid, turn, me))
    if session is None:
        return {"outcome": "skipped"}
    app_doc = persist(lambda: apps_repo.find_app(tid, session["appId"]))
    if app_doc is None or app_doc.get("runner") not in RUNNERS:
        gone = "The app this session was started from no longer exists."
        persist(lambda: sessions.end_turn(tid, sid, turn, EndReason.ERROR, gone))
        return {"outcome": "error"}

    watcher = watcher_for(app)
    cancel = watcher.register(tid, sid, turn)
    _link_control(app, cancel, tid, sid)
    try:
        user_message, history, number = persist(lambda: _context_from_transcript(sid, turn))
        ctx = TurnContext(
            session=session,
            app=apps_service.without_secrets(app_doc),
            user_message=user_message,
            history=history,
            cancel=cancel,
            turn_number=number,
            variables=dict(session.get("variables") or {}),
        )
        writer = OutputWriter(
            session, turn, float(config["OUTPUT_FLUSH_INTERVAL"]), int(config["TURN_MAX_OUTPUT_CHARS"]), cancel
        )
        try:
            base_url, api_key = apps_service.upstream_for(app_doc, config)
            chosen = app_doc.get("runner") == Runner.OPENAI
            addresses = apps_service.upstream_addresses(base_url, config) if chosen else None
        except UnsealError as exc:
            _stop(writer, EndReason.ERROR, f"{exc} Enter the app's API key again.", flush=False)
            return {"outcome": "error"}
        except InvalidInput as exc:
            _stop(writer, EndReason.ERROR, f"The app's baseUrl cannot be used: {exc.message}", flush=False)
            return {"outcome": "error"}
        grant = TurnGrant(base_url, api_key, tuple(config["PYTHON_RUNNER_MODULES"]), writer.budget, addresses)
        log.info("turn %s of session %s started", turn_id, session_id)
        return _drive(ctx, grant, writer, tid, sid, turn)
    finally:
        watcher.unregister(sid)


def _drive(
    ctx: TurnContext, grant: TurnGrant, writer: OutputWriter, tid: ObjectId, sid: ObjectId, turn: ObjectId
) -> dict[str, Any]:
    """Run the runner to its end, its failure or its cancel, and end the turn accordingly."""
    cancel = ctx.cancel
    try:
        for piece in RUNNERS[ctx.app["runner"]](ctx, grant):
            if cancel.is_set():
                break
            writer.add(piece)
        if not cancel.is_set():
            writer.flush()
    except JobTimeoutException:
        _stop(writer, EndReason.TIMED_OUT, f"The turn timed out after {current_app.config['TURN_TIMEOUT']} s.")
        return {"outcome": "timed_out"}
    except (TranscriptWriteError, OutputTooLongError) as exc:
        _stop(writer, EndReason.ERROR, str(exc), flush=isinstance(exc, OutputTooLongError))
        return {"outcome": "error"}
    except Exception as exc:
        if not cancel.is_set():
            log.exception("turn %s of session %s failed", turn, sid)
            message = _shown_failure(exc)
            _stop(writer, EndReason.ERROR, message[:2000])
            return {"outcome": "error"}
    if not cancel.is_set() and persist(lambda: sessions.complete_turn(tid, sid, turn, end_session=ctx.end_session)):
        log.info("turn %s of session %s completed", turn, sid)
        return {"outcome": "completed", "chars": writer.chars_written}
    if cancel.reason == "interrupted":
        # A newer message asked this turn to stop: keep its output (marked interrupted), run the next one.
        writer.flush(interrupted=True)
        if persist(lambda: sessions.complete_turn(tid, sid, turn, end_session=False, interrupted=True)):
            return {"outcome": "interrupted"}
    if cancel.reason == "shutdown" and _hand_back(writer):
        raise TurnRequeued(f"turn {turn} of session {sid} was interrupted by a worker shutdown; queued again")
    if cancel.reason in STOP_MESSAGES:
        reason = EndReason.TIMED_OUT if cancel.reason == "timeout" else EndReason.WORKER_LOST
        _stop(writer, reason, STOP_MESSAGES[cancel.reason])
        return {"outcome": str(reason)}
    # A cancel (or an end or delete elsewhere) got there first: it decides how the session ends.
    session = _stop(writer, EndReason.CANCELLED, "Cancelled; the turn was interrupted and its partial output kept.")
    if session and session.get("cancelledAt") and session.get("endedAt"):
        seconds = max((session["endedAt"] - session["cancelledAt"]).total_seconds(), 0.0)
        metrics.store_for(current_app.config).observe("cancel_to_stop_seconds", seconds)
        log.info("turn %s of session %s stopped %.3f s after the cancel", turn, sid, seconds)
    return {"outcome": "cancelled"}


def _hand_back(writer: OutputWriter) -> bool:
    """The worker is shutting down: keep the turn's output so far (marked interrupted), put the turn back in the
    queue (services.sessions.requeue_interrupted_turn) and mark this RQ job for one retry, so that RQ queues it
    again when it raises. False when the turn is not handed back: it was handed back TURN_SHUTDOWN_RETRIES times
    already (the caller ends it `worker_lost`), or the session no longer runs it (a cancel decides the end)."""
    job = get_current_job()
    if job is None:
        return False
    try:
        writer.flush(interrupted=True)
    except TranscriptWriteError:
        return False
    limit = int(current_app.config["TURN_SHUTDOWN_RETRIES"])
    outcome = persist(
        lambda: sessions.requeue_interrupted_turn(
            writer.team_id, writer.session_id, writer.turn_id, limit, interrupted=writer.chars_written > 0
        )
    )
    if outcome != "requeued":
        return False
    # RQ's retry: the worker's failure handling queues the job again (same id, at the front) instead of failing it.
    job.retries_left = max(int(job.retries_left or 0), 1)
    job.retry_intervals = None
    job.enqueue_at_front_on_retry = True
    return True


def _stop(writer: OutputWriter, reason: EndReason, message: str, *, flush: bool = True) -> dict[str, Any] | None:
    """Keep what was produced (marked interrupted) and end the session with its closing event, in one write when
    the rest of the output fits in one; the session as ended, or None when it had already ended elsewhere."""
    rest = writer.take_rest() if flush else None
    if flush and rest is None:
        try:
            writer.flush(interrupted=True)
        except TranscriptWriteError as exc:
            reason, message = EndReason.ERROR, str(exc)
    interrupted = writer.chars_written > 0
    seen = writer.cancel.seen
    return persist(
        lambda: sessions.end_turn(
            writer.team_id,
            writer.session_id,
            writer.turn_id,
            reason,
            message,
            interrupted=interrupted,
            output=rest,
            seen=seen,
        )
    )


def end_turn_abandoned(job: Any, reason: str, detail: str) -> bool:
    """Thread mode: a turn's thread did not return after its time limit or the worker's shutdown, or its process
    died (found by a sibling): end its session now. True when this ended it."""
    if job.func_name != queueing.TURN_JOB:
        return False
    team_id, session_id, turn_id = (ObjectId(arg) for arg in job.args)
    if reason == "timeout":
        ended = sessions.end_turn(team_id, session_id, turn_id, EndReason.TIMED_OUT, STOP_MESSAGES["timeout"])
        return ended is not None
    # A sibling found the job of a dead process: its turn is lost only if nothing heartbeats it any more. (A turn the
    # dead process never claimed is queued again by the reaper, and may be running elsewhere by now.)
    silent = reason == "abandoned"
    detail = f"the turn was abandoned ({reason}: {detail})"
    return sessions.end_turn_of_killed_job(team_id, session_id, turn_id, detail, only_if_silent=silent)


def end_turn_of_killed_job(job: Any, pid: int, status: int) -> bool:
    """Called in a worker when the process running a turn died (killed, out of memory): end the session at once
    instead of waiting for its heartbeat to go stale. True when this ended it."""
    if job.func_name != queueing.TURN_JOB:
        return False
    team_id, session_id, turn_id = (ObjectId(arg) for arg in job.args)
    detail = f"the process running this turn died (pid {pid}, status {status})"
    return sessions.end_turn_of_killed_job(team_id, session_id, turn_id, detail)
