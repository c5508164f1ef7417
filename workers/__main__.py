"""Start an RQ worker with the app's configuration, plus the periodic reaper of lost turns.

Usage: python -m workers [QUEUE ...] [--burst] [--name NAME] [--no-reaper]
Any number of these may run on any number of machines against the same MongoDB and Redis.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from flask import Flask
from pymongo.errors import PyMongoError
from rq import Worker

from agentcloud_clone import create_app
from agentcloud_clone.db import ensure_indexes_once
from agentcloud_clone.jobs.reaper import ReaperLoop
from agentcloud_clone.jobs.turns import end_turn_of_killed_job
from agentcloud_clone.queueing import get_redis

log = logging.getLogger("workers")


def _end_turn(app: Flask, job: Any, pid: int, status: int) -> None:
    try:
        with app.app_context():
            end_turn_of_killed_job(job, pid, status)
    except Exception:
        log.exception("could not end the session of killed job %s; the reaper will", job.id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.splitlines()[0])
    parser.add_argument("queues", nargs="*", help="queues to serve (default: the TURN_QUEUE setting)")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--name", help="worker name (default: host and pid)")
    parser.add_argument("--no-reaper", action="store_true", help="do not run the periodic reaper here")
    args = parser.parse_args(argv)

    app = create_app({"WEB_REAPER": False})
    try:
        ensure_indexes_once(app)
    except PyMongoError as exc:
        log.warning("indexes not ensured yet (MongoDB unavailable: %s); the reaper retries", exc)
    with app.app_context():
        queues = args.queues or [app.config["TURN_QUEUE"]]
        worker = Worker(
            queues,
            connection=get_redis(),
            name=args.name,
            work_horse_killed_handler=lambda job, pid, status, _rusage: _end_turn(app, job, pid, status),
        )
        # The reaper thread also beats this worker's presence, which /readyz counts.
        reaper = ReaperLoop(app, worker_name=worker.name)
        if not args.no_reaper:
            reaper.start()
        log.info("worker %s serving %s", worker.name, ", ".join(queues))
        try:
            worker.work(burst=args.burst, logging_level=app.config.get("LOG_LEVEL", "INFO"))
        finally:
            reaper.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
