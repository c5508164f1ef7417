"""Redis: the turn queue (RQ), the notice channel that wakes workers when a session they run is cancelled, and the
connections everything else in the product shares (rate limits, metrics, transcript notices).

Redis helps but is never the truth, so nothing that can do without it waits for it:

- The product's connections have short timeouts (`REDIS_TIMEOUT`, 1 s), and a per-process circuit breaker
  (breakers.py): after one failure every call fails at once, until a background probe sees Redis answer.
- What is only a courtesy (cancel notices, transcript notices, dropping a queued job that a worker would skip
  anyway) goes through a per-process outbox thread, so a request never waits on it.
- RQ's own worker loop gets a connection of its own: RQ raises its socket timeout above its blocking dequeue
  (about 70 s), which must not leak into the product's calls.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis
from bson import json_util
from bson.json_util import CANONICAL_JSON_OPTIONS
from flask import current_app
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.rate_limit import RateLimit, RateLimitRegistry

from .background import BackgroundQueue
from .breakers import Breaker, breaker_for

log = logging.getLogger(__name__)

# The turn job, by the dotted path RQ stores; jobs/turns.py asserts it names `run_turn`, so a rename cannot
# silently break the handler that ends the session of a killed job.
TURN_JOB = "agentcloud_clone.jobs.turns.run_turn"
BULK_CANCEL_JOB = "agentcloud_clone.jobs.bulk.run_bulk_cancel"
WEBHOOK_JOB = "agentcloud_clone.jobs.webhooks.deliver_webhook"

# Connections one process may hold at once. A blocking pool waits (briefly) for a free one rather than failing,
# which matters under gevent, where a burst of requests asks for many at the same moment.
POOL_SIZE = 100
# Seconds a command may take before Redis counts as unavailable (Config.REDIS_TIMEOUT overrides it). Redis answers
# in well under a millisecond; a second is only ever waited for when it is not answering.
REDIS_TIMEOUT = 1.0
# The rate limiter's connections: shorter still, since a limiter that cannot reach Redis just counts in memory.
LIMITER_TIMEOUT = 0.5
# Best-effort commands a process keeps queued before dropping new ones.
OUTBOX_SIZE = 10_000
# Cancel notices carry their stamp in Extended JSON that gives back the same BSON values (timezone-aware dates).
EXACT = CANONICAL_JSON_OPTIONS.with_options(tz_aware=True)


class RedisUnavailableError(redis.ConnectionError):
    """Raised at once, without touching the network, while this process's breaker for Redis is open."""


def _breaker(url: str, purpose: str = "") -> Breaker:
    probe_client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    return breaker_for(f"redis {_redacted(url)}{purpose}", probe_client.ping)


def _redacted(url: str) -> str:
    _, sep, tail = url.rpartition("@")
    return f"redis://***@{tail}" if sep else url


