"""`python -m bench.hangs`: what each request costs while redis-server or the MongoDB-wire server hangs (SIGSTOP).

Starts its own servers and a Stack (one web instance, one worker), then, for each hang, times `--samples`
requests of each kind and prints the median and the slowest, with their status codes. The same script runs
against an older checkout (put it first on PYTHONPATH) to give the figures before a change.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import requests

from devtools.servers import ManagedProcess, start_mongo, start_redis
from devtools.stack import Stack

from .harness import wait_for

SETTINGS = {
    "CANCEL_POLL_INTERVAL": 0.5,
    "CANCEL_RATE_LIMIT": "100000 per minute",
    "DEFAULT_RATE_LIMIT": "100000 per minute",
    "REQUIRE_WORKERS": "false",
}


@contextmanager
def hung(server: ManagedProcess) -> Iterator[None]:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def _time(call: Callable[[], requests.Response]) -> tuple[int, float]:
    started = time.monotonic()
    try:
        status = call().status_code
    except requests.RequestException:
        status = 0
    return status, time.monotonic() - started


def _summary(samples: list[tuple[int, float]]) -> dict[str, Any]:
    seconds = [s for _, s in samples]
    return {
        "statuses": sorted({code for code, _ in samples}),
        "median_s": round(statistics.median(seconds), 3),
        "max_s": round(max(seconds), 3),
        "n": len(samples),
    }


def _running(stack: Stack, app_id: str) -> str:
    team = stack.demo["teamId"]
    sid = str(stack.api("POST", f"/{team}/forms/session/add", {"appId": app_id, "message": "go"}).json()["_id"])
    wait_for(lambda: stack.api("GET", f"/{team}/session/{sid}.json").json()["session"]["status"] == "running", 60,
             "a running turn")  # fmt: skip
    return sid


def redis_hang(mongo: ManagedProcess, redis: ManagedProcess, samples: int) -> dict[str, Any]:
    stack = Stack(mongo.url, redis.url, **SETTINGS)
    try:
        stack.start(webs=1, workers=1)
        team = stack.demo["teamId"]
        fast = stack.cli("apps", "create", team, "--name", "fast", "--config", '{"steps": 2, "stepDelay": 0.01}')
        slow = stack.cli("apps", "create", team, "--name", "slow", "--config", '{"steps": 10000, "stepDelay": 0.05}')
        idle = stack.api("POST", f"/{team}/forms/session/add", {"appId": fast["appId"], "message": "hi"}).json()["_id"]
        wait_for(lambda: stack.api("GET", f"/{team}/session/{idle}.json").json()["session"]["status"] == "waiting",
                 60, "the first turn")  # fmt: skip
        running = [_running(stack, slow["appId"]) for _ in range(samples)]
        out: dict[str, Any] = {}
        with hung(redis):
            out["session read"] = [
                _time(lambda: stack.api("GET", f"/{team}/session/{idle}.json")) for _ in range(samples)
            ]
            out["cancel"] = [_time(lambda s=s: stack.api("POST", f"/{team}/forms/session/{s}/cancel")) for s in running]
            out["send-message"] = [
                _time(lambda: stack.api("POST", f"/{team}/session/{idle}/send-message", {"message": "m"}))
                for _ in range(samples)
            ]
            body = {"appId": fast["appId"], "message": "x"}
            out["session create"] = [_time(lambda: stack.api("POST", f"/{team}/forms/session/add", body))
                                     for _ in range(samples)]  # fmt: skip
            out["/readyz"] = [_time(lambda: requests.get(f"{stack.url}/readyz", timeout=30)) for _ in range(samples)]
            out["/metrics"] = [_time(lambda: requests.get(f"{stack.url}/metrics", timeout=30)) for _ in range(samples)]
        return {kind: _summary(found) for kind, found in out.items()}
    finally:
        stack.stop()


def mongo_hang(mongo: ManagedProcess, redis: ManagedProcess, samples: int) -> dict[str, Any]:
    stack = Stack(mongo.url, redis.url, **SETTINGS)
    try:
        stack.start(webs=1, workers=0)
        team = stack.demo["teamId"]
        path = f"/{team}/sessions.json"
        out: dict[str, Any] = {}
        with hung(mongo):
            out["session list"] = [_time(lambda: stack.api("GET", path)) for _ in range(samples)]
            body = {"appId": stack.demo["appId"]}
            out["session create"] = [_time(lambda: stack.api("POST", f"/{team}/forms/session/add", body))
                                     for _ in range(samples)]  # fmt: skip
            out["/readyz"] = [_time(lambda: requests.get(f"{stack.url}/readyz", timeout=30)) for _ in range(samples)]
            out["/healthz"] = [_time(lambda: requests.get(f"{stack.url}/healthz", timeout=30)) for _ in range(samples)]
            with ThreadPoolExecutor(50) as pool:
                began = time.monotonic()
                burst = list(pool.map(lambda _: _time(lambda: stack.api("GET", path)), range(100)))
                out["100 concurrent reads, wall"] = [(burst[0][0], time.monotonic() - began)]
            out["100 concurrent reads, each"] = burst
        return {kind: _summary(found) for kind, found in out.items()}
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hangs", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=5, help="requests of each kind per hang")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for name, run in (("redis hangs", redis_hang), ("mongodb hangs", mongo_hang)):
        with start_mongo() as mongo, start_redis() as redis:
            results[name] = run(mongo, redis, args.samples)
    for name, kinds in results.items():
        print(f"\n{name}")
        for kind, summary in kinds.items():
            statuses, median, most = summary["statuses"], summary["median_s"], summary["max_s"]
            print(f"  {kind:<28} {statuses!s:<12} median {median:>7.3f} s  max {most:>7.3f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
