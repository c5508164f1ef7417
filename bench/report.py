"""The machine the figures came from, the printed table, and the JSON file under bench/results/."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from .load import wrk_version

RESULTS = Path(__file__).resolve().parent / "results"


def _command(*args: str) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    out = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=10)
    return (out.stdout or out.stderr).strip() or None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What the figures depend on: CPUs, memory, load, and the versions of everything in the path."""
    redis_version = _command("redis-server", "--version")
    return {
        "nproc": _command("nproc"),
        "cpu": _cpu_model(),
        "free_h": _command("free", "-h"),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mongoeco": metadata.version("mongoeco"),
        "pymongo": metadata.version("pymongo"),
        "gunicorn": metadata.version("gunicorn"),
        "rq": metadata.version("rq"),
        "redis_server": redis_version.split(" sha=")[0] if redis_version else None,
        "wrk": wrk_version(),
    }


def write_json(results: dict[str, Any]) -> Path:
    """bench/results/bench-<UTC time>.json, and the same as latest.json; returns the first path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"bench-{stamp}.json"
    text = json.dumps(results, indent=2, default=str) + "\n"
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    return path


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds for the table."""
    if seconds is None or math.isnan(seconds):
        return "-"
    value = seconds * 1000
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def yes(flag: bool) -> str:
    """A check's outcome for the table (NO in capitals, so it stands out)."""
    return "yes" if flag else "NO"


def _machine_lines(info: dict[str, Any]) -> list[str]:
    memory = next((line.split()[1] for line in (info["free_h"] or "").splitlines() if line.startswith("Mem:")), "?")
    load = ", ".join(f"{x:.2f}" for x in info["load_average"])
    return [
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {memory} RAM, load average at start {load}",
        f"Python {info['python']}, mongoeco {info['mongoeco']}, {info['redis_server']}, "
        f"gunicorn {info['gunicorn']}, rq {info['rq']}, {info['wrk'] or 'no wrk (Python load generator)'}",
    ]


def _latency_lines(part: dict[str, Any]) -> list[str]:
    first = next(iter(part.values()))
    lines = [
        f"1. Cancel → stop across processes: {first['workers']} worker processes, "
        f"CANCEL_POLL_INTERVAL {first['poll_interval_s']:g} s; cancel event createdAt → session endedAt",
        f"   {'mode':<9}{'n':>4}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}{'p99/intvl':>11}  {'target':<15}{'met':<5}"
        f"{'from stamp: p99':>16}{'noticed p50/p99':>19}{'finish p50/p99':>18}",
    ]
    for name, mode in part.items():
        s, stamp, noticed, finish = mode["event_to_end"], mode["stamp_to_end"], mode["noticed"], mode["finish"]
        lines.append(
            f"   {('pub/sub' if name == 'pubsub' else 'polling'):<9}{s['n']:>4}{ms(s['p50']):>9}{ms(s['p95']):>9}"
            f"{ms(s['p99']):>9}{ms(s['max']):>9}{mode['p99_over_interval']:>11.2f}  "
            f"{'p99 < ' + ms(mode['target_p99_s']):<15}{yes(mode['target_met']):<5}"
            f"{ms(stamp['p99']):>16}{ms(noticed['p50']) + ' / ' + ms(noticed['p99']):>19}"
            f"{ms(finish['p50']) + ' / ' + ms(finish['p99']):>18}"
        )
    poll = part.get("polling", {}).get("poll_rate")
    if poll:
        lines.append(
            f"   Poll queries with {poll['running_turns']} turns running: {poll['queries_per_s']:.2f}/s "
            f"(baseline {poll['baseline_per_s']:.2f}/s) = {poll['queries_per_turn_per_interval']:.2f} "
            "per worker process per interval"
        )
    return lines


def _api_lines(part: dict[str, Any]) -> list[str]:
    lines = [
        f"2. API under gunicorn (1 instance, 2 workers × 4 threads): {part['connections']} connections, "
        f"{part['seconds']:g} s per endpoint, {part['generator'].split(' Copyright')[0]}",
        f"   {'endpoint':<34}{'req/s':>8}{'p50':>9}{'p99':>9}{'req/s÷base':>12}{'p99÷base':>10}{'errors':>8}"
        f"{'CPU web/mongo':>15}",
    ]
    for entry in part["endpoints"].values():
        p99_ratio, mongo_cpu = entry["p99_vs_baseline"], entry.get("mongo_cpu")
        lines.append(
            f"   {entry['label']:<34}{entry['requests_per_s']:>8.0f}{ms(entry['p50']):>9}{ms(entry['p99']):>9}"
            f"{entry['rate_vs_baseline']:>12.2f}{(f'{p99_ratio:.2f}' if p99_ratio else '-'):>10}{entry['errors']:>8}"
            f"{entry['web_cpu']:>9.0%} / {(f'{mongo_cpu:.0%}' if mongo_cpu is not None else '-'):<4}"
        )
        if entry.get("note"):
            lines.append(f"     ({entry['note']})")
    return lines