class GuardedConnection(redis.Connection):
    """A connection that fails at once while Redis is known to be away (any of `breakers` open), and trips
    `reports_to` when it meets a failure itself."""

    def __init__(self, *args: Any, breakers: tuple[Breaker, ...], reports_to: Breaker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.breakers, self.reports_to = breakers, reports_to

    def _check(self) -> None:
        if not all(breaker.allow() for breaker in self.breakers):
            raise RedisUnavailableError("Redis is unavailable (failing fast until it answers again)")

    def _failed(self, exc: Exception) -> None:
        if not isinstance(exc, RedisUnavailableError):
            self.reports_to.trip(exc)

    def connect(self) -> None:
        self._check()
        try:
            super().connect()  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._failed(exc)
            raise

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self._check()
        try:
            super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._failed(exc)
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._failed(exc)
            raise


class GuardedPool(redis.BlockingConnectionPool):
    """Checks the breakers before waiting for a free connection, and again once it has one (one may have opened
    while every connection was stuck on a hung server)."""

    def _check(self) -> None:
        if not all(breaker.allow() for breaker in self.connection_kwargs["breakers"]):
            raise RedisUnavailableError("Redis is unavailable (failing fast until it answers again)")

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        connection = super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        try:
            self._check()
        except RedisUnavailableError:
            self.release(connection)  # type: ignore[no-untyped-call]
            raise
        return connection


_clients: dict[tuple[int, str, float, str], redis.Redis] = {}
_lock = threading.Lock()


def _guarded_client(url: str, timeout: float, purpose: str) -> redis.Redis:
    key = (os.getpid(), url, timeout, purpose)
    with _lock:
        client = _clients.get(key)
        if client is None:
            shared = _breaker(url)
            own = _breaker(url, purpose) if purpose else shared
            pool = GuardedPool.from_url(
                url,
                connection_class=GuardedConnection,
                breakers=(shared, own) if own is not shared else (shared,),
                reports_to=own,
                max_connections=POOL_SIZE,
                timeout=max(timeout, 0.5),
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                health_check_interval=30,
            )
            client = _clients[key] = redis.Redis(connection_pool=pool)
        return client


def redis_for(url: str, timeout: float = REDIS_TIMEOUT) -> redis.Redis:
    """The product's Redis client for `url`, one per process: short timeouts, failing fast while Redis is away."""
    return _guarded_client(url, timeout, "")


def limiter_pool(url: str) -> redis.ConnectionPool:
    """The rate limiter's connections: they skip Redis while it is known to be away, and trip a breaker of their
    own, so the limiter's periodic check for Redis costs nothing while it is still away, while their short
    timeouts (which the limiter answers by counting in memory) never fail the rest of the product."""
    return _guarded_client(url, LIMITER_TIMEOUT, " (rate limits)").connection_pool


def rq_connection(url: str) -> redis.Redis:
    """A connection for RQ's worker loop alone (RQ sets its own socket timeout, above its blocking dequeue)."""
    return redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(url, max_connections=POOL_SIZE, socket_connect_timeout=2)
    )


def redis_available(url: str) -> bool:
    """False while this process's breaker for `url` is open (no I/O)."""
    return _breaker(url).allow()


def get_redis() -> redis.Redis:
    """The app's Redis client."""
    return redis_for(current_app.config["REDIS_URL"], float(current_app.config["REDIS_TIMEOUT"]))


