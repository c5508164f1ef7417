"""Thread mode: one RQ worker process runs up to `concurrency` jobs at once, each in a thread of its own.

RQ stays the queue. Every job is dequeued, registered (StartedJobRegistry, the worker's execution index),
finished, failed, retried and stopped by RQ's own code; only *where* the job function runs changes: in a
thread of the worker process instead of a forked work horse. What job code sees of this is its control:

    control = current_control()          # None when not under this worker (fork mode, tests, a shell)
    control.is_set() / control.wait(t)   # the worker wants the job to stop; wait() wakes early
    control.reason                       # "stopped" (rq stop-job), "timeout" (job.timeout passed), "shutdown"
    control.on_stop(hook)                # run once when set (e.g. close an upstream HTTP stream)
    control.deadline / time_left()       # monotonic deadline from job.timeout (None: no limit)
    control.raise_if_set()               # JobTimeoutException for "timeout", JobInterrupted otherwise

A thread cannot be killed, so every stop is cooperative: the control is set, and a job that does not return
within `interrupt_grace` seconds is recorded the way RQ records such an end and its thread is abandoned (it
keeps running, unobserved, until it returns or the process exits). See README "Worker modes".

Run it without the app (the tests and the benchmark do): python -m workers.pool --url REDIS_URL QUEUE...
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any

import redis
from rq.callbacks import execute_stopped_callback
from rq.command import handle_command, parse_payload
from rq.exceptions import AbandonedJobError, NoSuchJobError, ShutDownImminentException, StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.rate_limit import RateLimitRegistry
from rq.timeouts import BaseDeathPenalty, JobTimeoutException
from rq.utils import now
from rq.worker import Worker, WorkerStatus

__all__ = [
    "ABANDONED",
    "EXCEPTION",
    "SHUTDOWN",
    "STOPPED",
    "TIMEOUT",
    "AbnormalEnd",
    "JobControl",
    "JobInterrupted",
    "RecordingForkWorker",
    "ThreadDeathPenalty",
    "ThreadPoolWorker",
    "control_for",
    "current_control",
    "main",
]

log = logging.getLogger("workers.pool")

# Why a control was set (JobControl.reason) ...
STOPPED = "stopped"  # rq.command.send_stop_job_command / send_stop_execution_command
TIMEOUT = "timeout"  # job.timeout passed
SHUTDOWN = "shutdown"  # the worker is shutting down and its grace period is over
# ... and the two further reasons an AbnormalEnd can have.
EXCEPTION = "exception"  # the job raised, unprompted
ABANDONED = "abandoned"  # a worker process died (kill -9, OOM); found by a sibling's registry cleanup

# Recording a job's end while Redis is away: the first wait before trying again, and the longest.
RECORD_RETRY_FIRST = 0.5
RECORD_RETRY_MAX = 5.0

_local = threading.local()
_controls: dict[str, JobControl] = {}
_controls_lock = threading.Lock()


def current_control() -> JobControl | None:
    """The control of the job running in this thread under a ThreadPoolWorker, else None."""
    return getattr(_local, "control", None)


def control_for(job_id: str) -> JobControl | None:
    """The control of a job running in this process (for helper threads a job started itself), else None."""
    with _controls_lock:
        return _controls.get(job_id)


class JobInterrupted(Exception):  # noqa: N818 - named for what happened, like rq's StopRequested
    """Raised by JobControl.raise_if_set() for a "stopped" or "shutdown" control."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"job interrupted: {reason}")
        self.reason = reason