def _storm_lines(part: dict[str, Any]) -> list[str]:
    lines = [
        f"3. Cancel storm: {part['requests']} concurrent cancels of one running session from "
        f"{part['client_threads']} threads over {part['web_instances']} web instances: {part['seconds']:.1f} s "
        f"({part['requests_per_s']:.0f}/s), p50 {ms(part['latency']['p50'])}, p99 {ms(part['latency']['p99'])}",
        f"   statuses {part['statuses']}; stamping responses {part['stamping_responses']}, "
        f"alreadyCancelled {part['already_cancelled_responses']}; cancel events {part['cancel_events']}; "
        f"distinct cancelledAt {len(part['distinct_cancelledAt'])}",
        "   " + ", ".join(f"{name} {yes(ok)}" for name, ok in part["checks"].items()),
        f"   → {'PASS' if part['passed'] else 'FAIL'}",
    ]
    return lines


def _poll_lines(part: dict[str, Any]) -> list[str]:
    interval = part["poll_interval_s"]
    lines = [
        f"4. Poll cost: one CancelWatcher (one worker process), interval {interval:g} s "
        f"(baseline 1/interval = {1 / interval:.2f} reads/s), commands on `sessions` counted by a CommandListener",
        f"   {'sessions':>8}{'reads/s':>10}{'baseline':>10}{'reads/session/interval':>24}{'query p50':>12}"
        f"{'query max':>12}{'polls':>7}",
    ]
    for run in part["runs"]:
        q = run["find_seconds"]
        lines.append(
            f"   {run['sessions']:>8}{run['reads_per_s']:>10.2f}{run['baseline_per_s']:>10.2f}"
            f"{run['reads_per_session_per_interval']:>24.5f}{ms(q['p50']):>12}{ms(q['max']):>12}{run['polls']:>7}"
        )
    return lines


def _store_lines(part: dict[str, Any]) -> list[str]:
    stores = part["stores"]
    sizes = "  ".join(f"{s['events']:,} events / {s['sessions']:,} sessions" for s in stores)
    lines = [
        f"5. Store growth: `make run`'s engine (mongoeco over SQLite, on disk), one store per size: {sizes}; "
        f"{part['write_rounds']} rounds per write, {part['read_rounds']} per read, interleaved across the stores",
        f"   {'operation':<19}" + "".join(f"{f'p50 @ {s['events']:,}':>15}" for s in stores)
        + "".join(f"{f'÷empty @ {s['events']:,}':>17}" for s in stores[1:]) + f"  {'target':<9}met",
    ]  # fmt: skip
    for name, first in stores[0]["operations"].items():
        row = f"   {name:<19}" + "".join(f"{ms(s['operations'][name]['seconds']['p50']):>15}" for s in stores)
        row += "".join(f"{s['operations'][name]['ratio_to_empty']:>17.2f}" for s in stores[1:])
        if first["write"]:
            met = all(s["operations"][name]["target_met"] for s in stores[1:])
            row += f"  {'≤ ' + format(part['target_ratio'], 'g') + '×':<9}{yes(met)}"
        lines.append(row)
    lines.append(
        "   on disk: "
        + ", ".join(f"{s['events']:,} events {s['file_bytes'] / 2**20:.1f} MiB (seeded in {s['seed_seconds']:.0f} s)"
                    for s in stores)
    )  # fmt: skip
    lines.append(f"   → writes {'within' if part['targets_met'] else 'NOT within'} the target at every size")
    return lines


RENDERERS = {
    "cancel_latency": _latency_lines,
    "api": _api_lines,
    "storm": _storm_lines,
    "poll_cost": _poll_lines,
    "store_growth": _store_lines,
}


def render(results: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    lines = ["agentcloud_clone benchmarks", *_machine_lines(results["machine"]), ""]
    for key, renderer in RENDERERS.items():
        if key in results["parts"]:
            load = results["load_average"].get(key)
            lines += [*renderer(results["parts"][key])]
            if load:
                lines.append(f"   (1-minute load average when this part started: {load[0]:.2f})")
            lines.append("")
    for key, error in results["errors"].items():
        lines.append(f"{key}: could not be measured: {error}")
    lines.append(f"Total {results['seconds']:.0f} s; JSON in {results.get('json', '?')}")
    return "\n".join(lines)