def _send(items: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    for function, args in items:
        try:
            function(*args)
        except redis.RedisError as exc:
            log.debug("%s dropped: Redis unavailable (%s)", getattr(function, "__name__", function), exc)


# Redis commands that are only a courtesy: a request or a turn hands them over and goes on; one that cannot be
# sent (Redis away, a full outbox) is dropped.
_outbox: BackgroundQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = BackgroundQueue(
    "redis-outbox", _send, size=OUTBOX_SIZE
)


def send_later(function: Callable[..., Any], *args: Any) -> None:
    """Run `function(*args)` on this process's outbox thread, without waiting for it."""
    _outbox.put((function, args))


def settle_outbox(timeout: float = 5.0) -> bool:
    """Wait for this process's outbox to empty (tests, shutdown)."""
    return _outbox.settle(timeout)


def turn_queue() -> Queue:
    """The RQ queue session turns go to."""
    return Queue(current_app.config["TURN_QUEUE"], connection=get_redis())


def turn_job_id(turn_id: str) -> str:
    """The RQ job id of a turn: found from the session's `activeTurnId` alone."""
    return f"turn-{turn_id}"


def team_slots(team_id: str, slots: int) -> RateLimit:
    """The team's share of the workers: at most `slots` of its turns queued or running at once (RQ's own
    concurrency limit: the others wait, oldest first, and are queued as slots free)."""
    key = f"{current_app.config['REDIS_PREFIX']}:team:{team_id}"
    return RateLimit(key=key, concurrency=slots)


def enqueue_turn(team_id: str, session_id: str, turn_id: str, slots: int) -> str:
    """Queue one turn of a session; raises RedisError when the queue is unreachable.

    Fair across teams: a team's turns take at most its slots, and the turn of a team with none in use goes to
    the front of the queue, so another team's backlog delays it by no more than a worker's next free moment."""
    limit = team_slots(team_id, slots)
    idle_team = RateLimitRegistry(limit.key, connection=get_redis()).get_allowed_job_count() == 0
    job = turn_queue().enqueue(
        TURN_JOB,
        team_id,
        session_id,
        turn_id,
        job_id=turn_job_id(turn_id),
        job_timeout=current_app.config["TURN_TIMEOUT"],
        result_ttl=3600,
        failure_ttl=86400,
        description=f"session {session_id} turn {turn_id}",
        rate_limit=limit,
        at_front=idle_team,
    )
    return str(job.id)


def queue_position(turn_id: str) -> dict[str, Any]:
    """Where a queued turn stands: `{state: "queued", position}` (0 = next) or `{state: "waiting-for-slot",
    position}` (behind the team's other turns); `{}` when it is not waiting (or Redis cannot say)."""
    try:
        job = Job.fetch(turn_job_id(turn_id), connection=get_redis())
        status = job.get_status(refresh=False)
        if status == JobStatus.QUEUED:
            position = turn_queue().get_job_position(job.id)
            return {"state": "queued", "position": position} if isinstance(position, int) else {}
        if status == JobStatus.RATE_LIMITED and job.rate_limit_key:
            waiting = RateLimitRegistry(job.rate_limit_key, connection=get_redis())
            rank = get_redis().zrank(waiting.rate_limited_key, job.id)
            return {"state": "waiting-for-slot", "position": rank if isinstance(rank, int) else 0}
    except (NoSuchJobError, redis.RedisError):
        return {}
    return {}


def enqueue_bulk_cancel(team_id: str, operation_id: str) -> str:
    """Queue the job that applies a bulk cancel; raises RedisError when the queue is unreachable."""
    job = turn_queue().enqueue(
        BULK_CANCEL_JOB,
        team_id,
        operation_id,
        job_id=f"bulk-{operation_id}",
        job_timeout=3600,
        result_ttl=3600,
        failure_ttl=86400,
        description=f"bulk cancel {operation_id}",
    )
    return str(job.id)


def webhook_queue() -> Queue:
    """The RQ queue webhook deliveries go to (workers serve it beside the turn queue)."""
    return Queue(current_app.config["WEBHOOK_QUEUE"], connection=get_redis())


def enqueue_webhook_delivery(delivery_id: str, first: dict[str, Any] | None = None) -> None:
    """Queue one delivery attempt now (`first`: the claimed first attempt, services.webhooks.record_deliveries).
    (Retries wait in MongoDB until the reaper queues them when due: no RQ scheduler process is needed.)"""
    args = (delivery_id,) if first is None else (delivery_id, first)
    webhook_queue().enqueue(WEBHOOK_JOB, *args, job_timeout=60, result_ttl=600, failure_ttl=86400)


# A job in one of these states has not started: taking it out of the queue means it never runs.
# A rate-limited job waits for one of its team's slots (fair scheduling).
NOT_STARTED = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.RATE_LIMITED)


def drop_queued_turn(turn_id: str) -> None:
    """Take a turn that will never run out of the queue (RQ's own job cancel), without waiting for Redis. Best
    effort: a job left behind finds its session ended when a worker picks it up and skips it, and the reaper's
    sweep removes what is left in the queue."""
    send_later(_drop_job, current_app.config["REDIS_URL"], float(current_app.config["REDIS_TIMEOUT"]), turn_id)


