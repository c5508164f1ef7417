"""Part 2: throughput and latency of the session API under gunicorn, beside a trivial endpoint of the same app.

One web instance as Stack starts it (gunicorn, 2 gevent workers) with the rate limits raised out of the
way. Every endpoint gets a short warm-up, then a fixed-time closed-loop run at the same concurrency.
The cancel runs take two paths: a fresh cancel (each request stamps a different live session: the atomic
stamp, the cancel event, the session ended) and a repeat cancel (the idempotent `alreadyCancelled` answer).

Fresh cancels use up their sessions, so they never repeat one: a 1 s warm-up on the first `fresh_cancels`
sessions measures their rate, then enough new sessions for the timed run at that rate (twice over) are
made before it starts. Issue #10's figure is the fresh cancel's throughput as a share of the session
read's, on the same server in the same run (target at least 30%).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pymongo

from devtools.stack import Stack

from .harness import BenchError, cpu_seconds, running_stack
from .load import run_load, wrk_version
from .workload import NO_LIMITS

WARMUP = 1.0
# Issue #10: fresh cancels per second at least this share of session reads per second.
FRESH_TARGET_RATIO = 0.30
# Sessions made for the timed fresh-cancel run: this many times what the warm-up's rate would use.
FRESH_MARGIN = 2.0
# The trivial endpoint of the same app that every figure is compared with.
BASELINE_PATH = "/healthz"


def _new_sessions(stack: Stack, count: int) -> list[str]:
    """`count` live sessions with no turn in flight (so a cancel ends them on the spot)."""
    team, app_id = stack.demo["teamId"], stack.demo["appId"]

    def add(_: int) -> str:
        response = stack.api("POST", f"/{team}/forms/session/add", {"appId": app_id})
        if response.status_code != 200:
            raise BenchError(f"session add answered {response.status_code}: {response.text[:200]}")
        return str(response.json()["_id"])

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(add, range(count)))


def _commands(client: pymongo.MongoClient[dict[str, Any]]) -> int:
    """Round trips the MongoDB-wire server has served so far (its `command` opcounter counts each command once;
    see workload.commands_between)."""
    counters = client.admin.command("serverStatus").get("opcounters") or {}
    return int(counters.get("command", 0))


def run(
    mongo_url: str,
    redis_url: str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    fresh_cancels: int,
    mongo_pid: int | None = None,
    only: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Requests/s and latency for each endpoint (all, or those named in `only`; the baseline, the session read
    and the fresh cancel are always run), its ratio to the baseline, and the web's and MongoDB's CPU use."""
    counters: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url)
    with running_stack(mongo_url, redis_url, webs=1, workers=0, **NO_LIMITS) as stack:
        team, key = stack.demo["teamId"], stack.demo["apiKey"]
        sid = _new_sessions(stack, 1)[0]
        if stack.api("POST", f"/{team}/forms/session/{sid}/cancel").status_code != 200:
            raise BenchError("the first cancel of the repeat-cancel session failed")
        fresh = _new_sessions(stack, fresh_cancels)
        base = BASELINE_PATH
        endpoints: list[tuple[str, str, str, list[str], str | None]] = [
            ("baseline", "GET", f"GET {base}", [base], key),
            ("baseline_anonymous", "GET", f"GET {base}, no API key", [base], None),
            ("session", "GET", "GET /<team>/session/<sid>.json", [f"/{team}/session/{sid}.json"], key),
            ("cancel_repeat", "POST", "POST …/cancel (repeat)", [f"/{team}/forms/session/{sid}/cancel"], key),
            (
                "cancel_fresh",
                "POST",
                "POST …/cancel (fresh)",
                [f"/{team}/forms/session/{s}/cancel" for s in fresh],
                key,
            ),
        ]
        if only is not None:
            wanted = {"baseline", "session", "cancel_fresh", *only}
            endpoints = [e for e in endpoints if e[0] in wanted]
        results: dict[str, Any] = {}
        for name, method, label, paths, auth in endpoints:
            warmup = run_load(stack.url, method, paths, auth, seconds=WARMUP, connections=connections, threads=threads)
            if name == "cancel_fresh":
                # The warm-up used (some of) those sessions: fresh ones for the timed run, enough at its rate.
                needed = int(warmup.rate * seconds * FRESH_MARGIN) + connections
                paths = [f"/{team}/forms/session/{s}/cancel" for s in _new_sessions(stack, max(needed, fresh_cancels))]
                fresh = paths
            web_pid = stack.webs[0][0].pid
            web_before, mongo_before = cpu_seconds(web_pid, children=True), cpu_seconds(mongo_pid)
            commands_before = _commands(counters)
            result = run_load(stack.url, method, paths, auth, seconds=seconds, connections=connections, threads=threads)
            commands = _commands(counters) - commands_before - 1  # less this reading itself
            results[name] = {
                "label": label,
                **result.as_dict(),
                # What each request asked of the MongoDB-wire server (the run's only client): round trips, and
                # the server's CPU time.
                "store_round_trips_per_request": commands / result.requests if result.requests else None,
                # CPU seconds per second: 1.0 is one core busy for the whole run.
                "web_cpu": (cpu_seconds(web_pid, children=True) - web_before) / result.seconds,
                "mongo_cpu": (cpu_seconds(mongo_pid) - mongo_before) / result.seconds if mongo_pid else None,
            }
            if name == "cancel_fresh" and result.requests > len(fresh):
                results[name]["note"] = f"{len(fresh)} sessions for {result.requests} requests: the rest were repeats"
    counters.close()
    baseline = results["baseline"]
    for entry in results.values():
        mongo_cpu, rate = entry.get("mongo_cpu"), entry["requests_per_s"]
        entry["store_cpu_ms_per_request"] = mongo_cpu * 1000 / rate if mongo_cpu is not None and rate else None
        entry["rate_vs_baseline"] = entry["requests_per_s"] / baseline["requests_per_s"]
        entry["p99_vs_baseline"] = entry["p99"] / baseline["p99"] if baseline["p99"] else None
    fresh_ratio = results["cancel_fresh"]["requests_per_s"] / results["session"]["requests_per_s"]
    return {
        "fresh_cancel_vs_session_read": {
            "ratio": fresh_ratio,
            "target_ratio": FRESH_TARGET_RATIO,
            "target_met": fresh_ratio >= FRESH_TARGET_RATIO and "note" not in results["cancel_fresh"],
            "fresh_sessions": len(fresh),
        },
        "generator": wrk_version() or "python threads",
        "seconds": seconds,
        "connections": connections,
        "wrk_threads": threads,
        "baseline_path": base,
        "endpoints": results,
    }
