"""Part 1: cancel-to-stop latency across processes, with and without the Redis pub/sub notice.

W worker processes each run one long scripted turn at a time; W driver threads each start a session, wait
until it runs, wait a random fraction of the poll interval (so cancels land at every phase of the poll
cycle), cancel it over HTTP and wait for it to end. Latency comes from the transcript's own timestamps:
the `cancel` event's `createdAt` to the session's `endedAt` (both written by the product, millisecond
resolution), so how often this driver looks does not affect it. The event is written just after the stamp,
so a worker can notice the stamp first; `stamp_to_end` is measured from `cancelledAt` too, and the
interrupted output's `createdAt` (or the closing event's, when nothing was left to write) splits it into
noticing (poll or notice, runner stopped) and finishing (the last writes, session ended).
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from devtools.stack import Stack

from .harness import (
    BenchError,
    create_long_app,
    events,
    parse_time,
    poll_queries_total,
    running_stack,
    start_session,
    wait_ended,
    wait_running,
)
from .stats import summarize

PUBSUB_TARGET = 0.100
POLLING_MARGIN = 0.100
POLL_WINDOW = 4.0
FIRST_LOOK = 0.3


def _one_sample(stack: Stack, app_id: str, interval: float, pubsub: bool, rng: random.Random) -> dict[str, float]:
    team = stack.demo["teamId"]
    sid = start_session(stack, app_id)
    wait_running(stack, sid)
    time.sleep(rng.uniform(0.1, 0.1 + interval))
    sent = time.monotonic()
    response = stack.api("POST", f"/{team}/forms/session/{sid}/cancel")
    answered = time.monotonic()
    if response.status_code != 200 or not response.json().get("ok"):
        raise BenchError(f"cancel answered {response.status_code}: {response.text[:200]}")
    # First look once the session should have ended, so this driver's reads stay out of the measured window.
    ended = wait_ended(stack, sid, timeout=interval + 15, first_look=FIRST_LOOK + (0 if pubsub else interval))
    if ended["status"] != "terminated":
        raise BenchError(f"session {sid} ended {ended['status']}, not terminated")
    transcript = events(stack, sid)
    cancel_event = next((e for e in transcript if e["type"] == "cancel"), None)
    # The cut-off output, or the closing event when nothing was left to write (the transcript is append-only).
    cut_off = next((e for e in reversed(transcript) if e["type"] == "output" and e.get("interrupted")), None)
    cut_off = cut_off or next((e for e in reversed(transcript) if e.get("interrupted")), None)
    if cancel_event is None or cut_off is None:
        raise BenchError(f"session {sid} lacks its cancel event or an event marked interrupted")
    stamped, stopped = parse_time(ended["cancelledAt"]), parse_time(cut_off["createdAt"])
    ended_at = parse_time(ended["endedAt"])
    return {
        "event_to_end": (ended_at - parse_time(cancel_event["createdAt"])).total_seconds(),
        "stamp_to_end": (ended_at - stamped).total_seconds(),
        "noticed": (stopped - stamped).total_seconds(),
        "finish": (ended_at - stopped).total_seconds(),
        "request": answered - sent,
    }


def _poll_rate(stack: Stack, app_id: str, workers: int, interval: float) -> dict[str, Any]:
    """Queries per second made by the watchers while `workers` turns run, from the product's own counter."""
    sids = [start_session(stack, app_id) for _ in range(workers)]
    for sid in sids:
        wait_running(stack, sid)
    time.sleep(interval)  # every watcher is past its first wait
    before, started = poll_queries_total(stack), time.monotonic()
    time.sleep(POLL_WINDOW)
    after, elapsed = poll_queries_total(stack), time.monotonic() - started
    for sid in sids:
        stack.api("POST", f"/{stack.demo['teamId']}/forms/session/{sid}/cancel")
    for sid in sids:
        wait_ended(stack, sid, timeout=interval + 15)
    per_second = (after - before) / elapsed
    return {
        "running_turns": workers,
        "window_s": elapsed,
        "queries": after - before,
        "queries_per_s": per_second,
        "baseline_per_s": workers / interval,
        "queries_per_turn_per_interval": per_second * interval / workers,
    }


def run_mode(
    mongo_url: str, redis_url: str, *, pubsub: bool, workers: int, samples: int, interval: float, seed: int
) -> dict[str, Any]:
    """Latency samples for one CANCEL_PUBSUB setting (and the poll rate, measured with polling alone)."""
    settings = {
        "CANCEL_PUBSUB": "true" if pubsub else "false",
        "CANCEL_POLL_INTERVAL": interval,
        "CANCEL_RATE_LIMIT": "1000000 per minute",
        "DEFAULT_RATE_LIMIT": "1000000 per minute",
    }
    with running_stack(mongo_url, redis_url, webs=1, workers=workers, **settings) as stack:
        app_id = create_long_app(stack)
        poll = None if pubsub else _poll_rate(stack, app_id, workers, interval)
        per_slot = -(-samples // workers)
        lock, collected = threading.Lock(), []

        def slot(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            for _ in range(per_slot):
                sample = _one_sample(stack, app_id, interval, pubsub, rng)
                with lock:
                    collected.append(sample)

        started = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(slot, i) for i in range(workers)]:
                future.result()
        elapsed = time.monotonic() - started

    latencies = [s["event_to_end"] for s in collected]
    summary = summarize(latencies)
    target = PUBSUB_TARGET if pubsub else interval + POLLING_MARGIN
    return {
        "pubsub": pubsub,
        "workers": workers,
        "poll_interval_s": interval,
        "seconds": elapsed,
        "event_to_end": summary,
        "stamp_to_end": summarize([s["stamp_to_end"] for s in collected]),
        "noticed": summarize([s["noticed"] for s in collected]),
        "finish": summarize([s["finish"] for s in collected]),
        "cancel_request": summarize([s["request"] for s in collected]),
        "p99_over_interval": summary["p99"] / interval,
        "target_p99_s": target,
        "target_met": summary["p99"] < target,
        "samples": collected,
        "poll_rate": poll,
    }


def run(mongo_url: str, redis_url: str, *, workers: int, samples: int, interval: float) -> dict[str, Any]:
    """Both modes, pub/sub first."""
    return {
        "pubsub": run_mode(
            mongo_url, redis_url, pubsub=True, workers=workers, samples=samples, interval=interval, seed=1
        ),
        "polling": run_mode(
            mongo_url, redis_url, pubsub=False, workers=workers, samples=samples, interval=interval, seed=2
        ),
    }
