"""Thread mode (workers/pool.py) against a real redis-server, with real worker processes and dummy jobs.

Every wait polls for a condition with a generous deadline; overlap and order are shown from what the jobs and
the worker recorded in Redis, not from this process's clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue, RateLimit, Retry, Worker
from rq.command import send_stop_job_command
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.utils import utcparse

from devtools.servers import start_redis
from tests.support import wait_until
from tests.workers.pool_jobs import (
    abnormal_key,
    blocking_reader,
    deaf_until_file,
    failing,
    file_gated,
    gated,
    leaves_a_courtesy,
)
from workers.pool import STOPPED, TIMEOUT, JobControl, JobInterrupted, current_control

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HANDLER = "tests.workers.pool_jobs:record_abnormal_end"
# Fast settings for the worker processes: 1 s heartbeats and job entries that outlive a heartbeat by 4 s.
FAST = {
    "interrupt-grace": 1,
    "shutdown-grace": 3,
    "job-monitoring-interval": 1,
    "heartbeat-margin": 4,
    "maintenance-interval": 1,
    "worker-ttl": 16,  # a blocking dequeue returns every second, so maintenance runs when due
}


class PoolProcess:
    """One `python -m workers.pool` process."""

    def __init__(self, url: str, queue: str, name: str, log_path: Path, mode: str, options: dict[str, Any]) -> None:
        self.name, self.log_path = name, log_path
        argv = [sys.executable, "-m", "workers.pool", "--url", url, "--name", name, "--mode", mode]
        for option, value in options.items():
            argv += [f"--{option}"] if value is True else [f"--{option}", str(value)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [*argv, queue], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid = self.process.pid

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def conn(redis_server: Any) -> Iterator[Redis]:
    connection = Redis.from_url(redis_server.url)
    yield connection
    connection.close()


@pytest.fixture
def queue(conn: Redis) -> Queue:
    return Queue(f"pool-{uuid.uuid4().hex[:10]}", connection=conn)


@pytest.fixture
def keys() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {"log": f"pool-test:{tag}:log", "gate": f"pool-test:{tag}:gate", "never": f"pool-test:{tag}:never"}


@pytest.fixture
def start_pool(redis_server: Any, queue: Queue, conn: Redis, tmp_path: Path) -> Iterator[Callable[..., PoolProcess]]:
    """`start_pool(concurrency=N, **options)` → a worker process registered with RQ and listening."""
    started: list[PoolProcess] = []

    def start(concurrency: int = 3, *, name: str | None = None, mode: str = "thread", **options: Any) -> PoolProcess:
        name = name or f"pool-{uuid.uuid4().hex[:8]}"
        settings = {**FAST, "concurrency": concurrency, "abnormal-end-handler": HANDLER}
        settings.update({key.replace("_", "-"): value for key, value in options.items()})
        if mode == "fork":
            settings = {k: v for k, v in settings.items() if k not in ("concurrency", "abnormal-end-handler")}
        pool = PoolProcess(redis_server.url, queue.name, name, tmp_path / f"{name}.log", mode, settings)
        started.append(pool)
        if not settings.get("burst"):
            wait_until(lambda: not pool.alive() or conn.hget(f"rq:worker:{name}", "state"), 30, f"worker {name}")
            assert pool.alive(), pool.output()
        return pool

    yield start
    for pool in started:
        pool.close()
        print(f"--- {pool.name} (pid {pool.pid}) ---\n{pool.output()[-6000:]}")


def records(conn: Redis, log_key: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in conn.lrange(log_key, 0, -1)]


def of(conn: Redis, log_key: str, event: str) -> dict[str, dict[str, Any]]:
    """The first record of `event` for each tag."""
    found: dict[str, dict[str, Any]] = {}
    for record in records(conn, log_key):
        if record["event"] == event:
            found.setdefault(record["tag"], record)
    return found


def abnormal_ends(conn: Redis, queue: Queue) -> dict[str, list[dict[str, Any]]]:
    ends: dict[str, list[dict[str, Any]]] = {}
    for raw in conn.lrange(abnormal_key(queue.name), 0, -1):
        end = json.loads(raw)
        ends.setdefault(end["job"], []).append(end)
    return ends


def ends_of(conn: Redis, queue: Queue, job: Job, count: int = 1) -> list[dict[str, Any]]:
    """The handler's records for a job, once there are `count` (it runs just after RQ recorded the end)."""
    return wait_until(
        lambda: len(abnormal_ends(conn, queue).get(job.id, [])) >= count and abnormal_ends(conn, queue)[job.id],
        30,
        f"{count} abnormal ends of {job.id}",
    )


