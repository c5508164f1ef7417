"""Redis: the turn queue (RQ) and the notice channel that wakes workers when a session they run is cancelled."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import redis
from flask import current_app
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.rate_limit import RateLimit, RateLimitRegistry

log = logging.getLogger(__name__)

# The turn job, by the dotted path RQ stores; jobs/turns.py asserts it names `run_turn`, so a rename cannot
# silently break the handler that ends the session of a killed job.
TURN_JOB = "agentcloud_clone.jobs.turns.run_turn"
BULK_CANCEL_JOB = "agentcloud_clone.jobs.bulk.run_bulk_cancel"
WEBHOOK_JOB = "agentcloud_clone.jobs.webhooks.deliver_webhook"

_clients: dict[tuple[int, str], redis.Redis] = {}
_lock = threading.Lock()


# Connections one process may hold at once. A blocking pool waits (up to its timeout) for a free one rather
# than failing, which matters under gevent, where a burst of requests asks for many at the same moment.
POOL_SIZE = 100


def redis_for(url: str) -> redis.Redis:
    """A Redis client for `url`, one per process."""
    key = (os.getpid(), url)
    with _lock:
        client = _clients.get(key)
        if client is None:
            pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=POOL_SIZE,
                timeout=5,
                socket_connect_timeout=2,
                socket_timeout=5,
                health_check_interval=30,
            )
            client = _clients[key] = redis.Redis(connection_pool=pool)
        return client


def get_redis() -> redis.Redis:
    """The app's Redis client."""
    return redis_for(current_app.config["REDIS_URL"])


def turn_queue() -> Queue:
    """The RQ queue session turns go to."""
    return Queue(current_app.config["TURN_QUEUE"], connection=get_redis())


def turn_job_id(turn_id: str) -> str:
    """The RQ job id of a turn: found from the session's `activeTurnId` alone."""
    return f"turn-{turn_id}"


def team_slots(team_id: str) -> RateLimit:
    """The team's share of the workers: at most TEAM_MAX_ACTIVE_TURNS of its turns queued or running at once
    (RQ's own concurrency limit: the others wait, oldest first, and are queued as slots free)."""
    key = f"{current_app.config['REDIS_PREFIX']}:team:{team_id}"
    return RateLimit(key=key, concurrency=int(current_app.config["TEAM_MAX_ACTIVE_TURNS"]))


def enqueue_turn(team_id: str, session_id: str, turn_id: str) -> str:
    """Queue one turn of a session; raises RedisError when the queue is unreachable.

    Fair across teams: a team's turns take at most its slots, and the turn of a team with none in use goes to
    the front of the queue, so another team's backlog delays it by no more than a worker's next free moment."""
    slots = team_slots(team_id)
    idle_team = RateLimitRegistry(slots.key, connection=get_redis()).get_allowed_job_count() == 0
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
        rate_limit=slots,
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


def enqueue_webhook_delivery(delivery_id: str) -> None:
    """Queue one delivery attempt now. (Retries wait in MongoDB until the reaper queues them when due: no RQ
    scheduler process is needed.)"""
    webhook_queue().enqueue(WEBHOOK_JOB, delivery_id, job_timeout=60, result_ttl=600, failure_ttl=86400)


def drop_queued_turn(turn_id: str) -> None:
    """Take a turn that will never run out of the queue (RQ's own job cancel). Best effort: a job left behind
    finds its session ended when a worker picks it up, and skips it."""
    try:
        Job.fetch(turn_job_id(turn_id), connection=get_redis()).cancel()
    except (NoSuchJobError, InvalidJobOperation):
        pass
    except redis.RedisError:
        log.warning("queued turn %s not removed from the queue (Redis unavailable); a worker will skip it", turn_id)


def turn_is_queued(turn_id: str) -> bool:
    """Whether the turn's job is waiting in the queue or running."""
    try:
        job = Job.fetch(turn_job_id(turn_id), connection=get_redis())
    except NoSuchJobError:
        return False
    waiting = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.RATE_LIMITED)
    return job.get_status(refresh=False) in waiting


def cancel_channel(prefix: str) -> str:
    """The pub/sub channel cancel notices travel on, per deployment (REDIS_PREFIX)."""
    return f"{prefix}:cancel"


def publish_cancel(session_id: str) -> None:
    """Wake the worker running this session now; MongoDB polling stays the source of truth if this is lost."""
    if not current_app.config["CANCEL_PUBSUB"]:
        return
    try:
        get_redis().publish(cancel_channel(current_app.config["REDIS_PREFIX"]), session_id)
    except redis.RedisError:
        log.warning("cancel notice for session %s not published; the worker will see it by polling", session_id)
