"""`python -m bench`: run every benchmark against fresh local servers, print the table, write the JSON."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from devtools.servers import start_mongo, start_redis

from . import api, cancel_latency, load_tier, many_turns, poll_cost, report, store_growth, storm, streams
from .workload import store_capacity

PARTS = ("cancel_latency", "api", "storm", "poll_cost", "store_growth", "load_tier", "many_turns", "streams")
# Sizes for `--quick` (development): every part, small.
QUICK = {
    "samples": 12,
    "seconds": 2.0,
    "store_events": "0,2000",
    "load_turns": 6,
    "load_seconds": 4.0,
    "many_turns": 24,
    "fork_turns": 6,
    "streams": 200,
}


@contextlib.contextmanager
def embedded_store() -> Iterator[tuple[str, int | None, dict[str, Any]]]:
    """`make run`'s store (the MongoDB-wire server over the corrected SQLite engine, on disk) in a temp dir of
    its own, with what it does flat out while still idle; removed afterwards."""
    directory = tempfile.mkdtemp(prefix="bench-store-")
    try:
        with start_mongo(data_dir=directory) as server:
            yield server.url, server.pid, store_capacity(server.url, seconds=1.0)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _on_embedded_store(run: Callable[[str, int | None], dict[str, Any]]) -> dict[str, Any]:
    with embedded_store() as (url, pid, capacity):
        return {**run(url, pid), "store": "embedded (make run's: corrected SQLite engine, on disk)",
                "store_capacity": capacity}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts; exit 1 only when a part could not be measured at all."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--workers", type=int, default=4, help="worker processes for the cancel latency runs")
    parser.add_argument("--samples", type=int, default=60, help="cancel latency samples per mode")
    parser.add_argument("--interval", type=float, default=1.0, help="CANCEL_POLL_INTERVAL for the latency runs")
    parser.add_argument("--seconds", type=float, default=5.0, help="load time per API endpoint")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections for the API runs")
    parser.add_argument("--load-turns", type=int, default=20, help="running turns in load_tier and streams")
    parser.add_argument("--load-seconds", type=float, default=10.0, help="measuring window of load_tier and streams")
    parser.add_argument("--many-turns", type=int, default=200, help="concurrent turns in many_turns (thread mode)")
    parser.add_argument("--fork-turns", type=int, default=40, help="concurrent turns in many_turns (fork mode)")
    parser.add_argument("--streams", type=int, default=1000, help="live streams the streams part holds open")
    parser.add_argument("--quick", action="store_true", help="small sizes for development (figures not comparable)")
    parser.add_argument(
        "--store-events",
        default="0,10000,100000",
        help="stored transcript events per store for store_growth, comma-separated, the empty store first",
    )
    args = parser.parse_args(argv)
    if args.quick:  # the quick sizes, where no size was given
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(chosen) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.WARNING)

    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": report.machine(),
        "settings": vars(args),
        "parts": {},
        "errors": {},
        "load_average": {},
    }
    with start_redis() as redis_server, start_mongo() as mongo_server:
        mongo, redis_url = mongo_server.url, redis_server.url
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "cancel_latency": lambda: cancel_latency.run(
                mongo, redis_url, workers=args.workers, samples=args.samples, interval=args.interval
            ),
            "api": lambda: {
                **api.run(
                    mongo,
                    redis_url,
                    seconds=args.seconds,
                    connections=args.connections,
                    threads=2,
                    fresh_cancels=300,
                    mongo_pid=mongo_server.pid,
                ),
                # The same three endpoints again on `make run`'s store (the new parts' store).
                "embedded_store": _on_embedded_store(
                    lambda url, pid: api.run(
                        url,
                        redis_url,
                        seconds=args.seconds,
                        connections=args.connections,
                        threads=2,
                        fresh_cancels=300,
                        mongo_pid=pid,
                        only=(),
                    )
                ),
            },
            "storm": lambda: storm.run(mongo, redis_url, requests_total=1000, threads=64),
            "poll_cost": lambda: poll_cost.run(mongo, redis_url, sizes=[10, 100, 1000], interval=0.5, seconds=5.0),
            # Its own stores and servers: `make run`'s engine on disk, not the in-memory one the other parts use.
            "store_growth": lambda: store_growth.run(sizes=[int(n) for n in args.store_events.split(",")]),
            # The load parts run on `make run`'s store, one fresh store each (see docs/PERFORMANCE.md).
            "load_tier": lambda: _on_embedded_store(
                lambda url, pid: load_tier.run(
                    url, redis_url, turns=args.load_turns, seconds=args.load_seconds, mongo_pid=pid
                )
            ),
            "many_turns": lambda: _on_embedded_store(
                lambda url, pid: many_turns.run(
                    url,
                    redis_url,
                    turns=args.many_turns,
                    fork_turns=args.fork_turns,
                    interval=args.interval,
                    mongo_pid=pid,
                )
            ),
            "streams": lambda: _on_embedded_store(
                lambda url, pid: streams.run(
                    url,
                    redis_url,
                    turns=args.load_turns,
                    active_streams=5 * args.load_turns,
                    total_streams=args.streams,
                    idle_sessions=max(10, args.streams // 10),
                    seconds=args.load_seconds,
                    mongo_pid=pid,
                )
            ),
        }
        for name in (p for p in PARTS if p in chosen):
            print(f"running {name}…", file=sys.stderr, flush=True)
            part_started = time.monotonic()
            results["load_average"][name] = os.getloadavg()
            try:
                results["parts"][name] = runs[name]()
            except Exception as exc:
                traceback.print_exc()
                results["errors"][name] = f"{exc.__class__.__name__}: {exc}"
            results["load_average"][f"{name}:end"] = os.getloadavg()
            results.setdefault("part_seconds", {})[name] = time.monotonic() - part_started
            print(f"  {name} took {time.monotonic() - part_started:.0f} s", file=sys.stderr, flush=True)
    results["seconds"] = time.monotonic() - started
    results["load_average"]["end"] = os.getloadavg()
    results["json"] = str(report.write_json(results))
    print(report.render(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