def status(job: Job) -> JobStatus:
    return job.get_status(refresh=True)


def failure_text(job: Job) -> str:
    result = job.latest_result()
    assert result is not None, f"no result for {job.id}"
    return result.exc_string or ""


def rq_info(url: str, queue: Queue) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", url, "--raw", queue.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return completed.stdout


def test_jobs_run_concurrently_in_one_process_through_rqs_lifecycle(conn, queue, keys, start_pool, redis_server):
    pool = start_pool(concurrency=4)
    jobs = [queue.enqueue(gated, keys["log"], keys["gate"], f"j{i}") for i in range(4)]
    waiting = queue.enqueue(gated, keys["log"], keys["gate"], "waiting")
    cancelled = queue.enqueue(gated, keys["log"], keys["gate"], "cancelled")
    wait_until(lambda: len(of(conn, keys["log"], "start")) == 4, 30, "four jobs to start")

    # All four slots are taken: the next jobs wait in the queue, and a queued job can still be cancelled.
    assert status(waiting) == JobStatus.QUEUED
    cancelled.cancel()
    assert status(cancelled) == JobStatus.CANCELED and cancelled.id in queue.canceled_job_registry
    ids = {job.id for job in jobs}
    assert set(queue.started_job_registry.get_job_ids()) == ids
    assert {(status(job), Job.fetch(job.id, connection=conn).worker_name) for job in jobs} == {("started", pool.name)}
    [worker] = Worker.all(queue=queue)
    assert (worker.name, worker.pid, worker.get_state()) == (pool.name, pool.pid, "busy")
    assert {execution.job_id for execution in worker.get_current_executions()} == ids
    info = rq_info(redis_server.url, queue)
    assert f"queue {queue.name} 1, 4 executing, 0 finished, 0 failed" in info, info
    assert f"worker {pool.name} (" in info and f" {pool.pid}) busy {queue.name}" in info, info

    conn.set(keys["gate"], 1)
    wait_until(lambda: all(status(job) == JobStatus.FINISHED for job in [*jobs, waiting]), 30, "the jobs to finish")
    starts, ends = of(conn, keys["log"], "start"), of(conn, keys["log"], "end")
    tags = [f"j{i}" for i in range(4)]
    # Every one of the four started before any of them ended: they ran at the same time ...
    assert max(starts[tag]["t"] for tag in tags) < min(ends[tag]["t"] for tag in tags)
    # ... in one process, each in a thread of its own, under the worker's control.
    assert {starts[tag]["pid"] for tag in tags} == {pool.pid}
    assert len({starts[tag]["thread"] for tag in tags}) == 4
    assert all(starts[tag]["control"] for tag in tags)
    assert [job.return_value() for job in jobs] == [f"{tag}:done" for tag in tags]
    assert ids | {waiting.id} <= set(queue.finished_job_registry.get_job_ids())
    assert not queue.started_job_registry.get_job_ids()
    assert "cancelled" not in starts and status(cancelled) == JobStatus.CANCELED
    worker.refresh()
    assert (worker.successful_job_count, worker.failed_job_count) == (5, 0)
    wait_until(lambda: Worker.all(queue=queue)[0].get_state() == "idle", 30, "the worker to be idle")
    assert abnormal_ends(conn, queue) == {}