def _drop_job(url: str, timeout: float, turn_id: str) -> bool:
    """Cancel the turn's job if it has not started (a started one is its worker's to finish)."""
    connection = redis_for(url, timeout)
    try:
        job = Job.fetch(turn_job_id(turn_id), connection=connection)
        if job.get_status(refresh=False) not in NOT_STARTED:
            return False
        job.cancel()
    except (NoSuchJobError, InvalidJobOperation):
        return False
    return True


def drop_queued_turn_now(turn_id: str) -> bool:
    """`drop_queued_turn`, waiting for the answer (the reaper's sweep); raises RedisError when Redis is away."""
    return _drop_job(current_app.config["REDIS_URL"], float(current_app.config["REDIS_TIMEOUT"]), turn_id)


def queued_turn_jobs(limit: int = 1000) -> list[tuple[str, str, str]]:
    """(team id, session id, turn id) of the turn jobs waiting in the queue (at most `limit`); raises RedisError
    when Redis is away."""
    found: list[tuple[str, str, str]] = []
    queue = turn_queue()
    for job in Job.fetch_many(queue.get_job_ids(0, limit - 1), connection=queue.connection):
        if job is not None and job.func_name == TURN_JOB and len(job.args) == 3:
            team_id, session_id, turn_id = job.args
            found.append((str(team_id), str(session_id), str(turn_id)))
    return found


def turn_is_waiting(turn_id: str) -> bool:
    """Whether the turn's job waits in the queue (not started: a worker will still take it)."""
    try:
        job = Job.fetch(turn_job_id(turn_id), connection=get_redis())
    except NoSuchJobError:
        return False
    status = job.get_status(refresh=False)
    if status == JobStatus.QUEUED:
        # A worker moves a job off the queue before it marks it started: one killed in between leaves the job
        # QUEUED in no queue at all (in RQ's intermediate queue, until RQ's own clean-up minutes later).
        return turn_queue().get_job_position(job.id) is not None
    return status in NOT_STARTED


def forget_taken_turn(turn_id: str) -> None:
    """Take the turn's job out of RQ's intermediate queue, where a worker killed as it took the job left it, before
    the turn is queued again: RQ's clean-up would otherwise fail the job of the same id later."""
    turn_queue().intermediate_queue.remove(turn_job_id(turn_id))


def cancel_channel(prefix: str) -> str:
    """The pub/sub channel cancel notices travel on, per deployment (REDIS_PREFIX)."""
    return f"{prefix}:cancel"


def publish_cancel(session_id: str, stamp: dict[str, Any] | None = None) -> None:
    """Wake the worker running this session now, without waiting for Redis; MongoDB polling stays the source of
    truth if this is lost. With the `stamp` just stored (`cancelledAt`, `cancellation`), the worker ends the
    turn from it without polling first: its ending write is guarded by that stamp, so a notice that does not
    match the session (stale, or not what was stored) only costs that write, and the session is read then."""
    config = current_app.config
    if not config["CANCEL_PUBSUB"]:
        return
    payload = session_id if stamp is None else json_util.dumps({"session": session_id, **stamp}, json_options=EXACT)
    send_later(_publish, config["REDIS_URL"], float(config["REDIS_TIMEOUT"]), cancel_channel(config["REDIS_PREFIX"]),
                 payload)  # fmt: skip


def read_cancel_notice(data: Any) -> tuple[str, dict[str, Any] | None]:
    """A cancel notice's session id, and the stamp it carries (None: a bare notice, or one that cannot be read)."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
    if not text.startswith("{"):
        return text, None
    try:
        notice = json_util.loads(text, json_options=EXACT)
    except ValueError:
        return "", None
    if not isinstance(notice, dict):
        return "", None
    session_id = notice.pop("session", "")
    stamp = (
        notice
        if isinstance(notice.get("cancelledAt"), datetime) and isinstance(notice.get("cancellation"), dict)
        else None
    )
    return str(session_id), stamp


def _publish(url: str, timeout: float, channel: str, payload: str) -> None:
    redis_for(url, timeout).publish(channel, payload)
