"""`python -m bench`: run every benchmark against fresh local servers, print the table, write the JSON."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from devtools.servers import start_mongo, start_redis

from . import api, cancel_latency, poll_cost, report, store_growth, storm

PARTS = ("cancel_latency", "api", "storm", "poll_cost", "store_growth")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts; exit 1 only when a part could not be measured at all."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--workers", type=int, default=4, help="worker processes for the cancel latency runs")
    parser.add_argument("--samples", type=int, default=60, help="cancel latency samples per mode")
    parser.add_argument("--interval", type=float, default=1.0, help="CANCEL_POLL_INTERVAL for the latency runs")
    parser.add_argument("--seconds", type=float, default=5.0, help="load time per API endpoint")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections for the API runs")
    parser.add_argument(
        "--store-events",
        default="0,10000,100000",
        help="stored transcript events per store for store_growth, comma-separated, the empty store first",
    )
    args = parser.parse_args(argv)
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
            "api": lambda: api.run(
                mongo,
                redis_url,
                seconds=args.seconds,
                connections=args.connections,
                threads=2,
                fresh_cancels=300,
                mongo_pid=mongo_server.pid,
            ),
            "storm": lambda: storm.run(mongo, redis_url, requests_total=1000, threads=64),
            "poll_cost": lambda: poll_cost.run(mongo, redis_url, sizes=[10, 100, 1000], interval=0.5, seconds=5.0),
            # Its own stores and servers: `make run`'s engine on disk, not the in-memory one the other parts use.
            "store_growth": lambda: store_growth.run(sizes=[int(n) for n in args.store_events.split(",")]),
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
            print(f"  {name} took {time.monotonic() - part_started:.0f} s", file=sys.stderr, flush=True)
    results["seconds"] = time.monotonic() - started
    results["load_average"]["end"] = os.getloadavg()
    results["json"] = str(report.write_json(results))
    print(report.render(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