def test_stop_job_command_stops_only_the_named_job(conn, queue, keys, start_pool):
    pool = start_pool(concurrency=3)
    first, target, last = (queue.enqueue(gated, keys["log"], keys["gate"], tag) for tag in ("first", "target", "last"))
    wait_until(lambda: len(of(conn, keys["log"], "start")) == 3, 30, "three jobs to start")

    send_stop_job_command(conn, target.id)
    wait_until(lambda: status(target) == JobStatus.STOPPED, 30, "the job to be stopped")
    assert target.id in queue.failed_job_registry and target.id not in queue.started_job_registry
    assert "Job stopped by user (stop-job command)" in failure_text(target)
    seen = of(conn, keys["log"], "stop-seen")
    assert seen["target"]["reason"] == STOPPED
    wait_until(lambda: "target" in of(conn, keys["log"], "hook"), 30, "the stop hook")  # it runs on a thread of its own
    assert set(seen) == {"target"}
    [end] = ends_of(conn, queue, target)
    assert (end["reason"], end["forced"], end["retried"]) == ("stopped", False, False)
    # Only that job: the others still run, in the same live process.
    assert pool.alive()
    assert {status(first), status(last)} == {JobStatus.STARTED}
    assert set(queue.started_job_registry.get_job_ids()) == {first.id, last.id}

    conn.set(keys["gate"], 1)
    wait_until(lambda: {status(first), status(last)} == {JobStatus.FINISHED}, 30, "the others to finish")
    assert status(target) == JobStatus.STOPPED and set(abnormal_ends(conn, queue)) == {target.id}


def test_job_over_its_timeout_is_failed_and_its_slot_freed_while_others_continue(conn, queue, keys, start_pool):
    start_pool(concurrency=3)
    deaf = queue.enqueue(gated, keys["log"], keys["gate"], "deaf", on_stop="ignore", job_timeout=2)
    polite = queue.enqueue(gated, keys["log"], keys["gate"], "polite", on_stop="raise", job_timeout=2)
    steady = queue.enqueue(gated, keys["log"], keys["gate"], "steady", job_timeout=120)
    after = queue.enqueue(gated, keys["log"], keys["gate"], "after", job_timeout=120)
    wait_until(lambda: len(of(conn, keys["log"], "start")) == 3, 30, "three jobs to start")

    # The polite job sees its control set ("timeout") and raises what RQ raises on a timeout.
    wait_until(lambda: status(polite) == JobStatus.FAILED, 30, "the polite job to fail")
    assert of(conn, keys["log"], "stop-seen")["polite"]["reason"] == TIMEOUT
    assert "JobTimeoutException: Task exceeded maximum timeout value (2 seconds)" in failure_text(polite)
    # The deaf job ignores it; after the grace the worker records the timeout and frees the slot.
    wait_until(lambda: status(deaf) == JobStatus.FAILED, 30, "the deaf job to be failed")
    assert "JobTimeoutException: Task exceeded maximum timeout value (2 seconds)" in failure_text(deaf)
    assert "its thread was abandoned" in failure_text(deaf)
    assert {deaf.id, polite.id} <= set(queue.failed_job_registry.get_job_ids())
    # Both freed slots are reused while the deaf job's thread is still running (it has recorded no end).
    wait_until(lambda: "after" in of(conn, keys["log"], "start"), 30, "the next job to start")
    assert "deaf" not in of(conn, keys["log"], "end")
    assert status(steady) == JobStatus.STARTED
    assert [(e["reason"], e["forced"]) for e in ends_of(conn, queue, deaf)] == [("timeout", True)]
    assert [(e["reason"], e["forced"]) for e in ends_of(conn, queue, polite)] == [("timeout", False)]

    conn.set(keys["gate"], 1)
    wait_until(lambda: {status(steady), status(after)} == {JobStatus.FINISHED}, 30, "the others to finish")
    # The abandoned thread returns at last; what it returns changes nothing in RQ.
    wait_until(lambda: "deaf" in of(conn, keys["log"], "end"), 30, "the abandoned thread to return")
    assert status(deaf) == JobStatus.FAILED and steady.return_value() == "steady:done"


