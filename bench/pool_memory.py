"""Thread mode's cost: memory (PSS) per concurrent job in one worker process, and the cost of starting a job,
each against fork mode (one RQ Worker plus its forked work horse per running job).

    python -m bench.pool_memory [--jobs 50,200] [--starts 40] [--preload agentcloud_clone | --preload none]

Jobs are sleeping dummies (`sleeper` below). The worker processes import `--preload` first, as the product's
worker imports the app, so the fork-mode figure is comparable to a real turn's. PSS is read from
/proc/<pid>/smaps_rollup (Linux only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# By name: under `python -m` this module is `__main__`, which RQ refuses to enqueue from.
SLEEPER, STAMP = "bench.pool_memory.sleeper", "bench.pool_memory.stamp"


# -- the dummy jobs (imported by the worker processes) ------------------------------------------------------------


def sleeper(seconds: float) -> str:
    """A stand-in for a turn waiting on its model: sleeps, waking early when thread mode asks it to stop."""
    from workers.pool import current_control

    control = current_control()
    if control is not None:
        control.wait(seconds)
    else:
        time.sleep(seconds)
    return "slept"


def stamp() -> float:
    """Returns the moment the job function started."""
    return time.time()


# -- /proc ----------------------------------------------------------------------------------------------------------


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss line for pid {pid}")


def steady_pss_kib(pid: int, reads: int = 3) -> int:
    values = []
    for _ in range(reads):
        values.append(pss_kib(pid))
        time.sleep(0.3)
    return int(statistics.median(values))


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process and of the children it has reaped (fork mode's work horses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime + cutime + cstime) / CLOCK_TICKS


# -- driving workers ------------------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise RuntimeError(f"timed out waiting for {what}")


class WorkerProcess:
    def __init__(self, url: str, queue: str, mode: str, concurrency: int, preload: list[str]) -> None:
        import redis

        self.name = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
        argv = [sys.executable, "-m", "workers.pool", "--url", url, "--mode", mode, "--name", self.name]
        argv += ["--concurrency", str(concurrency), "--shutdown-grace", "0", "--interrupt-grace", "5"]
        argv += ["--log-level", "WARNING"]
        for module in preload:
            argv += ["--preload", module]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([*argv, queue], cwd=ROOT, env=env, start_new_session=True)
        self.pid = self.process.pid
        connection = redis.Redis.from_url(url)
        wait_for(lambda: connection.hget(f"rq:worker:{self.name}", "state"), 60, "the worker to start", 0.05)
        connection.close()

    def stop(self) -> None:
        """Warm shutdown, then cold (a second signal: fork mode's Worker then kills its horse), then SIGKILL;
        a work horse still left (it has a process group of its own) is killed too."""
        if self.process.poll() is not None:
            return
        horses = children_of(self.pid)
        for _ in range(2):
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            self.process.kill()
            self.process.wait()
        for pid in horses:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _queue(url: str) -> Any:
    import redis
    from rq import Queue

    return Queue(f"bench-pool-{uuid.uuid4().hex[:8]}", connection=redis.Redis.from_url(url))


def thread_memory(url: str, counts: list[int], preload: list[str]) -> dict[str, Any]:
    queue = _queue(url)
    worker = WorkerProcess(url, queue.name, "thread", max(counts), preload)
    try:
        time.sleep(1.0)  # let start-up allocations settle before the baseline
        idle = steady_pss_kib(worker.pid)
        rows = []
        running = 0
        for count in sorted(counts):
            for _ in range(count - running):
                queue.enqueue(SLEEPER, 3600, job_timeout=7200)
            running = count
            wait_for(lambda c=count: queue.started_job_registry.get_job_count(cleanup=False) >= c, 120, "jobs")
            pss = steady_pss_kib(worker.pid)
            rows.append(
                {
                    "jobs": count,
                    "pss_mib": round(pss / 1024, 1),
                    "threads": threads_of(worker.pid),
                    "kib_per_job": round((pss - idle) / count, 1),
                }
            )
        return {"idle_pss_mib": round(idle / 1024, 1), "rows": rows}
    finally:
        worker.stop()


def fork_memory(url: str, preload: list[str]) -> dict[str, Any]:
    queue = _queue(url)
    worker = WorkerProcess(url, queue.name, "fork", 1, preload)
    try:
        time.sleep(1.0)
        idle = steady_pss_kib(worker.pid)
        queue.enqueue(SLEEPER, 3600, job_timeout=7200)
        [horse] = wait_for(lambda: children_of(worker.pid), 60, "the work horse")
        wait_for(lambda: queue.started_job_registry.get_job_count(cleanup=False) == 1, 60, "the job to start")
        worker_pss, horse_pss = steady_pss_kib(worker.pid), steady_pss_kib(horse)
        return {
            "idle_worker_pss_mib": round(idle / 1024, 1),
            "worker_pss_mib": round(worker_pss / 1024, 1),
            "horse_pss_mib": round(horse_pss / 1024, 1),
            "mib_per_running_job": round((worker_pss + horse_pss) / 1024, 1),
        }
    finally:
        worker.stop()


def start_cost(url: str, mode: str, starts: int, preload: list[str]) -> dict[str, Any]:
    """Jobs one at a time on an idle worker: enqueue → job function running, and the worker's CPU per job."""
    queue = _queue(url)
    worker = WorkerProcess(url, queue.name, mode, 10, preload)
    try:
        time.sleep(1.0)
        latencies = []
        cpu_before = cpu_seconds(worker.pid)
        for _ in range(starts):
            job = queue.enqueue(STAMP)
            wait_for(lambda j=job: j.get_status() == "finished", 60, "the job")
            latencies.append((job.return_value() - job.enqueued_at.timestamp()) * 1000)
        cpu_ms = (cpu_seconds(worker.pid) - cpu_before) * 1000 / starts
        latencies.sort()
        return {
            "mode": mode,
            "starts": starts,
            "latency_ms_median": round(statistics.median(latencies), 2),
            "latency_ms_p90": round(latencies[int(0.9 * (len(latencies) - 1))], 2),
            "worker_cpu_ms_per_job": round(cpu_ms, 2),
        }
    finally:
        worker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="50,200", help="comma-separated numbers of concurrent sleeping jobs")
    parser.add_argument("--starts", type=int, default=40, help="jobs started one at a time per mode")
    parser.add_argument("--preload", action="append", help="module the workers import first ('none': nothing)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.jobs.split(",") if n.strip()]
    preload = [m for m in (args.preload or ["agentcloud_clone"]) if m != "none"]

    from devtools.servers import start_redis

    with start_redis() as redis_server:
        url = redis_server.url
        results = {
            "preload": preload,
            "thread": thread_memory(url, counts, preload),
            "fork": fork_memory(url, preload),
            "start": [start_cost(url, mode, args.starts, preload) for mode in ("thread", "fork")],
        }
    thread, fork = results["thread"], results["fork"]
    print(f"preloaded: {', '.join(preload) or 'nothing'}")
    print(f"thread mode, one process: idle {thread['idle_pss_mib']} MiB PSS")
    for row in thread["rows"]:
        print(
            f"  {row['jobs']:>4} sleeping jobs: {row['pss_mib']} MiB PSS, {row['threads']} threads, "
            f"{row['kib_per_job']} KiB per job over idle"
        )
    print(
        f"fork mode, per running job: worker {fork['worker_pss_mib']} MiB + horse {fork['horse_pss_mib']} MiB "
        f"= {fork['mib_per_running_job']} MiB PSS"
    )
    for row in results["start"]:
        print(
            f"job start, {row['mode']} mode ({row['starts']} one at a time): enqueue→running median "
            f"{row['latency_ms_median']} ms, p90 {row['latency_ms_p90']} ms; worker CPU {row['worker_cpu_ms_per_job']}"
            " ms per job"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
