"""Part 2: throughput and latency of the session API under gunicorn, beside a trivial endpoint of the same app.

One web instance as Stack starts it (gunicorn, 2 workers × 4 threads) with the rate limits raised out of
the way. Every endpoint gets a short warm-up, then a fixed-time closed-loop run at the same concurrency.
The cancel runs take two paths: a fresh cancel (each request stamps a different live session: the atomic
stamp, the cancel event, the session ended) and a repeat cancel (the idempotent `alreadyCancelled` answer).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from devtools.stack import Stack

from .harness import BenchError, cpu_seconds, running_stack
from .load import run_load, wrk_version

WARMUP = 1.0
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


def run(
    mongo_url: str,
    redis_url: str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    fresh_cancels: int,
    mongo_pid: int | None = None,
) -> dict[str, Any]:
    """Requests/s and latency for each endpoint, its ratio to the baseline, and the web's and MongoDB's CPU use."""
    limits = {"CANCEL_RATE_LIMIT": "1000000 per minute", "DEFAULT_RATE_LIMIT": "1000000 per minute"}
    with running_stack(mongo_url, redis_url, webs=1, workers=0, **limits) as stack:
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
        results: dict[str, Any] = {}
        for name, method, label, paths, auth in endpoints:
            if name != "cancel_fresh":  # a warm-up would use up the fresh sessions
                run_load(stack.url, method, paths, auth, seconds=WARMUP, connections=connections, threads=threads)
            web_pid = stack.webs[0][0].pid
            web_before, mongo_before = cpu_seconds(web_pid, children=True), cpu_seconds(mongo_pid)
            result = run_load(stack.url, method, paths, auth, seconds=seconds, connections=connections, threads=threads)
            results[name] = {
                "label": label,
                **result.as_dict(),
                # CPU seconds per second: 1.0 is one core busy for the whole run.
                "web_cpu": (cpu_seconds(web_pid, children=True) - web_before) / result.seconds,
                "mongo_cpu": (cpu_seconds(mongo_pid) - mongo_before) / result.seconds if mongo_pid else None,
            }
            if name == "cancel_fresh" and result.requests > len(fresh):
                results[name]["note"] = f"{len(fresh)} sessions for {result.requests} requests: the rest were repeats"
    baseline = results["baseline"]
    for entry in results.values():
        entry["rate_vs_baseline"] = entry["requests_per_s"] / baseline["requests_per_s"]
        entry["p99_vs_baseline"] = entry["p99"] / baseline["p99"] if baseline["p99"] else None
    return {
        "generator": wrk_version() or "python threads",
        "seconds": seconds,
        "connections": connections,
        "wrk_threads": threads,
        "baseline_path": base,
        "endpoints": results,
    }