def test_an_exception_fails_the_job_through_rqs_retry_and_reaches_the_handler(conn, queue, keys, start_pool):
    start_pool(concurrency=2)
    job = queue.enqueue(failing, keys["log"], "boom", retry=Retry(max=1))
    wait_until(lambda: status(job) == JobStatus.FAILED, 30, "the job to fail twice")
    assert len([r for r in records(conn, keys["log"]) if r["event"] == "start"]) == 2
    assert "ValueError: boom failed on purpose" in failure_text(job)
    assert job.id in queue.failed_job_registry
    ends = ends_of(conn, queue, job, 2)
    assert [(e["reason"], e["forced"], e["retried"]) for e in ends] == [
        ("exception", False, True),
        ("exception", False, False),
    ]


def test_sigterm_lets_short_jobs_finish_then_interrupts_long_ones(conn, queue, keys, start_pool, redis_server):
    pool = start_pool(concurrency=3, shutdown_grace=4, interrupt_grace=1)
    short = queue.enqueue(gated, keys["log"], keys["gate"], "short")
    polite = queue.enqueue(gated, keys["log"], keys["never"], "polite", on_stop="raise", retry=Retry(max=1))
    deaf = queue.enqueue(gated, keys["log"], keys["never"], "deaf", on_stop="ignore")
    wait_until(lambda: len(of(conn, keys["log"], "start")) == 3, 30, "three jobs to start")

    pool.signal(signal.SIGTERM)
    requested = wait_until(lambda: conn.hget(f"rq:worker:{pool.name}", "shutdown_requested_date"), 30, "the request")
    late = queue.enqueue(gated, keys["log"], keys["gate"], "late")  # must not be taken any more
    conn.set(keys["gate"], 1)
    wait_until(lambda: status(short) == JobStatus.FINISHED, 30, "the short job to finish during the grace")
    assert pool.wait(60) == 0

    assert short.return_value() == "short:done"
    # After the grace the others' controls were set ("shutdown"): the polite one raised and, having a retry
    # left, RQ queued it again; the deaf one was recorded as RQ records a shut-down horse and left behind.
    seen = of(conn, keys["log"], "stop-seen")
    assert seen["polite"]["reason"] == "shutdown"
    assert seen["polite"]["t"] >= utcparse(requested.decode()).timestamp() + 4 - 0.2
    # A retried job gets no failure result in RQ (only the retry); the handler has the traceback.
    assert status(polite) == JobStatus.QUEUED and Job.fetch(polite.id, connection=conn).retries_left == 0
    assert status(deaf) == JobStatus.FAILED and "ShutDownImminentException" in failure_text(deaf)
    assert deaf.id in queue.failed_job_registry
    ends = abnormal_ends(conn, queue)
    assert [(e["reason"], e["forced"], e["retried"]) for e in ends[polite.id]] == [("shutdown", False, True)]
    assert "JobInterrupted: job interrupted: shutdown" in ends[polite.id][0]["message"]
    assert [(e["reason"], e["forced"], e["retried"]) for e in ends[deaf.id]] == [("shutdown", True, False)]
    # It stopped dequeuing at once, and left nothing running: no started job, no live worker.
    assert status(late) == JobStatus.QUEUED and "late" not in of(conn, keys["log"], "start")
    assert not queue.started_job_registry.get_job_ids()
    assert Worker.all(queue=queue) == []
    info = rq_info(redis_server.url, queue)
    assert f"queue {queue.name} 2, 0 executing, 1 finished, 1 failed" in info, info


