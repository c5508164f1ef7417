"""Part 6 (issue #10, the load tier): 20 concurrent running turns with a UI-like reader on each session.

For each worker layout (fork mode with one process per turn, as issue #10 measured; thread mode in one process,
`make run`'s default worker; thread mode on two processes when asked for) a fresh stack runs 20 long scripted
turns. While they run, for `seconds`:

- a UI-like reader per session polls `messages.json?after=<lastSeq>` every 500 ms, as the session page does
  when it polls (static/session.js);
- a probe reads `GET /<team>/session/<sid>.json` of a random running session 5 times a second (the session
  read), and another cancels a fresh idle session (no turn in flight) twice a second (the cancel route), so
  both routes' latency is taken while the turns run.

Then one cancel of all 20 running sessions is sent at once (20 threads, connected beforehand, released
together): cancel-to-end is each request's send time here to its session's `endedAt` (p50/p99/max), with how
many sessions were still live 5 s after the cancels were sent.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from .harness import BenchError, Servers, cpu_seconds
from .workload import (
    NO_LIMITS,
    Client,
    Every,
    NoticeWatcher,
    Store,
    UiReader,
    cancel_all,
    commands_between,
    cpu_of_tree,
    latency_summary,
    running,
    start_sessions,
    start_workers,
)

READ_TARGET_P99 = 0.250
CANCEL_ALL_TARGET_P99 = 0.500
STREAMING_TURN = {"steps": 10_000, "stepDelay": 0.05}  # a word every 50 ms, flushed every 250 ms
SESSION_READS_PER_S = 5.0
CANCELS_PER_S = 2.0
LOOK_AT = 5.0
PROBE_PERIOD = 0.2
PROFILE_SECONDS = 3.0
BASELINE_SECONDS = 3.0

LAYOUTS = {
    # name: (mode, processes, TURN_CONCURRENCY)
    "fork": ("fork", None, None),  # one process per turn
    "thread-1": ("thread", 1, None),  # TURN_CONCURRENCY = turns: `make run`'s default worker (20 a process)
    "thread-2": ("thread", 2, None),  # TURN_CONCURRENCY = turns / 2
}
# What `make bench` runs: one process per turn (issue #10's layout) and make run's default; thread-2 adds
# little beside them and would make `make bench` longer still.
DEFAULT_LAYOUTS = ("fork", "thread-1")


def _baseline(client: Client, store: Store, team: str, sid: str) -> dict[str, Any]:
    """The same probes with no turn running: session reads (of an idle session), /healthz, a store round trip."""
    loops = [
        Every(1 / SESSION_READS_PER_S, lambda: client.call("GET", f"/{team}/session/{sid}.json"), name="base-reads"),
        Every(PROBE_PERIOD, lambda: client.call("GET", "/healthz"), name="base-web"),
        Every(PROBE_PERIOD, lambda: store.probe(sid), name="base-store"),
    ]
    with running(loops):
        time.sleep(BASELINE_SECONDS)
    reads, web, trips = (latency_summary(loop.answers) for loop in loops)
    return {"seconds": BASELINE_SECONDS, "session_read": reads, "healthz": web, "store_round_trip": trips}


def run_layout(servers: Servers, layout: str, *, turns: int, seconds: float) -> dict[str, Any]:
    """One layout: the stack, the steady window with readers and probes, then the cancel of all turns."""
    mode, processes, _ = LAYOUTS[layout]
    processes = processes or turns
    concurrency = None if mode == "fork" else -(-turns // processes)
    settings = {**NO_LIMITS, "CANCEL_PUBSUB": "true", "CANCEL_POLL_INTERVAL": 1.0}
    mongo_pid = servers.mongo_pid
    with servers.stack(**settings) as stack:
        started = time.monotonic()
        workers = start_workers(stack, processes, mode, concurrency)
        workers_start_s = time.monotonic() - started
        team, key = stack.demo["teamId"], stack.demo["apiKey"]
        client = Client(stack.url, key)
        store = Store(stack)
        try:
            app_id = stack.cli("apps", "create", team, "--name", "load", "--config", json.dumps(STREAMING_TURN))[
                "appId"
            ]
            idle = start_sessions(client, team, stack.demo["appId"], int(seconds * CANCELS_PER_S) + 5, message=None)
            baseline = _baseline(client, store, team, idle.pop())
            # A turn that fails (a write the store refused, say) is counted and left out; the rest go on.
            claimed = store.wait_claimed(start_sessions(client, team, app_id, turns), 120, every=0.5)
            sids = claimed.running
            readers = [UiReader(client, team, sid) for sid in sids]
            session_reads = Every(
                1 / SESSION_READS_PER_S,
                lambda: client.call("GET", f"/{team}/session/{random.choice(sids)}.json"),
                name="session-reads",
            )
            cancels = Every(
                1 / CANCELS_PER_S,
                lambda: client.call("POST", f"/{team}/forms/session/{idle.pop()}/cancel") if idle else None,
                name="cancels",
            )
            # Where a read's time goes: a round trip to the store from here, and a request that never touches it.
            store_probe = Every(PROBE_PERIOD, lambda: store.probe(sids[0]), name="store-probe")
            web_probe = Every(PROBE_PERIOD, lambda: client.call("GET", "/healthz"), name="web-probe")
            web_pid, worker_pids = stack.webs[0][0].pid, [w.pid for w in workers]
            before = {
                "commands": store.commands(),
                "web": cpu_of_tree([web_pid]),
                "workers": cpu_of_tree(worker_pids),
                "mongo": cpu_seconds(mongo_pid),
                "at": time.monotonic(),
            }
            loops = [*readers, session_reads, cancels, store_probe, web_probe]
            with running(loops):
                time.sleep(seconds)
                elapsed = time.monotonic() - before["at"]
                window = {
                    "seconds": elapsed,
                    "store_commands": commands_between(before["commands"], store.commands(), elapsed),
                    "cpu": {
                        "web": (cpu_of_tree([web_pid]) - before["web"]) / elapsed,
                        "workers": (cpu_of_tree(worker_pids) - before["workers"]) / elapsed,
                        "mongo": (cpu_seconds(mongo_pid) - before["mongo"]) / elapsed if mongo_pid else None,
                    },
                }
                measured = {id(loop): len(loop.answers) for loop in loops}
                # The same load a little longer with the store's profiler on (not in the figures above).
                window["store_profile"] = store.profile(PROFILE_SECONDS)
            for loop in loops:
                del loop.answers[measured[id(loop)] :]
            states = store.sessions(sids, ("status",))
            stopped = [sid for sid in sids if states.get(sid, {}).get("status") != "running"]
            failed = {**claimed.over, **store.why_ended(stopped)}
            sids = [sid for sid in sids if sid not in stopped]
            if not sids:
                raise BenchError(f"every turn stopped before the cancel: {dict(list(failed.items())[:3])}")
            ui_answers = [a for reader in readers for a in reader.answers]
            with NoticeWatcher(stack) as ends:
                commands_before, cancel_started = store.commands(), time.monotonic()
                outcome = cancel_all(client, team, sids, store, ends, look_at=(LOOK_AT,), wait=30)
                cancel_window = time.monotonic() - cancel_started
                cancel_commands = commands_between(commands_before, store.commands(), cancel_window)
        finally:
            store.close()
    read = latency_summary(session_reads.answers)
    ui = latency_summary(ui_answers)
    cancel_all_figures = outcome.figures(CANCEL_ALL_TARGET_P99)
    return {
        "layout": layout,
        "mode": mode,
        "worker_processes": processes,
        "turn_concurrency": concurrency,
        "turns": turns,
        # Turns that ended on their own (an error) before the cancel, left out of the cancel-all.
        "turns_failed": {"not_running": len(failed), "why": sorted(set(failed.values()))[:3]},
        "setup_503s": client.unavailable,
        "workers_start_s": workers_start_s,
        "window": window,
        "baseline": baseline,
        "session_read_p99_vs_baseline": read["p99"] / baseline["session_read"]["p99"],
        "session_read": {**read, "target_p99_s": READ_TARGET_P99, "target_met": read["p99"] <= READ_TARGET_P99},
        "ui_poll": {**ui, "target_p99_s": READ_TARGET_P99, "target_met": ui["p99"] <= READ_TARGET_P99},
        "cancel_request": latency_summary(cancels.answers),
        "store_round_trip": latency_summary(store_probe.answers),
        "healthz": latency_summary(web_probe.answers),
        "cancel_all": {**cancel_all_figures, "store_commands": cancel_commands},
    }


def _layout_or_error(servers: Servers, layout: str, *, turns: int, seconds: float) -> dict[str, Any]:
    """`run_layout`, or why it could not be measured (the next layout still runs)."""
    try:
        return run_layout(servers, layout, turns=turns, seconds=seconds)
    except BenchError as exc:
        return {"layout": layout, "error": str(exc)}


def run(
    servers: Servers, *, turns: int = 20, seconds: float = 10.0, layouts: tuple[str, ...] = DEFAULT_LAYOUTS
) -> dict[str, Any]:
    """Every layout in turn, each on a stack of its own (on the part's servers)."""
    return {
        "turns": turns,
        "seconds": seconds,
        "turn": STREAMING_TURN,
        "look_at_s": LOOK_AT,
        "layouts": {name: _layout_or_error(servers, name, turns=turns, seconds=seconds) for name in layouts},
    }
