"""The turn job: run the app's agent for one user message, stream its output, stop when cancelled."""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any

from bson import ObjectId
from flask import current_app
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from .. import metrics
from ..db import get_db
from ..repositories import apps as apps_repo
from ..repositories import sessions as repo
from ..timeutil import utcnow
from .context import set_job_context
from .runners import RUNNERS, Piece, RunnerError, TurnContext
from .watcher import CancelHandle, watcher_for

log = logging.getLogger(__name__)
# Live statuses a queued turn may start from (`running` means another worker already claimed it).
CLAIMABLE = ["started", "waiting", "warning"]


def worker_id() -> str:
    """Host and pid of the process running the turn (after any fork)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class OutputWriter:
    """Batches streamed pieces into transcript events, one write per flush interval rather than per token."""

    def __init__(
        self, team_id: ObjectId, session_id: ObjectId, turn_id: str, interval: float, cancel: CancelHandle
    ) -> None:
        self.team_id, self.session_id, self.turn_id = team_id, session_id, turn_id
        self.interval, self.cancel = interval, cancel
        self.buffer: list[str] = []
        self.tokens = 0
        self.last_flush = time.monotonic()
        self.chars_written = 0
        self.last_event_id: ObjectId | None = None

    def add(self, piece: Any) -> None:
        piece = piece if isinstance(piece, Piece) else Piece(str(piece))
        self.buffer.append(piece.text)
        self.tokens += piece.tokens
        if time.monotonic() - self.last_flush >= self.interval:
            self.flush()

    def flush(self, *, interrupted: bool = False) -> None:
        """Write what is buffered; a missing session means it was deleted, which counts as a cancel.

        `interrupted` marks the turn's last output event (the one written now, or the previous one when
        nothing is buffered) so readers can tell a cut-off reply from a finished one."""
        self.last_flush = time.monotonic()
        text = "".join(self.buffer)
        if not text and not self.tokens:
            if interrupted and self.last_event_id is not None:
                repo.mark_event(self.session_id, self.last_event_id, interrupted=True)
            return
        fields: dict[str, Any] = {"role": "agent", "text": text, "turnId": self.turn_id}
        if interrupted:
            fields["interrupted"] = True
        event = repo.append_event(self.team_id, self.session_id, "output", tokens=self.tokens, **fields)
        self.buffer, self.tokens = [], 0
        self.chars_written += len(text)
        if event is None:
            self.cancel.trigger("deleted")
        else:
            self.last_event_id = event["_id"]


def _history(session_id: ObjectId) -> list[dict[str, str]]:
    """Earlier turns as chat messages (user messages and the agent's output), for runners that want context."""
    history: list[dict[str, str]] = []
    for event in repo.list_events(session_id, after=0, limit=1000):
        if event["type"] == "message":
            history.append({"role": "user", "content": event.get("text", "")})
        elif event["type"] == "output":
            if history and history[-1]["role"] == "assistant":
                history[-1]["content"] += event.get("text", "")
            else:
                history.append({"role": "assistant", "content": event.get("text", "")})
    return history


def _end_cancelled(team_id: ObjectId, session_id: ObjectId, turn_id: str, reason: str) -> None:
    """End a session whose turn stopped because of a cancel (sticky: only a live session changes)."""
    ended = repo.end_session(team_id, session_id, "terminated", extra_filter={"cancelledAt": {"$exists": True}})
    if ended is not None:
        repo.append_event(team_id, session_id, "status", status="terminated", turnId=turn_id, message=reason)


def _end_error(team_id: ObjectId, session_id: ObjectId, turn_id: str, message: str) -> None:
    ended = repo.end_session(team_id, session_id, "error", extra_filter={"activeTurnId": ObjectId(turn_id)})
    if ended is not None:
        repo.append_event(team_id, session_id, "error", turnId=turn_id, message=message)


def run_turn(team_id: str, session_id: str, turn_id: str) -> dict[str, Any]:
    """Run one queued turn. Returns a summary; the RQ job finishes normally even when cancelled."""
    config = current_app.config
    job = get_current_job()
    set_job_context(session_id=session_id, turn_id=turn_id, job_id=job.id if job else "")
    tid, sid, turn_oid = ObjectId(team_id), ObjectId(session_id), ObjectId(turn_id)
    now = utcnow()
    # Claim the turn once: a job that RQ hands out again after its worker died finds it `running` and leaves
    # it to the reaper, rather than streaming the whole reply a second time into the same transcript.
    session = repo.update_live_session(
        tid,
        sid,
        {"activeTurnId": turn_oid, "status": {"$in": CLAIMABLE}, **repo.NOT_CANCELLED},
        {"$set": {"status": "running", "workerId": worker_id(), "heartbeatAt": now, "turnStartedAt": now}},
    )
    if session is None:
        current = repo.find_session(tid, sid)
        if current is not None and current.get("cancelledAt"):
            _end_cancelled(tid, sid, turn_id, "Cancelled before the turn started.")
            return {"outcome": "cancelled-before-start"}
        return {"outcome": "skipped" if current else "deleted"}

    app = apps_repo.find_app(tid, session["appId"])
    if app is None or app.get("runner") not in RUNNERS:
        _end_error(tid, sid, turn_id, "The app this session was started from no longer exists.")
        return {"outcome": "error"}

    watcher = watcher_for(config)
    cancel = watcher.register(tid, sid)
    history = _history(sid)
    user_message = history.pop()["content"] if history and history[-1]["role"] == "user" else ""
    ctx = TurnContext(
        session=session,
        app=app,
        user_message=user_message,
        history=history,
        cancel=cancel,
        turn_number=sum(1 for m in history if m["role"] == "user") + 1,
        env={"OPENAI_BASE_URL": config.get("OPENAI_BASE_URL"), "OPENAI_API_KEY": config.get("OPENAI_API_KEY")},
    )
    writer = OutputWriter(tid, sid, turn_id, float(config["OUTPUT_FLUSH_INTERVAL"]), cancel)
    log.info("turn %s of session %s started", turn_id, session_id)
    try:
        for piece in RUNNERS[app["runner"]](ctx):
            if cancel.is_set():
                break
            writer.add(piece)
    except JobTimeoutException:
        writer.flush(interrupted=True)
        _end_error(tid, sid, turn_id, f"The turn timed out after {config['TURN_TIMEOUT']} s.")
        return {"outcome": "timeout"}
    except Exception as exc:
        if not cancel.is_set():
            writer.flush(interrupted=True)
            message = str(exc) if isinstance(exc, RunnerError) else f"The agent failed: {exc.__class__.__name__}: {exc}"
            log.exception("turn %s of session %s failed", turn_id, session_id)
            _end_error(tid, sid, turn_id, message[:2000])
            return {"outcome": "error"}
    finally:
        watcher.unregister(sid)

    if cancel.is_set():
        return _finish_cancelled(tid, sid, turn_id, writer, cancel)
    writer.flush()
    final_status = "terminated" if ctx.end_session else "waiting"
    finished = repo.update_live_session(
        tid,
        sid,
        {"activeTurnId": turn_oid, **repo.NOT_CANCELLED},
        {
            "$set": {
                "status": final_status,
                "activeTurnId": None,
                "lastUpdatedDate": utcnow(),
                **({"endedAt": utcnow()} if ctx.end_session else {}),
            }
        },
    )
    if finished is None:
        # A cancel landed between the last piece and this write: the cancel wins.
        return _finish_cancelled(tid, sid, turn_id, writer, cancel)
    repo.append_event(tid, sid, "turn_end", turnId=turn_id, status=final_status)
    log.info("turn %s of session %s completed (%s)", turn_id, session_id, final_status)
    return {"outcome": "completed", "status": final_status}


def _finish_cancelled(
    tid: ObjectId, sid: ObjectId, turn_id: str, writer: OutputWriter, cancel: CancelHandle
) -> dict[str, Any]:
    if cancel.reason == "deleted":
        return {"outcome": "deleted"}
    writer.flush(interrupted=True)
    _end_cancelled(tid, sid, turn_id, "Cancelled; the turn was interrupted and its partial output kept.")
    ended = repo.find_session(tid, sid)
    if ended and ended.get("cancelledAt") and ended.get("endedAt"):
        seconds = (ended["endedAt"] - ended["cancelledAt"]).total_seconds()
        metrics.store_for(current_app.config).observe("cancel_to_stop_seconds", max(seconds, 0.0))
        log.info("turn %s of session %s stopped %.3f s after the cancel", turn_id, sid, seconds)
    return {"outcome": "cancelled"}


def end_turn_of_killed_job(job: Any, pid: int, status: int) -> bool:
    """Called in a worker when the process running a turn died (killed, out of memory): end the session
    `error` at once instead of waiting for its heartbeat to go stale. True when this ended it."""
    if job.func_name != "agentcloud_clone.jobs.turns.run_turn":
        return False
    team_id, session_id, turn_id = (ObjectId(arg) for arg in job.args)
    message = f"Worker lost: the process running this turn died (pid {pid}, status {status})."
    # A turn that was being cancelled ends as cancelled; otherwise the loss is an error.
    this_turn = {"activeTurnId": turn_id}
    ended = repo.end_session(
        team_id, session_id, "terminated", extra_filter={**this_turn, "cancelledAt": {"$exists": True}}
    )
    if ended is None:
        ended = repo.end_session(team_id, session_id, "error", extra_filter=this_turn)
    if ended is not None:
        repo.append_event(team_id, session_id, "error", turnId=str(turn_id), message=message)
        log.warning("session %s ended: %s", session_id, message)
    return ended is not None


def reap_lost_turns(timeout: float | None = None) -> list[str]:
    """End live sessions whose worker stopped heartbeating (or that were cancelled and never finished).

    A system-wide sweep (it spans teams by design); each update still names the session's own team and is
    conditional, so several reapers racing end a session once."""
    timeout = float(timeout if timeout is not None else current_app.config["HEARTBEAT_TIMEOUT"])
    cutoff_dt = utcnow() - timedelta(seconds=timeout)
    stale_heartbeat = {"$or": [{"heartbeatAt": {"$lt": cutoff_dt}}, {"heartbeatAt": None}]}
    query = {
        "status": {"$in": list(repo.LIVE_STATUSES)},
        "$or": [
            {"status": "running", "heartbeatAt": {"$lt": cutoff_dt}},
            {"cancelledAt": {"$lt": cutoff_dt}, **stale_heartbeat},
        ],
    }
    reaped = []
    for doc in get_db().sessions.find(query, {"teamId": 1, "cancelledAt": 1, "activeTurnId": 1}).limit(1000):
        status = "terminated" if doc.get("cancelledAt") else "error"
        ended = repo.end_session(doc["teamId"], doc["_id"], status, extra_filter={"_id": doc["_id"], **stale_heartbeat})
        if ended is not None:
            turn = str(doc["activeTurnId"]) if doc.get("activeTurnId") else None
            repo.append_event(
                doc["teamId"],
                doc["_id"],
                "error",
                turnId=turn,
                message=(f"Worker lost: no heartbeat for over {timeout:g} s; the session was ended."),
            )
            reaped.append(str(doc["_id"]))
    if reaped:
        log.warning("reaped %d sessions with lost workers: %s", len(reaped), ", ".join(reaped))
    return reaped