def test_more_jobs_than_redis_pys_default_pool_each_holding_a_connection(conn, queue, keys, start_pool):
    # redis-py's pool fails beyond 100 connections; here 120 jobs each hold one (a blocking read) while RQ still
    # needs connections to register, heartbeat and end them, and they all end at once.
    pool = start_pool(concurrency=120, shutdown_grace=0, interrupt_grace=10)
    jobs = [queue.enqueue(blocking_reader, keys["never"]) for _ in range(120)]
    wait_until(lambda: conn.llen(keys["never"] + ":log") == 120, 60, "120 running jobs")
    pool.signal(signal.SIGTERM)  # no grace: every control is set at once, and every job returns at once
    assert pool.wait(60) == 0
    assert "MaxConnectionsError" not in pool.output()
    assert not queue.started_job_registry.get_job_ids()
    assert {(status(job), job.return_value()) for job in jobs} == {(JobStatus.FINISHED, "stopped:shutdown")}


def test_a_second_signal_is_a_cold_shutdown(conn, queue, keys, start_pool):
    pool = start_pool(concurrency=2, shutdown_grace=600, interrupt_grace=600)
    jobs = [queue.enqueue(gated, keys["log"], keys["never"], f"deaf{i}", on_stop="ignore") for i in range(2)]
    wait_until(lambda: len(of(conn, keys["log"], "start")) == 2, 30, "two jobs to start")
    pool.signal(signal.SIGTERM)
    wait_until(lambda: conn.hget(f"rq:worker:{pool.name}", "shutdown_requested_date"), 30, "the warm request")

    # RQ ignores a repeat within 1 s of the first signal, so repeat it until the worker records its death (not
    # after: a signal during interpreter exit meets the default handler). With a 600 s grace only the cold
    # shutdown can end it within this deadline.
    deadline = time.monotonic() + 60
    while not conn.hexists(f"rq:worker:{pool.name}", "death"):
        assert time.monotonic() < deadline and pool.alive(), "no cold shutdown"
        pool.signal(signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: conn.hexists(f"rq:worker:{pool.name}", "death"), 0.3, "death")
    assert pool.wait(30) == 0
    for job in jobs:
        assert status(job) == JobStatus.FAILED and "ShutDownImminentException" in failure_text(job)
    assert not queue.started_job_registry.get_job_ids()
    assert {end["reason"] for ends in abnormal_ends(conn, queue).values() for end in ends} == {"shutdown"}


def test_kill_9_leaves_its_jobs_started_until_rqs_cleanup_in_a_sibling_fails_them(
    conn, queue, keys, start_pool, redis_server
):
    # The victim cleans its queue only at start-up, so it cannot die holding the queue's maintenance lock.
    victim = start_pool(concurrency=3, name=f"victim-{uuid.uuid4().hex[:6]}", maintenance_interval=600)
    jobs = [queue.enqueue(gated, keys["log"], keys["never"], f"j{i}") for i in range(3)]
    wait_until(lambda: len(of(conn, keys["log"], "start")) == 3, 30, "three jobs to start")

    # Alive, its heartbeats keep the jobs' entries (TTL 1 + 4 s) from being taken for abandoned by RQ's own
    # cleanup, run here on every poll, for over twice that TTL.
    ttl = FAST["job-monitoring-interval"] + FAST["heartbeat-margin"]

    def outlived_two_ttls() -> bool:
        clean_registries(queue)
        fetched = [Job.fetch(job.id, connection=conn) for job in jobs]
        assert all(job.get_status() == JobStatus.STARTED for job in fetched)
        return all((job.last_heartbeat - job.started_at).total_seconds() > 2 * ttl for job in fetched)

    wait_until(outlived_two_ttls, 60, "heartbeats beyond two entry TTLs")

    sibling = start_pool(concurrency=1, name=f"sibling-{uuid.uuid4().hex[:6]}")
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert victim.wait(10) == -signal.SIGKILL
    # RQ cannot know yet: the jobs are still started until their entries expire.
    assert set(queue.started_job_registry.get_job_ids(cleanup=False)) == {job.id for job in jobs}

    wait_until(lambda: all(status(job) == JobStatus.FAILED for job in jobs), 120, "RQ's cleanup to fail the jobs")
    elapsed = time.monotonic() - killed_at
    print(f"kill -9 to all jobs failed: {elapsed:.1f} s (entry TTL {ttl} s, sibling maintenance every 1 s)")
    for job in jobs:
        assert "AbandonedJobError" in failure_text(job)
        assert job.id in queue.failed_job_registry
    assert not queue.started_job_registry.get_job_ids()
    # The sibling's cleanup told its abnormal-end handler about each job of the dead worker.
    ends = abnormal_ends(conn, queue)
    assert set(ends) == {job.id for job in jobs}
    for [end] in ends.values():
        assert (end["reason"], end["forced"], end["by"], end["worker"]) == ("abandoned", True, sibling.pid, victim.name)
    info = rq_info(redis_server.url, queue)
    assert f"queue {queue.name} 0, 0 executing, 0 finished, 3 failed" in info, info