class JobControl:
    """What a job sees of its worker: a stop flag with a reason, run-once stop hooks, and its deadline."""

    def __init__(self, job_id: str, on_set: Callable[[], Any] | None = None) -> None:
        self.job_id = job_id
        self.timeout: float | None = None
        self.deadline: float | None = None  # time.monotonic() value; None: no time limit
        self.reason: str | None = None
        self.set_at: float | None = None  # time.monotonic() when set
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], Any]] = []
        self._on_set = on_set

    def is_set(self) -> bool:
        """True once the worker asked the job to stop (see `reason`)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to `timeout` seconds; True at once when the control is (or becomes) set."""
        return self._event.wait(timeout)

    def time_left(self) -> float | None:
        """Seconds until the job's deadline (0 when past it), or None when it has no time limit."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def on_stop(self, callback: Callable[[], Any]) -> None:
        """Run `callback` once when the control is set; at once (in this thread) if it already is."""
        with self._lock:
            if not self._event.is_set():
                self._hooks.append(callback)
                return
        _run_hook(callback, self.job_id)

    def raise_if_set(self) -> None:
        """Raise what RQ would record for this reason: JobTimeoutException for a timeout, else JobInterrupted."""
        if self.reason == TIMEOUT:
            raise JobTimeoutException(f"Task exceeded maximum timeout value ({self.timeout} seconds)")
        if self.reason is not None:
            raise JobInterrupted(self.reason)

    def trigger(self, reason: str) -> bool:
        """Set the control (the first reason wins) and run the hooks once, on a short-lived thread of their own,
        so a slow hook holds up neither the caller (RQ's pubsub thread, the supervisor) nor other jobs.
        True when this call set it."""
        with self._lock:
            if self._event.is_set():
                return False
            self.reason, self.set_at = reason, time.monotonic()
            self._event.set()
            hooks, self._hooks = self._hooks, []
        if hooks:
            threading.Thread(target=_run_hooks, args=(hooks, self.job_id), name="stop-hooks", daemon=True).start()
        if self._on_set is not None:
            self._on_set()
        return True

    def _arm(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout if timeout is not None and timeout > 0 else None

    def __repr__(self) -> str:
        return f"<JobControl {self.job_id} reason={self.reason}>"


def _run_hooks(hooks: list[Callable[[], Any]], job_id: str) -> None:
    for hook in hooks:
        _run_hook(hook, job_id)


def _run_hook(hook: Callable[[], Any], job_id: str) -> None:
    try:
        hook()
    except Exception:  # one failing hook must not stop the others
        log.exception("stop hook of job %s failed", job_id)


@dataclass(frozen=True)
class AbnormalEnd:
    """Why a job ended other than by returning (or ended after being told to stop), for the application.

    reason:  STOPPED, TIMEOUT, SHUTDOWN, EXCEPTION or ABANDONED.
    message: the failure text RQ recorded (the job's traceback, or the worker's own message when forced).
    forced:  True when the job did not return: its thread was abandoned, or its process died (ABANDONED).
    retried: True when RQ queued or scheduled the job again (the job has `Retry` attempts left); the
             application should then leave the work in flight rather than end it.
    """

    reason: str
    message: str
    forced: bool
    retried: bool
    worker_name: str


AbnormalEndHandler = Callable[[Job, AbnormalEnd], Any]


class ThreadDeathPenalty(BaseDeathPenalty):
    """RQ's time-limit hook (`death_penalty_class`), harmless in threads.

    RQ wraps job callbacks in `death_penalty_class(timeout, ...)`; its default arms SIGALRM, which only works in
    the main thread (in any other it raises ValueError). Here a job's own time limit is enforced through its
    control by the worker's supervisor thread, and success/failure/stopped callbacks run without a limit."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class _Slot:
    """One running job: its RQ records, its control, its thread, and who records its end (exactly once)."""

    def __init__(self, job: Job, queue: Queue, execution: Execution, control: JobControl) -> None:
        self.job, self.queue, self.execution, self.control = job, queue, execution, control
        self.thread: threading.Thread | None = None
        self.reserved = False  # runs in one of the reserved queues' own slots (see ThreadPoolWorker)
        self.end_reason: str | None = None  # the control's reason when the end was claimed
        self._claimed = False
        self._lock = threading.Lock()

    def claim(self, reason: str | None) -> bool:
        """True for the first caller only: that caller records the job's end in RQ, as of `reason` (a stop
        arriving after the job returned does not turn its result into a stop)."""
        with self._lock:
            if self._claimed:
                return False
            self._claimed, self.end_reason = True, reason
            return True

    @property
    def claimed(self) -> bool:
        return self._claimed


class ThreadPoolWorker(Worker):
    """An RQ Worker that runs up to `concurrency` jobs at once in threads of its own process.

    RQ's work loop (dequeue, suspension, maintenance, burst, max_jobs) runs unchanged in the main thread; its
    `execute_job` hook registers the execution as RQ does, hands the job to a thread and returns once a slot
    is free again. Each job thread runs RQ's own success/failure/retry handling. One supervisor thread
    heartbeats every running job (so RQ's cleanup never takes a live job for abandoned) and enforces deadlines
    and grace periods. RQ's pubsub thread routes stop-job/stop-execution to the named job's control.

    Settings beyond Worker's: `concurrency`; `shutdown_grace` (seconds running jobs may still finish after
    SIGTERM/SIGINT); `interrupt_grace` (seconds a job may take to return once its control is set, before the
    worker records its end and abandons its thread); `heartbeat_margin` (seconds a job's StartedJobRegistry
    entry outlives its last heartbeat; RQ hard-codes 60); `record_retry_for` (seconds a job's end is tried
    again while Redis is away); `reserved_queues` and `reserved_concurrency` (slots
    beyond `concurrency` that only jobs of those queues use: while every other slot is busy the worker still
    takes their jobs at once, so e.g. webhook deliveries never wait behind long jobs);
    `abnormal_end_handler(job, AbnormalEnd)`; `execution_context(job)`, a context manager entered in each job's
    thread (e.g. a Flask app context).
    The defaults of `job_monitoring_interval` (heartbeat period), `maintenance_interval` and `worker_ttl` are
    lowered from RQ's 30/600/420 to 10/60/75 so that a killed process's jobs are failed within about two
    minutes by a sibling instead of up to eleven.
    """

    death_penalty_class = ThreadDeathPenalty

    def __init__(
        self,
        queues: Any,
        *args: Any,
        concurrency: int = 10,
        shutdown_grace: float = 20.0,
        interrupt_grace: float = 5.0,
        heartbeat_margin: int = 20,
        record_retry_for: float = 120.0,
        reserved_queues: Any = (),
        reserved_concurrency: int = 0,
        abnormal_end_handler: AbnormalEndHandler | None = None,
        execution_context: Callable[[Job], contextlib.AbstractContextManager[Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._tls = threading.local()  # before Worker.__init__, which sets _stopped_job_id
        kwargs.setdefault("job_monitoring_interval", 10)
        kwargs.setdefault("maintenance_interval", 60)
        kwargs.setdefault("worker_ttl", 75)
        super().__init__(queues, *args, **kwargs)
        self.concurrency = concurrency
        names = {q if isinstance(q, str) else q.name for q in reserved_queues}
        self._reserved_queues = [q for q in self.queues if q.name in names]
        if names - {q.name for q in self._reserved_queues}:
            raise ValueError("reserved_queues must be among the queues the worker serves")
        self.reserved_concurrency = int(reserved_concurrency) if self._reserved_queues else 0
        self._size_connection_pool()
        self.shutdown_grace = float(shutdown_grace)
        self.interrupt_grace = float(interrupt_grace)
        self.record_retry_for = float(record_retry_for)
        self.heartbeat_margin = int(heartbeat_margin)
        self._abnormal_end_handler = abnormal_end_handler
        self._execution_context = execution_context or (lambda job: contextlib.nullcontext())
        self._slots: dict[str, _Slot] = {}  # execution id -> slot; guarded by _cond
        self._cond = threading.Condition()
        self._dispatching = 0  # jobs the main thread is registering; guarded by _cond
        self._finishers: list[threading.Thread] = []
        self._abandoned: list[threading.Thread] = []
        self._supervisor: threading.Thread | None = None
        self._supervisor_stop = threading.Event()
        self._supervisor_wake = threading.Event()
        self._interruptible = False  # the main thread may be interrupted by StopRequested right now
        self._stop_requested_at: float | None = None
        self._shutdown_date_pending = False
        self._cold = False
        # First in the chain, so a handler of the application returning False cannot hide abandoned jobs from it.
        self._exc_handlers.insert(0, self._report_abandoned_job)

    def _size_connection_pool(self) -> None:
        """Every job thread, and a finisher per forced end, may hold a connection at once: beyond redis-py's
        default of 100 a burst of simultaneous ends would fail with MaxConnectionsError. (A
        BlockingConnectionPool is left alone: it waits for a free connection instead of failing.)"""
        pool = self.connection.connection_pool
        needed = 2 * (self.concurrency + self.reserved_concurrency) + 10
        if type(pool) is redis.ConnectionPool and pool.max_connections < needed:
            pool.max_connections = needed

    # -- RQ's stop-job bookkeeping, per thread ------------------------------------------------------------------
    # Worker.handle_job_failure() marks a job STOPPED when `self._stopped_job_id == job.id`, a single attribute
    # meant for one horse. Here each thread recording a failure sets it for itself (see handle_job_failure).

    @property
    def _stopped_job_id(self) -> str | None:
        return getattr(self._tls, "stopped_job_id", None)

    @_stopped_job_id.setter
    def _stopped_job_id(self, value: str | None) -> None:
        self._tls.stopped_job_id = value

    # -- the work loop's hooks (main thread) --------------------------------------------------------------------

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        self._supervisor = threading.Thread(target=self._supervise, name="rq-pool-supervisor", daemon=True)
        self._supervisor.start()
        self.log.info("Worker %s: thread mode, up to %d jobs at once", self.name, self.concurrency)
        if self.reserved_concurrency:
            names = ", ".join(q.name for q in self._reserved_queues)
            self.log.info("Worker %s: %d more slots for %s alone", self.name, self.reserved_concurrency, names)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Register the execution as Worker does, start the job's thread, return once a slot is free."""
        self._dispatch(job, queue)
        self._wait_for_free_slot()

    def _dispatch(self, job: Job, queue: Queue) -> None:
        """Register the execution as Worker does and start the job's thread (in a reserved slot when it may)."""
        with self._cond:
            self._dispatching += 1  # so a job ending meanwhile does not mark the worker IDLE after this BUSY
        try:
            execution = self.prepare_execution(job)  # StartedJobRegistry, execution index, worker BUSY
            control = JobControl(job.id, on_set=self._supervisor_wake.set)
            slot = _Slot(job, queue, execution, control)
            with self._cond:
                slot.reserved = self._reserved_slot_free() and any(q.name == queue.name for q in self._reserved_queues)
                self._slots[execution.id] = slot
        finally:
            with self._cond:
                self._dispatching -= 1
        with _controls_lock:
            _controls[job.id] = control
        slot.thread = threading.Thread(target=self._run_slot, args=(slot,), name=f"rq-job-{job.id}", daemon=True)
        try:
            slot.thread.start()
        except RuntimeError:  # can't start new thread: fail the job as RQ fails one whose horse could not run
            self.log.exception("Worker %s: could not start a thread for job %s", self.name, job.id)
            if slot.claim(None):
                self._finish(slot, exc_info=sys.exc_info(), keep_trying=False)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        # Blocked in BLMOVE: a stop request interrupts at once, as it does for an idle fork-mode worker.
        self._interruptible = True
        try:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        finally:
            self._interruptible = False

    def run_maintenance_tasks(self) -> None:
        # Never interrupted half-way (it holds the queue's maintenance lock); honour a stop right after.
        interruptible, self._interruptible = self._interruptible, False
        try:
            super().run_maintenance_tasks()
        finally:
            self._interruptible = interruptible
        if interruptible and self._stop_requested:
            raise StopRequested()

    def set_state(self, state: str, pipeline: Any = None) -> None:
        # The loop marks the worker IDLE before every dequeue; it is BUSY while any job runs.
        if state == WorkerStatus.IDLE and self._slots:
            state = WorkerStatus.BUSY
        super().set_state(state, pipeline=pipeline)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # RQ shortens the TTL as the job nears its timeout; here the supervisor heartbeats every job until its
        # end is recorded (deadline plus grace included), so the entry need only outlive one missed heartbeat.
        return int(self.job_monitoring_interval + self.heartbeat_margin)

    def _general_slot_free(self) -> bool:
        # Called with _cond held.
        return sum(1 for slot in self._slots.values() if not slot.reserved) < self.concurrency

    def _reserved_slot_free(self) -> bool:
        # Called with _cond held.
        return sum(1 for slot in self._slots.values() if slot.reserved) < self.reserved_concurrency

    def _wait_for_free_slot(self) -> None:
        """Return once a slot any job may use is free (or a stop was requested). Meanwhile, while a reserved slot
        is free, take the reserved queues' jobs as they arrive (a blocking pop of at most a second, so a slot
        freeing or a stop request is noticed within one)."""
        while True:
            with self._cond:
                if self._general_slot_free() or self._stop_requested:
                    return
                take_reserved = self._reserved_slot_free()
                if not take_reserved:
                    self._interruptible = True
                    try:
                        self._cond.wait(1.0)
                    finally:
                        self._interruptible = False
            if take_reserved:
                self._take_reserved_job(timeout=1)
            if self.should_run_maintenance_tasks:  # the loop runs them only between dequeues
                self.run_maintenance_tasks()

    def _take_reserved_job(self, timeout: int) -> None:
        """Pop one job of the reserved queues (waiting up to `timeout` s) and start it in a reserved slot. The pop is
        not interrupted by a signal (a job popped and not started would be lost); a stop is noticed after it."""
        popped = self.connection.blpop([q.key for q in self._reserved_queues], timeout)
        if popped is None:
            return
        queue_key, job_id = (part.decode() if isinstance(part, bytes) else str(part) for part in popped)
        queue = next(q for q in self._reserved_queues if q.key == queue_key)
        try:
            job = self.job_class.fetch(job_id, connection=self.connection, serializer=self.serializer)
        except NoSuchJobError:
            return  # deleted while queued, as RQ's own dequeue skips it
        job.redis_server_version = self.get_redis_server_version()
        self.log.info("Worker %s: %s: %s (reserved slot)", self.name, queue.name, job.id)
        self._dispatch(job, queue)

    # -- signals and commands -----------------------------------------------------------------------------------

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: stop dequeuing at once; running jobs get `shutdown_grace` (see teardown)."""
        self.log.info(
            "Worker %s: warm shut down requested (%s): %d running jobs get %g s to finish",
            self.name,
            signal.Signals(signum).name,
            len(self._slots),
            self.shutdown_grace,
        )
        self._shutdown_requested_date = now()
        self._stop_requested = True
        self._stop_requested_at = time.monotonic()
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        # Written by the supervisor: a Redis call from a signal handler could wait on a lock this thread holds.
        self._shutdown_date_pending = True
        self._supervisor_wake.set()
        if self.scheduler:
            self.stop_scheduler()
        if self._interruptible:
            raise StopRequested()

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        """A second SIGTERM/SIGINT: cold shutdown. Running jobs are interrupted and recorded at once."""
        if self._shutdown_requested_date and now() - self._shutdown_requested_date < timedelta(seconds=1):
            self.log.debug("Worker %s: shutdown signal ignored, received twice in less than 1 second", self.name)
            return
        self.log.warning("Worker %s: cold shut down, interrupting %d running jobs", self.name, len(self._slots))
        self._cold = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._ignore_signal)
        raise SystemExit()

    def _ignore_signal(self, signum: int, frame: FrameType | None) -> None:
        self.log.warning("Worker %s: already shutting down; %s ignored", self.name, signal.Signals(signum).name)

    def handle_payload(self, message: Any) -> None:
        """RQ's pubsub commands; stop-job reaches the named job's control instead of killing a horse."""
        try:
            payload = parse_payload(message)
        except Exception:
            self.log.warning("Worker %s: unreadable command %r", self.name, message)
            return
        command = payload.get("command")
        if command == "stop-job":
            self._stop_job(payload.get("job_id"))
        elif command == "kill-horse":
            self.log.warning("Worker %s: kill-horse ignored: thread mode has no horse; use stop-job", self.name)
        else:  # shutdown (a SIGINT to this process), stop-execution (request_stop_execution below)
            handle_command(self, payload)

    def request_stop_execution(self, execution_id: str) -> None:
        with self._cond:
            slot = self._slots.get(execution_id)
        if slot is None:
            self.log.warning("Worker %s: not running execution %s, command ignored", self.name, execution_id)
            return
        self._stop(slot)

    def _stop_job(self, job_id: str | None) -> None:
        with self._cond:
            slots = [slot for slot in self._slots.values() if slot.job.id == job_id]
        if not slots:
            self.log.warning("Worker %s: not working on job %s, command ignored", self.name, job_id)
        for slot in slots:
            self._stop(slot)

    def _stop(self, slot: _Slot) -> None:
        if slot.control.trigger(STOPPED):
            self.log.info("Worker %s: job %s asked to stop (stop-job)", self.name, slot.job.id)
        else:
            self.log.info("Worker %s: job %s already stopping (%s)", self.name, slot.job.id, slot.control.reason)

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        # Worker.kill_horse() signals the process group of `horse_pid`, which is 0 here: that would be ours.
        self.log.warning("Worker %s: no work horse to kill in thread mode", self.name)

    # -- the job's thread ---------------------------------------------------------------------------------------

    def _run_slot(self, slot: _Slot) -> None:
        _local.control = slot.control
        try:
            with self._execution_context(slot.job):
                self.perform_job(slot.job, slot.queue, slot.execution)
        except BaseException:
            self.log.exception("Worker %s: job thread of %s failed outside the job", self.name, slot.job.id)
            if slot.claim(slot.control.reason):
                self._finish(slot, exc_info=sys.exc_info())
        finally:
            _local.control = None

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """Worker.perform_job for a thread: the deadline is the control's, and the end is recorded only if the
        supervisor has not already recorded it (the job overran its grace and its thread was abandoned)."""
        slot = self._slot_of(execution)
        return_value: Any = None
        exc_info: Any = None
        try:
            self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
            job.started_at = now()
            slot.control._arm(job.timeout or self.queue_class.DEFAULT_TIMEOUT)
            self._supervisor_wake.set()
            return_value = job.perform()
        except BaseException:
            exc_info = sys.exc_info()
        if not slot.claim(slot.control.reason):
            outcome = "raised" if exc_info else "returned"
            self.log.warning(
                "Worker %s: job %s %s after its end was recorded (%s); result discarded",
                self.name,
                job.id,
                outcome,
                slot.control.reason,
            )
            return False
        self._finish(slot, return_value=return_value, exc_info=exc_info)
        return exc_info is None

    def _slot_of(self, execution: Execution) -> _Slot:
        with self._cond:
            return self._slots[execution.id]

    # -- recording a job's end (job thread, finisher thread, or the main thread at exit) -------------------------

    def _finish(
        self,
        slot: _Slot,
        return_value: Any = None,
        exc_info: Any = None,
        forced: bool = False,
        *,
        keep_trying: bool = True,
    ) -> None:
        """Record the end in RQ through Worker's own handlers, tell the application if abnormal, free the slot.

        While Redis is away the record is tried again, backing off, for up to `record_retry_for` seconds: a job
        whose end RQ never hears of keeps its rate-limit slot (its team's share of the workers) until RQ's
        clean-up takes it for abandoned, a minute or two later, and meanwhile none of the team's waiting turns
        may start. Not with `keep_trying` False (the main thread: its work loop, or the process's exit, must not
        wait for Redis)."""
        job, reason = slot.job, slot.end_reason
        stopped = "Job stopped by user (stop-job command)" + (
            f"; it did not return within {self.interrupt_grace:g} s and its thread was abandoned" if forced else ""
        )
        try:
            self._record_end(slot, stopped, return_value, exc_info, self.record_retry_for if keep_trying else 0.0)
        except Exception:
            self.log.exception("Worker %s: could not record the end of job %s", self.name, job.id)
        finally:
            try:
                if reason == STOPPED:
                    self._tell_application(job, STOPPED, stopped, forced)
                elif exc_info is not None:
                    failure = "".join(traceback.format_exception(*exc_info))
                    self._tell_application(job, reason or EXCEPTION, failure, forced)
            finally:
                self._release(slot)

    def _record_end(self, slot: _Slot, stopped: str, return_value: Any, exc_info: Any, retry_for: float) -> None:
        job, queue, execution = slot.job, slot.queue, slot.execution

        def record() -> None:
            if slot.end_reason == STOPPED:
                self._record_stopped(job, queue, execution, stopped)
            elif exc_info is None:
                self._finalize_success(job, queue, execution, return_value)
            else:
                self._finalize_failure(job, queue, execution, exc_info)

        record_end_retrying(self, job, record, retry_for, self._supervisor_stop)

    def _record_stopped(self, job: Job, queue: Queue, execution: Execution, message: str) -> None:
        # What Worker._handle_stopped_job does after its horse was killed: stopped callback, then STOPPED.
        job.ended_at = now()
        try:
            execute_stopped_callback(job, self.death_penalty_class)
        except Exception:
            self.log.exception("Worker %s: stopped callback for job %s raised", self.name, job.id)
        self.log.warning("Worker %s: job %s stopped by user, moving job to FailedJobRegistry", self.name, job.id)
        self.handle_job_failure(job, queue=queue, exc_string=message, execution=execution)

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        with self._cond:
            slot = self._slots.get(execution.id) if execution is not None else None
        self._stopped_job_id = job.id if slot is not None and slot.end_reason == STOPPED else None
        try:
            super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        finally:
            self._stopped_job_id = None

    def _tell_application(self, job: Job, reason: str, message: str, forced: bool) -> None:
        if self._abnormal_end_handler is None:
            return
        status = job.get_status(refresh=False)
        end = AbnormalEnd(
            reason=reason,
            message=message,
            forced=forced,
            retried=status in (JobStatus.QUEUED, JobStatus.SCHEDULED),
            worker_name=self.name,
        )
        try:
            self._abnormal_end_handler(job, end)
        except Exception:
            self.log.exception("Worker %s: abnormal-end handler failed for job %s", self.name, job.id)

    def _report_abandoned_job(self, job: Job, exc_type: Any, exc_value: Any, tb: Any) -> None:
        """An exception handler: RQ's StartedJobRegistry cleanup calls it (in whichever worker holds the
        queue's maintenance lock) for each job whose worker stopped heartbeating, before failing or retrying it."""
        if exc_type is not AbandonedJobError or self._abnormal_end_handler is None:
            return
        end = AbnormalEnd(
            reason=ABANDONED,
            message=f"AbandonedJobError: worker {job.worker_name} stopped heartbeating while running the job",
            forced=True,
            retried=bool(job.retries_left and job.retries_left > 0),
            worker_name=job.worker_name or "",
        )
        try:
            with self._execution_context(job):
                self._abnormal_end_handler(job, end)
        except Exception:
            self.log.exception("Worker %s: abnormal-end handler failed for abandoned job %s", self.name, job.id)

    def _release(self, slot: _Slot) -> None:
        with _controls_lock:
            if _controls.get(slot.job.id) is slot.control:
                del _controls[slot.job.id]
        with self._cond:
            self._slots.pop(slot.execution.id, None)
            self._cond.notify_all()
            if not self._slots and not self._dispatching and self.get_state() == WorkerStatus.BUSY:
                with contextlib.suppress(redis.RedisError):
                    self.set_state(WorkerStatus.IDLE)

    # -- the supervisor: deadlines, graces, heartbeats ----------------------------------------------------------

    def _supervise(self) -> None:
        next_beat = time.monotonic() + self.job_monitoring_interval
        while not self._supervisor_stop.is_set():
            wake_at = next_beat
            try:
                if self._shutdown_date_pending:
                    self._shutdown_date_pending = False
                    self.set_shutdown_requested_date()
                wake_at = min(wake_at, self._enforce_limits())
                if time.monotonic() >= next_beat:
                    self._heartbeat_running()
                    next_beat = time.monotonic() + self.job_monitoring_interval
                    wake_at = min(wake_at, next_beat)
            except Exception:
                self.log.exception("Worker %s: supervisor pass failed; retrying", self.name)
                wake_at = time.monotonic() + 1.0
            self._supervisor_wake.wait(min(max(0.0, wake_at - time.monotonic()), 1.0))
            self._supervisor_wake.clear()

    def _enforce_limits(self) -> float:
        """Set the controls of jobs past their deadline; record the end of jobs past their grace.
        Returns when the next such moment is due."""
        wake_at = float("inf")
        with self._cond:
            slots = list(self._slots.values())
        for slot in slots:
            control = slot.control
            moment = time.monotonic()
            if not control.is_set() and control.deadline is not None:
                if moment >= control.deadline:
                    self.log.warning(
                        "Worker %s: job %s exceeded its %s s timeout; asking it to stop",
                        self.name,
                        slot.job.id,
                        control.timeout,
                    )
                    control.trigger(TIMEOUT)
                else:
                    wake_at = min(wake_at, control.deadline)
            if control.is_set() and not slot.claimed and control.set_at is not None:
                give_up = control.set_at + self.interrupt_grace
                if moment >= give_up:
                    self._force_end(slot)
                else:
                    wake_at = min(wake_at, give_up)
        return wake_at

    def _force_end(self, slot: _Slot) -> None:
        """The job did not return within interrupt_grace of its control being set: record its end on a thread
        of its own (callbacks and the application's handler may block) and abandon the job's thread."""
        reason = slot.control.reason
        if not slot.claim(reason):
            return
        self.log.error(
            "Worker %s: job %s did not return within %g s of being told to stop (%s); recording its end and "
            "abandoning its thread",
            self.name,
            slot.job.id,
            self.interrupt_grace,
            reason,
        )
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        if slot.thread is not None:
            self._abandoned.append(slot.thread)
        exc_info = _forced_exc_info(reason, slot.control.timeout, self.interrupt_grace)
        finisher = threading.Thread(
            target=self._finish_forced, args=(slot, exc_info), name=f"rq-end-{slot.job.id}", daemon=True
        )
        self._finishers = [t for t in self._finishers if t.is_alive()] + [finisher]
        finisher.start()

    def _finish_forced(self, slot: _Slot, exc_info: Any) -> None:
        try:
            with self._execution_context(slot.job):
                self._finish(slot, exc_info=exc_info, forced=True)
        except Exception:
            self.log.exception("Worker %s: could not record the forced end of job %s", self.name, slot.job.id)
            self._release(slot)

    def _heartbeat_running(self) -> None:
        """Worker.maintain_heartbeats for every running job, in one round trip."""
        with self._cond:
            slots = [slot for slot in self._slots.values() if not slot.claimed]
        if not slots:
            return
        ttl = self.get_heartbeat_ttl(slots[0].job)
        with self.connection.pipeline() as pipeline:
            self.heartbeat(ttl, pipeline=pipeline)
            job_heartbeats = []
            for slot in slots:
                slot.execution.heartbeat(slot.job.started_job_registry, ttl, pipeline=pipeline)
                job_heartbeats.append(len(pipeline))
                slot.job.heartbeat(now(), ttl, pipeline=pipeline)
            results = pipeline.execute()
            # As in maintain_heartbeats: an HSET that created a key means it had expired or been deleted meanwhile.
            for slot, index in zip(slots, job_heartbeats, strict=True):
                if results[index] == 1:
                    pipeline.delete(slot.job.key)
            if results[0] == 1:
                pipeline.hset(self.key, mapping=self.serialize())
                pipeline.expire(self.key, ttl)
            pipeline.execute()

    # -- shutdown -----------------------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self._drain()
        finally:
            try:
                self._end_unclaimed()
            finally:
                self._supervisor_stop.set()
                self._supervisor_wake.set()
                if self._shutdown_date_pending:  # the supervisor had no time to write it
                    self._shutdown_date_pending = False
                    with contextlib.suppress(redis.RedisError):
                        self.set_shutdown_requested_date()
                super().teardown()

    def _drain(self) -> None:
        """Wait for running jobs: without limit when the loop ended by itself (burst, max_jobs; each job still
        has its own deadline), `shutdown_grace` after a stop request; then set the remaining controls
        ("shutdown") and give them `interrupt_grace` to return before the supervisor records their end."""
        if not self._slots:
            return
        self.log.info("Worker %s: waiting for %d running jobs", self.name, len(self._slots))
        while not self._cold:
            with self._cond:
                if not self._slots:
                    return
                started = self._stop_requested_at
                if started is not None and time.monotonic() >= started + self.shutdown_grace:
                    break
                self._cond.wait(0.25)
        if self._cold:
            return
        with self._cond:
            slots = list(self._slots.values())
        self.log.warning(
            "Worker %s: shutdown grace of %g s is over; interrupting %d jobs",
            self.name,
            self.shutdown_grace,
            len(slots),
        )
        for slot in slots:
            slot.control.trigger(SHUTDOWN)
        # The supervisor records the end of each job that has not returned by set_at + interrupt_grace; allow
        # for that, and for the finishers' Redis round trips.
        deadline = time.monotonic() + self.interrupt_grace + 10.0
        with self._cond:
            while self._slots and not self._cold and time.monotonic() < deadline:
                self._cond.wait(0.25)

    def _end_unclaimed(self) -> None:
        """At exit: record the end of every job nobody has recorded yet (a cold shutdown, or a supervisor that
        could not), then give ends being recorded a moment to reach Redis."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._ignore_signal)
        with self._cond:
            slots = list(self._slots.values())
        for slot in slots:
            slot.control.trigger(SHUTDOWN)
            if slot.claim(slot.control.reason):
                if slot.thread is not None:
                    self._abandoned.append(slot.thread)
                exc_info = _forced_exc_info(slot.control.reason, slot.control.timeout, None)
                with self._execution_context(slot.job):
                    self._finish(slot, exc_info=exc_info, forced=True, keep_trying=False)
        deadline = time.monotonic() + 5.0
        with self._cond:
            while self._slots and time.monotonic() < deadline:
                self._cond.wait(0.1)
        for finisher in self._finishers:
            finisher.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in self._abandoned if t.is_alive()]
        if alive:
            self.log.warning("Worker %s: exiting with %d abandoned job threads", self.name, len(alive))

    # -- introspection ------------------------------------------------------------------------------------------

    def running_jobs(self) -> list[Job]:
        """The jobs whose end has not been recorded yet."""
        with self._cond:
            return [slot.job for slot in self._slots.values()]

    def abandoned_threads(self) -> int:
        """Threads of jobs whose end was recorded without them returning, still alive."""
        return sum(1 for thread in self._abandoned if thread.is_alive())


def record_end_retrying(
    worker: Worker, job: Job, record: Callable[[], None], retry_for: float, stop: threading.Event
) -> None:
    """Run `record` (RQ's recording of a job's end) until Redis takes it, backing off from RECORD_RETRY_FIRST
    to RECORD_RETRY_MAX, for up to `retry_for` seconds or until `stop` is set; then the RedisError is raised."""
    delay, give_up, attempts = RECORD_RETRY_FIRST, time.monotonic() + retry_for, 0
    while True:
        try:
            # After an attempt that failed half-way: RQ has the job started still (each step is redone, setting what
            # RQ may hold already), or its end is recorded and only the release of its rate-limit slot may be left.
            if attempts and job.get_status(refresh=True) != JobStatus.STARTED:
                if job.has_rate_limit:
                    RateLimitRegistry.from_job(job).release_stale_and_enqueue(job.id)
                return
            attempts += 1
            record()
            return
        except redis.RedisError as exc:
            if time.monotonic() + delay > give_up or stop.is_set():
                raise
            worker.log.warning(
                "Worker %s: could not record the end of job %s (%s); trying again in %.1f s",
                worker.name,
                job.id,
                exc,
                delay,
            )
            stop.wait(delay)
            delay = min(2 * delay, RECORD_RETRY_MAX)


class RecordingForkWorker(Worker):
    """Fork mode: RQ's own Worker (one forked work horse per job), whose horse tries the record of its job's end
    again while Redis is away, as the thread pool does (`record_end_retrying`, for `record_retry_for` seconds).
    RQ's horse tries once and exits; the job then keeps its rate-limit slot (its team's share of the workers)
    until RQ's clean-up takes it for abandoned. The parent keeps heartbeating the job meanwhile, so the clean-up
    does not take it while the horse is still trying."""

    def __init__(self, *args: Any, record_retry_for: float = 120.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.record_retry_for = float(record_retry_for)

    def _finalize_success(self, job: Job, queue: Queue, execution: Execution, return_value: Any) -> None:
        finalize = super()._finalize_success
        self._retrying(job, lambda: finalize(job, queue, execution, return_value))

    def _finalize_failure(self, job: Job, queue: Queue, execution: Execution, exc_info: Any) -> None:
        finalize = super()._finalize_failure
        self._retrying(job, lambda: finalize(job, queue, execution, exc_info))

    def _retrying(self, job: Job, record: Callable[[], None]) -> None:
        # Only in the horse: the parent records a horse's death from its work loop, which must not wait for Redis.
        record_end_retrying(self, job, record, self.record_retry_for if self._is_horse else 0.0, threading.Event())


def _forced_exc_info(
    reason: str | None, timeout: float | None, grace: float | None
) -> tuple[type, BaseException, None]:
    """The failure recorded for a job that did not return: what RQ's own mechanisms would have raised in it.
    `grace` is how long it was given after its control was set; None: none, the worker exited (cold shutdown)."""
    if grace is None:
        late = "; the worker exited (cold shutdown) before it returned, so its thread was abandoned"
    else:
        late = f"; it did not return within {grace:g} s of being told to stop, so its thread was abandoned"
    if reason == TIMEOUT:
        exc: BaseException = JobTimeoutException(f"Task exceeded maximum timeout value ({timeout} seconds){late}")
    else:  # SHUTDOWN; what HerokuWorker raises in a horse on SIGTERM
        exc = ShutDownImminentException(f"shut down imminent: the worker shut down before the job ended{late}", {})
    return type(exc), exc, None


# -- a command line without the application (tests, benchmarks) ---------------------------------------------------


def _import_attribute(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.pool", description=__doc__.splitlines()[0])
    parser.add_argument("queues", nargs="+")
    parser.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--mode", choices=["thread", "fork"], default="thread", help="fork: rq's own Worker")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--name")
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--shutdown-grace", type=float, default=20.0)
    parser.add_argument("--interrupt-grace", type=float, default=5.0)
    parser.add_argument("--job-monitoring-interval", type=int, default=10, help="heartbeat period, seconds")
    parser.add_argument("--heartbeat-margin", type=int, default=20)
    parser.add_argument("--record-retry-for", type=float, default=120.0, help="seconds a job's end is retried")
    parser.add_argument("--reserved-queue", action="append", default=[], help="a queue with slots of its own")
    parser.add_argument("--reserved-concurrency", type=int, default=0, help="those slots, beyond --concurrency")
    parser.add_argument("--maintenance-interval", type=int, default=60)
    parser.add_argument("--worker-ttl", type=int, default=75, help="also bounds a blocking dequeue (TTL - 15 s)")
    parser.add_argument("--abnormal-end-handler", help="module:function called as f(job, AbnormalEnd)")
    parser.add_argument("--preload", action="append", default=[], help="import this module first (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    for module in args.preload:
        importlib.import_module(module)
    connection = redis.Redis.from_url(args.url)
    common: dict[str, Any] = {
        "connection": connection,
        "name": args.name,
        "job_monitoring_interval": args.job_monitoring_interval,
        "maintenance_interval": args.maintenance_interval,
        "worker_ttl": args.worker_ttl,
    }
    worker: Worker
    if args.mode == "fork":
        worker = RecordingForkWorker(args.queues, record_retry_for=args.record_retry_for, **common)
    else:
        handler = _import_attribute(args.abnormal_end_handler) if args.abnormal_end_handler else None
        worker = ThreadPoolWorker(
            args.queues,
            concurrency=args.concurrency,
            shutdown_grace=args.shutdown_grace,
            interrupt_grace=args.interrupt_grace,
            heartbeat_margin=args.heartbeat_margin,
            record_retry_for=args.record_retry_for,
            reserved_queues=args.reserved_queue,
            reserved_concurrency=args.reserved_concurrency,
            abnormal_end_handler=handler,
            **common,
        )
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
    worker.work(burst=args.burst, logging_level=args.log_level)
    return 0


if __name__ == "__main__":
    # Run the copy importable as `workers.pool`, so job code calling `workers.pool.current_control()` sees the
    # same thread-locals as the worker (under `python -m` this file is also loaded as `__main__`).
    from workers.pool import main as _main

    raise SystemExit(_main())
