"""Start an RQ worker with the app's configuration, plus the periodic reaper of lost turns.

Usage: python -m workers [QUEUE ...] [--burst] [--name NAME] [--no-reaper] [--mode fork|thread] [--concurrency N]
Any number of these may run on any number of machines against the same MongoDB and Redis.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading

from rq import Worker

from agentcloud_clone import create_app
from agentcloud_clone.jobs.turns import end_turn_of_killed_job, reap_lost_turns
from agentcloud_clone.queueing import get_redis

log = logging.getLogger("workers")


def _reaper_loop(app, stop: threading.Event) -> None:  # type: ignore[no-untyped-def]
    interval = float(app.config["REAPER_INTERVAL"])
    while not stop.wait(interval):
        try:
            with app.app_context():
                reap_lost_turns()
        except Exception:
            log.exception("reaper pass failed; retrying next interval")


def _end_turn(app, job, pid: int, status: int) -> None:  # type: ignore[no-untyped-def]
    try:
        with app.app_context():
            end_turn_of_killed_job(job, pid, status)
    except Exception:
        log.exception("could not end the session of killed job %s; the reaper will", job.id)


def _thread_worker(app, queues: list[str], name: str | None, concurrency: int | None):  # type: ignore[no-untyped-def]
    """Thread mode (workers/pool.py): up to `concurrency` turns at once in threads of this process."""
    from workers.pool import ThreadPoolWorker

    def ended_abnormally(job, end) -> None:  # type: ignore[no-untyped-def]
        # The analogue of a killed work horse: the turn's thread did not return and was abandoned.
        if end.forced and not end.retried:
            _end_turn(app, job, os.getpid(), -1)

    return ThreadPoolWorker(
        queues,
        connection=get_redis(),
        name=name,
        concurrency=concurrency or int(app.config.get("TURN_CONCURRENCY") or 10),
        execution_context=lambda job: app.app_context(),
        abnormal_end_handler=ended_abnormally,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.splitlines()[0])
    parser.add_argument("queues", nargs="*", help="queues to serve (default: the TURN_QUEUE setting)")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--name", help="worker name (default: host and pid)")
    parser.add_argument("--no-reaper", action="store_true", help="do not run the periodic reaper here")
    parser.add_argument("--mode", choices=["fork", "thread"], default="fork", help="fork: one turn per process")
    parser.add_argument("--concurrency", type=int, help="turns at once in thread mode (default TURN_CONCURRENCY)")
    args = parser.parse_args(argv)

    app = create_app({"CREATE_INDEXES": True})
    stop = threading.Event()
    with app.app_context():
        queues = args.queues or [app.config["TURN_QUEUE"]]
        if not args.no_reaper:
            threading.Thread(target=_reaper_loop, args=(app, stop), name="reaper", daemon=True).start()
        if args.mode == "thread":
            worker = _thread_worker(app, queues, args.name, args.concurrency)
        else:
            worker = Worker(
                queues,
                connection=get_redis(),
                name=args.name,
                work_horse_killed_handler=lambda job, pid, status, _rusage: _end_turn(app, job, pid, status),
            )
        log.info("worker %s serving %s", worker.name, ", ".join(queues))
        try:
            worker.work(burst=args.burst, logging_level=app.config.get("LOG_LEVEL", "INFO"))
        finally:
            stop.set()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