@contextlib.contextmanager
def pool_on_a_redis_of_its_own(
    tmp_path: Path, mode: str = "thread", **options: Any
) -> Iterator[tuple[Any, Queue, PoolProcess]]:
    """A worker (thread mode, or `mode`) serving a fresh queue on a redis-server of the test's own (which it may
    stop and start, its data on disk): (that server, the queue, the pool), once the worker has registered; closed
    afterwards, its output printed."""
    name = f"pool-{uuid.uuid4().hex[:8]}"
    with start_redis(data_dir=str(tmp_path / "redis")) as server:
        conn = Redis.from_url(server.url)
        queue = Queue(f"pool-{uuid.uuid4().hex[:10]}", connection=conn)
        settings = {**FAST, "concurrency": 2, "abnormal-end-handler": HANDLER, **options}
        pool = PoolProcess(server.url, queue.name, name, tmp_path / f"{name}.log", mode, settings)
        try:
            wait_until(lambda: conn.hget(f"rq:worker:{name}", "state"), 30, f"worker {name}")
            yield server, queue, pool
        finally:
            pool.close()
            print(pool.output()[-6000:])


@pytest.mark.parametrize("mode", ["thread", "fork"])
def test_a_job_ending_while_redis_is_away_is_recorded_when_it_is_back_and_frees_its_rate_limit_slot(tmp_path, mode):
    """A job whose end RQ never hears of keeps its rate-limit slot until RQ's clean-up takes it for abandoned
    (here never, within the test: entries outlive their last heartbeat by 300 s), and meanwhile the jobs waiting
    for that slot cannot start. In fork mode the horse is the one that tries again (RecordingForkWorker)."""
    gate = tmp_path / "gate"
    with pool_on_a_redis_of_its_own(tmp_path, mode, **{"heartbeat-margin": 300}) as (server, queue, pool):
        one_at_a_time = RateLimit(key=f"away-{queue.name}", concurrency=1)
        first = queue.enqueue(file_gated, str(gate), rate_limit=one_at_a_time)
        second = queue.enqueue(file_gated, str(gate), rate_limit=one_at_a_time)
        wait_until(lambda: status(first) == JobStatus.STARTED, 30, "the first job started")
        assert status(second) == JobStatus.RATE_LIMITED
        server.stop()  # a clean shutdown: Redis comes back with everything it held
        gate.touch()  # the first job returns while Redis is away
        wait_until(lambda: f"could not record the end of job {first.id}" in pool.output(), 30, "a failed record")
        server.start()
        conn = Redis.from_url(server.url)
        wait_until(lambda: status(Job.fetch(second.id, connection=conn)) == JobStatus.FINISHED, 60, "second")
        recorded = Job.fetch(first.id, connection=conn)
        assert (status(recorded), recorded.return_value()) == (JobStatus.FINISHED, "done")


