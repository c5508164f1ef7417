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

from . import api, cancel_latency, load_tier, many_turns, poll_cost, report, store_growth, storm, streams
from .harness import Servers, part_servers
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


# Which store each part runs on: its own servers, in memory (the first parts, as their figures have always been
# taken) or on disk (`make run`'s store, the new parts'); store_growth starts its own stores and needs no Redis.
ON_DISK = {"cancel_latency": False, "api": False, "storm": False, "poll_cost": False, "store_growth": None,
           "load_tier": True, "many_turns": True, "streams": True}  # fmt: skip


def _run_part(
    on_disk: bool | None, run: Callable[[Servers | None], dict[str, Any]], settings: dict[str, str] | None = None
) -> dict[str, Any]:
    """`run` on servers of its own (none for None), stopped afterwards, its stacks given `settings`; on
    `make run`'s store, what the store does flat out while still idle comes with the figures."""
    if on_disk is None:
        return run(None)
    with part_servers(on_disk, settings) as servers:
        if not on_disk:
            return run(servers)
        capacity = store_capacity(servers.mongo_url, seconds=1.0)
        return {**run(servers), "store": servers.store, "store_capacity": capacity, "stack_settings": servers.settings}


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
    parser.add_argument(
        "--mongo-timeout",
        default="10",
        help="MONGO_TIMEOUT (s) for the stacks of load_tier, many_turns and streams, or 'product' for the product's "
        "default (1 s, at which make run's store, slowed by these loads, is taken for down: see docs/PERFORMANCE.md)",
    )
    parser.add_argument(
        "--load-store",
        choices=("disk", "memory"),
        default="disk",
        help="the store of load_tier, many_turns and streams: make run's on-disk engine (the default) or the "
        "in-memory engine the tests use, to tell the product's own cost from the on-disk engine's",
    )
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

    def api_on(servers: Servers, only: tuple[str, ...] | None = None) -> dict[str, Any]:
        return api.run(
            servers.mongo_url,
            servers.redis_url,
            seconds=args.seconds,
            connections=args.connections,
            threads=2,
            fresh_cancels=300,
            mongo_pid=servers.mongo_pid,
            only=only,
        )

    load_settings = {} if args.mongo_timeout == "product" else {"MONGO_TIMEOUT": f"{float(args.mongo_timeout):g}"}
    # Each takes the part's own servers (see ON_DISK).
    runs: dict[str, Callable[[Any], dict[str, Any]]] = {
        "cancel_latency": lambda s: cancel_latency.run(
            s.mongo_url, s.redis_url, workers=args.workers, samples=args.samples, interval=args.interval
        ),
        "api": lambda s: {
            **api_on(s),
            # The same three endpoints again on `make run`'s store (the new parts' store), its own servers too.
            "embedded_store": _run_part(True, lambda d: api_on(d, only=())),
        },
        "storm": lambda s: storm.run(s.mongo_url, s.redis_url, requests_total=1000, threads=64),
        "poll_cost": lambda s: poll_cost.run(
            s.mongo_url, s.redis_url, sizes=[10, 100, 1000], interval=0.5, seconds=5.0
        ),
        "store_growth": lambda _: store_growth.run(sizes=[int(n) for n in args.store_events.split(",")]),
        "load_tier": lambda s: load_tier.run(s, turns=args.load_turns, seconds=args.load_seconds),
        "many_turns": lambda s: many_turns.run(
            s, turns=args.many_turns, fork_turns=args.fork_turns, interval=args.interval
        ),
        "streams": lambda s: streams.run(
            s,
            turns=args.load_turns,
            active_streams=5 * args.load_turns,
            total_streams=args.streams,
            idle_sessions=max(10, args.streams // 10),
            seconds=args.load_seconds,
        ),
    }
    for name in (p for p in PARTS if p in chosen):
        print(f"running {name}…", file=sys.stderr, flush=True)
        part_started = time.monotonic()
        results["load_average"][name] = os.getloadavg()
        try:
            load_part = ON_DISK[name] is True
            on_disk = (args.load_store == "disk") if load_part else ON_DISK[name]
            results["parts"][name] = _run_part(on_disk, runs[name], load_settings if load_part else None)
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
