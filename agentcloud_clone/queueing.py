"""Redis: the turn queue and the cancel notice channel."""

from __future__ import annotations

import logging
import os
import threading

import redis
from flask import current_app
from rq import Queue

log = logging.getLogger(__name__)

_clients: dict[tuple[int, str], redis.Redis] = {}
_lock = threading.Lock()


def redis_for(url: str) -> redis.Redis:
    """A Redis client for `url`, one per process."""
    key = (os.getpid(), url)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)
            _clients[key] = client
        return client


def get_redis() -> redis.Redis:
    """The app's Redis client."""
    return redis_for(current_app.config["REDIS_URL"])


def turn_queue() -> Queue:
    """The RQ queue session turns go to."""
    return Queue(current_app.config["TURN_QUEUE"], connection=get_redis())


def enqueue_turn(team_id: str, session_id: str, turn_id: str) -> str:
    """Queue one turn of a session; the job id is the turn id, so a turn can be found from its session."""
    job = turn_queue().enqueue(
        "agentcloud_clone.jobs.turns.run_turn",
        team_id,
        session_id,
        turn_id,
        job_id=f"turn-{turn_id}",
        job_timeout=current_app.config["TURN_TIMEOUT"],
        result_ttl=3600,
        failure_ttl=86400,
        description=f"session {session_id} turn {turn_id}",
    )
    return job.id


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