def test_a_cold_shutdown_while_redis_is_away_exits_without_waiting_for_it(tmp_path):
    """At exit the main thread records the end of the jobs nobody else did; it tries once (RQ's clean-up takes
    the rest for abandoned), where waiting out `record_retry_for` for each job would keep the process alive."""
    with pool_on_a_redis_of_its_own(tmp_path, **{"record-retry-for": 600}) as (server, queue, pool):
        jobs = [queue.enqueue(deaf_until_file, str(tmp_path / "never")) for _ in range(2)]
        wait_until(lambda: all(status(job) == JobStatus.STARTED for job in jobs), 30, "both jobs started")
        server.stop()
        # A warm request, then repeats until the cold shutdown (RQ ignores a repeat within 1 s of the first).
        deadline = time.monotonic() + 90
        while pool.alive():
            assert time.monotonic() < deadline, "the worker did not exit"
            pool.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                pool.wait(0.5)
    assert "could not record the end of job" in pool.output()


def test_a_fork_mode_horse_sends_what_its_job_left_to_the_outbox_before_it_exits(conn, queue, redis_server):
    """RQ ends a work horse with os._exit once its job is recorded: what the job handed to the process's
    background threads (cancel and transcript notices, webhook announcements) would go with it."""
    key = f"pool-test:{uuid.uuid4().hex[:10]}:courtesy"
    job = queue.enqueue(leaves_a_courtesy, redis_server.url, key)
    script = (
        "import sys; from redis import Redis; from workers.__main__ import ForkWorker; "
        "ForkWorker([sys.argv[1]], connection=Redis.from_url(sys.argv[2])).work(burst=True)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(
        [sys.executable, "-c", script, queue.name, redis_server.url], cwd=ROOT, env=env, check=True, timeout=120
    )
    assert status(job) == JobStatus.FINISHED
    assert conn.get(key) == b"sent"


def test_the_same_job_code_runs_in_fork_mode_without_a_control(conn, queue, keys, start_pool):
    conn.set(keys["gate"], 1)
    job = queue.enqueue(gated, keys["log"], keys["gate"], "forked")
    pool = start_pool(mode="fork", burst=True)
    assert pool.wait(60) == 0, pool.output()
    assert status(job) == JobStatus.FINISHED and job.return_value() == "forked:done"
    start = of(conn, keys["log"], "start")["forked"]
    assert start["control"] is False and start["pid"] != pool.pid  # a forked work horse


def test_job_control_semantics() -> None:
    assert current_control() is None
    woken: list[str] = []
    control = JobControl("job-1", on_set=lambda: woken.append("supervisor"))
    control._arm(30)
    assert 0 < (control.time_left() or 0) <= 30 and not control.is_set() and control.wait(0) is False
    calls: list[str] = []
    control.on_stop(lambda: calls.append("a"))
    control.on_stop(lambda: 1 / 0)  # a failing hook does not stop the others
    control.on_stop(lambda: calls.append("b"))
    assert control.trigger(TIMEOUT) is True and control.trigger(STOPPED) is False
    assert control.reason == TIMEOUT and control.wait(5) is True and woken == ["supervisor"]
    wait_until(lambda: calls == ["a", "b"], 10, "the hooks")
    control.on_stop(lambda: calls.append("late"))  # already set: runs at once, here
    assert calls == ["a", "b", "late"]
    with pytest.raises(Exception, match=r"maximum timeout value \(30 seconds\)"):
        control.raise_if_set()
    stopped = JobControl("job-2")
    stopped.trigger(STOPPED)
    with pytest.raises(JobInterrupted) as raised:
        stopped.raise_if_set()
    assert raised.value.reason == STOPPED and stopped.time_left() is None
