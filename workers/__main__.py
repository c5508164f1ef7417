"""Start an RQ worker with the app's configuration, plus the reaper loop and the worker's presence beat.

Usage: python -m workers [QUEUE ...] [--burst] [--name NAME] [--no-reaper] [--mode thread|fork] [--concurrency N]

`thread` (the default, WORKER_MODE) runs up to TURN_CONCURRENCY turns at once in threads of one process;
`fork` runs each turn in a forked process of its own, for runners that are not thread-safe. Any number of
these may run on any number of machines against the same MongoDB and Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from flask import Flask
from pymongo.errors import PyMongoError
from rq import Queue, Worker
from rq.executions import Execution
from rq.job import Job

from agentcloud_clone import create_app
from agentcloud_clone.db import ensure_indexes_once
from agentcloud_clone.jobs import turns
from agentcloud_clone.jobs.reaper import ReaperLoop
from agentcloud_clone.queueing import rq_connection, settle_outbox
from agentcloud_clone.services import webhooks
from workers.pool import RecordingForkWorker

log = logging.getLogger("workers")


# Seconds a fork-mode work horse waits, once its job has returned, for what it still has to send.
HORSE_SETTLE = 5.0


class ForkWorker(RecordingForkWorker):
    """RQ's own Worker (one forked work horse per job; its horse tries the record of the job's end again while
    Redis is away: workers.pool.RecordingForkWorker), whose horse sends what the job left to its background
    threads before it exits: cancel and transcript notices (the Redis outbox) and webhook announcements. RQ ends
    a horse with os._exit as soon as its job is recorded, which would drop them. Before each fork the worker
    brings its list of the teams that have webhook endpoints up to date, which the horse inherits: each horse read
    it afresh otherwise, one store command per turn."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        webhooks.know_teams()
        super().execute_job(job, queue)

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        try:
            return super().perform_job(job, queue, execution)
        finally:
            settle_outbox(HORSE_SETTLE)
            webhooks.settle(HORSE_SETTLE)


def _end_turn(app: Flask, job: Any, pid: int, status: int) -> None:
    try:
        with app.app_context():
            turns.end_turn_of_killed_job(job, pid, status)
    except Exception:
        log.exception("could not end the session of killed job %s; the reaper will", job.id)


def _thread_worker(app: Flask, queues: list[str], name: str | None, concurrency: int) -> Worker:
    """Thread mode (workers/pool.py): up to `concurrency` turns at once in threads of this process, and
    WEBHOOK_CONCURRENCY more slots that only webhook deliveries use (so a delivery never waits behind turns)."""
    from workers.pool import ThreadPoolWorker, current_control

    # The turn job sees the pool's per-job control (rq stop-job, job timeout, shutdown) as a way to stop.
    turns.set_control_provider(current_control)

    @contextlib.contextmanager
    def in_app(job: Any) -> Iterator[None]:
        with app.app_context():
            yield

    def ended_abnormally(job: Any, end: Any) -> None:
        # A turn whose thread did not return in time, or whose process died: end its session now.
        if end.forced and not end.retried:
            with app.app_context():
                turns.end_turn_abandoned(job, end.reason, end.message)

    return ThreadPoolWorker(
        queues,
        # RQ's loop has a connection of its own: it raises the socket timeout above its blocking dequeue, which the
        # product's own calls (short timeouts, failing fast while Redis is away) must not inherit.
        connection=rq_connection(app.config["REDIS_URL"]),
        name=name,
        concurrency=concurrency,
        reserved_queues=[q for q in queues if q == app.config["WEBHOOK_QUEUE"]],
        reserved_concurrency=int(app.config["WEBHOOK_CONCURRENCY"]),
        shutdown_grace=float(app.config["WORKER_SHUTDOWN_GRACE"]),
        interrupt_grace=float(app.config["WORKER_INTERRUPT_GRACE"]),
        execution_context=in_app,
        abnormal_end_handler=ended_abnormally,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.splitlines()[0])
    parser.add_argument("queues", nargs="*", help="queues to serve (default: the TURN_QUEUE setting)")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--name", help="worker name (default: host and pid)")
    parser.add_argument("--no-reaper", action="store_true", help="do not run the periodic reaper here")
    parser.add_argument("--mode", choices=["thread", "fork"], help="thread: many turns per process (WORKER_MODE)")
    parser.add_argument("--concurrency", type=int, help="turns at once in thread mode (TURN_CONCURRENCY)")
    args = parser.parse_args(argv)

    app = create_app({"WEB_REAPER": False})
    try:
        ensure_indexes_once(app, deadline=10.0)  # a worker starting beside a hung MongoDB does not wait long
    except PyMongoError as exc:
        log.warning("indexes not ensured yet (MongoDB unavailable: %s); the reaper retries", exc)
    mode = args.mode or app.config["WORKER_MODE"]
    with app.app_context():
        # Webhook deliveries first: they are short, and issue 15 wants them out within a second of the event.
        queues = args.queues or [app.config["WEBHOOK_QUEUE"], app.config["TURN_QUEUE"]]
        if mode == "thread":
            worker = _thread_worker(app, queues, args.name, args.concurrency or int(app.config["TURN_CONCURRENCY"]))
        else:
            worker = ForkWorker(
                queues,
                connection=rq_connection(app.config["REDIS_URL"]),
                name=args.name,
                work_horse_killed_handler=lambda job, pid, status, _rusage: _end_turn(app, job, pid, status),
            )
        # The reaper thread also beats this worker's presence, which /readyz counts.
        reaper = ReaperLoop(app, worker_name=worker.name)
        if not args.no_reaper:
            reaper.start()
        log.info("worker %s (%s mode, pid %d) serving %s", worker.name, mode, os.getpid(), ", ".join(queues))
        try:
            worker.work(burst=args.burst, logging_level=app.config.get("LOG_LEVEL", "INFO"))
        finally:
            reaper.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
