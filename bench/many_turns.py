"""Part 7 (issue #16): many concurrent scripted turns on few worker processes, memory per turn, cancel all.

Thread mode runs 200 turns on at most 4 worker processes (TURN_CONCURRENCY 50 each); fork mode runs the
concurrency it can reach on this machine (one worker process, and one forked work horse, per turn: 40 by
default), side by side. For each mode:

1. **Memory and completeness.** The workers are started and left idle; their PSS (worker processes and, in
   fork mode, their children, from /proc/<pid>/smaps_rollup) is the idle figure. N sessions are started, each
   with one finite scripted turn; once all N are running their PSS is read again, and
   (running − idle) / N is the memory per concurrent turn. Every turn must end `waiting` with its whole
   output in the transcript (the reply's words, in order). Session reads (`GET .../session/<sid>.json` of a
   random session, 5 a second) run meanwhile.
2. **Cancel all, with pub/sub.** N long turns; once all run, a cancel of all N is sent at once;
   cancel-to-end is each request's send time to its session's `endedAt`.
3. **Cancel all, without pub/sub** (CANCEL_PUBSUB=false on a fresh stack): the same, noticed by polling alone.

Turns stream a word every 250 ms (the scripted runner's default pace) and their output is written every 5 s
(OUTPUT_FLUSH_INTERVAL=5; at the default 0.25 s, 200 turns would append 800 times a second, several times what
the embedded store takes flat out). The store is `make run`'s (see docs/PERFORMANCE.md); its profiler runs
for a few seconds before each cancel, outside the figures.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from devtools.stack import Stack

from .harness import BenchError, Servers, cpu_seconds, wait_for
from .streams import Receiver, webhook_latency
from .workload import (
    NO_LIMITS,
    Client,
    Every,
    NoticeWatcher,
    Store,
    cancel_all,
    commands_between,
    cpu_of_tree,
    latency_summary,
    running,
    start_sessions,
    start_turns,
    start_workers,
    steady_tree_pss_kib,
)

PSS_TARGET_MIB = 5.0
CANCEL_TARGET_PUBSUB = 0.500
POLLING_MARGIN = 0.500
# Turns stream a word every 250 ms, as the scripted runner does by default. Their output is written every
# FLUSH_INTERVAL s (OUTPUT_FLUSH_INTERVAL; the default 0.25 s would have 200 turns append 800 times a second,
# several times what the embedded store can take: see the store's flat-out figures in the same run).
STEP_DELAY = 0.25
FLUSH_INTERVAL = 5.0
STEPS = 100  # a finite turn: 25 s, long enough for all N to be started before the first ends
WORDS = " ".join(f"w{i}" for i in range(1, STEPS + 1))
FINITE_TURN = {"steps": STEPS, "stepDelay": STEP_DELAY, "reply": WORDS}
LONG_TURN = {"steps": 100_000, "stepDelay": STEP_DELAY}
SESSION_READS_PER_S = 5.0
PROBE_PERIOD = 0.2
LOOK_AT = (1.0, 2.0, 5.0)
WEBHOOK_WAIT = 30.0


def _app(stack: Stack, name: str, config: dict[str, Any]) -> str:
    return str(
        stack.cli("apps", "create", stack.demo["teamId"], "--name", name, "--config", json.dumps(config))["appId"]
    )


def _wait_turns_ended(notices: NoticeWatcher, store: Store, sids: list[str], timeout: float) -> None:
    """Until every turn has ended: from the transcript notices, confirmed in the store for any whose notice has
    not come (a fork-mode work horse can exit before its last notice is sent)."""
    last_look = [time.monotonic()]

    def ended() -> bool:
        pending = notices.without("turn_end", sids)
        if not pending:
            return True
        if time.monotonic() - last_look[0] >= 2.0:
            last_look[0] = time.monotonic()
            states = store.sessions(pending, ("status",))
            return all(states.get(sid, {}).get("status") != "running" for sid in pending)
        return False

    wait_for(ended, timeout, "every turn to end", every=0.1)


def _output_complete(client: Client, team: str, sids: list[str]) -> dict[str, Any]:
    """Every session ended its turn `waiting` with the reply's words, in order, as its output."""

    def check(sid: str) -> tuple[bool, str]:
        answer = client.setup("GET", f"/{team}/session/{sid}/messages.json?limit=1000")
        events = answer.body.get("messages") or []
        text = "".join(e.get("text", "") for e in events if e.get("type") == "output")
        if answer.body.get("status") != "waiting":
            closing = next((e for e in reversed(events) if e.get("type") == "status"), {})
            why = f"{closing.get('endReason')}: {str(closing.get('message'))[:300]}" if closing else "no closing event"
            return False, f"status {answer.body.get('status')} ({why})"
        if text != WORDS:
            return False, f"output {text!r}"
        if not any(e.get("type") == "turn_end" and not e.get("interrupted") for e in events):
            return False, "no turn_end"
        return True, ""

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(check, sids))
    failures = [f"{sid}: {why}" for sid, (ok, why) in zip(sids, results, strict=True) if not ok]
    return {"checked": len(sids), "complete": len(sids) - len(failures), "failures": failures[:5]}


def _memory_phase(stack: Stack, client: Client, store: Store, roots: list[int], turns: int, mongo_pid: int | None):
    """Phase 1: idle PSS, N finite turns running together (PSS, session reads), all complete."""
    team = stack.demo["teamId"]
    time.sleep(1.0)  # start-up allocations settle
    idle_kib, idle_processes = steady_tree_pss_kib(roots)
    app_id = _app(stack, "finite", FINITE_TURN)
    reads: list[Any] = []
    with NoticeWatcher(stack) as notices:
        # Created first with their message waiting, then all turns started together: the turns begin within
        # a few seconds of each other however long the creating took.
        sids = start_sessions(client, team, app_id, turns, skip_run=True)
        started = time.monotonic()
        created_s = start_turns(client, team, sids)
        session_reads = Every(
            1 / SESSION_READS_PER_S, lambda: client.call("GET", f"/{team}/session/{random.choice(sids)}.json")
        )
        store_probe = Every(PROBE_PERIOD, lambda: store.probe(sids[0]), name="store-probe")
        with running([session_reads, store_probe]):
            claimed = store.wait_claimed(sids, timeout=STEPS * STEP_DELAY + 120)
            all_running_s = claimed.seconds + created_s
            # On a machine too busy to start them all within one turn's length, the first have finished by
            # now: counted (the PSS is then of fewer running turns than `turns`).
            finished_early = len(notices.seen.get("turn_end", {}))
            running_kib, running_processes = steady_tree_pss_kib(roots)
            window_start = time.monotonic()
            commands_before, cpu_before = store.commands(), (cpu_of_tree(roots), cpu_seconds(mongo_pid))
            _wait_turns_ended(notices, store, claimed.running, STEPS * STEP_DELAY * 4 + 120)
            elapsed = time.monotonic() - window_start
            commands = commands_between(commands_before, store.commands(), elapsed)
            cpu = {
                "workers": (cpu_of_tree(roots) - cpu_before[0]) / elapsed,
                "mongo": (cpu_seconds(mongo_pid) - cpu_before[1]) / elapsed if mongo_pid else None,
            }
        reads = session_reads.answers
        finished_s = time.monotonic() - started
    per_turn_mib = (running_kib - idle_kib) / len(claimed.running) / 1024
    complete = _output_complete(client, team, sids)
    read = latency_summary(reads)
    return {
        "idle_pss_mib": idle_kib / 1024,
        "idle_processes": idle_processes,
        "running_pss_mib": running_kib / 1024,
        "running_processes": running_processes,
        "pss_per_turn_mib": per_turn_mib,
        "pss_total_per_turn_mib": running_kib / len(claimed.running) / 1024,
        # Turns over (failed) before all had started: not in the PSS per turn, and not complete below.
        "turns_failed": claimed.figures(),
        "pss_target_mib": PSS_TARGET_MIB,
        "pss_target_met": per_turn_mib <= PSS_TARGET_MIB,
        "turns_started_in_s": created_s,
        "finished_before_all_ran": finished_early,
        "all_running_after_s": all_running_s,
        "all_ended_after_s": finished_s,
        "nominal_turn_s": STEPS * STEP_DELAY,
        "output": complete,
        "output_complete": complete["complete"] == turns,
        "session_read": read,
        "store_round_trip": latency_summary(store_probe.answers),
        "while_running": {"store_commands": commands, "cpu": cpu},
    }


def _cancel_phase(stack: Stack, client: Client, store: Store, roots: list[int], turns: int, target: float):
    """Phase 2 or 3: N long turns, all running, then one cancel of all of them."""
    team = stack.demo["teamId"]
    receiver = Receiver()
    receiver.register(client, team)
    app_id = _app(stack, "long", LONG_TURN)
    claimed = store.wait_claimed(start_sessions(client, team, app_id, turns), timeout=180)
    sids = claimed.running  # a turn that failed before the cancel is counted, and not cancelled
    running_kib, _ = steady_tree_pss_kib(roots, reads=1)
    # Every turn streams and has written output by the end of this; the store's profiler shows meanwhile where
    # its time goes with all N turns running (it is off again before the cancel).
    profile = store.profile(FLUSH_INTERVAL + 1)
    with NoticeWatcher(stack) as notices:
        commands_before, started = store.commands(), time.monotonic()
        outcome = cancel_all(client, team, sids, store, notices, look_at=LOOK_AT, wait=60)
        commands = commands_between(commands_before, store.commands(), time.monotonic() - started)
    try:
        webhook = webhook_latency(receiver, store, sids, wait=WEBHOOK_WAIT)
    finally:
        receiver.stop()
    return {
        **outcome.figures(target),
        "turns_failed": claimed.figures(),
        # session.ended deliveries (a loopback receiver): arrival minus the session's endedAt
        "webhook_session_ended": webhook,
        "running_pss_mib": running_kib / 1024,
        "store_commands": commands,
        "round_trips_per_session": commands["round_trips"] / len(sids),
        "store_profile_before": profile,
    }


def _phase(result: dict[str, Any], name: str, take: Callable[..., dict[str, Any]], *args: Any) -> None:
    """`result[name] = take(*args)`, or why it could not be taken under `result["errors"][name]`."""
    try:
        result[name] = take(*args)
    except BenchError as exc:
        result.setdefault("errors", {})[name] = str(exc)


def run_mode(servers: Servers, mode: str, *, turns: int, processes: int, interval: float) -> dict[str, Any]:
    """One worker mode: memory and completeness, then cancel-all with pub/sub, then without (a fresh stack)."""
    concurrency = -(-turns // processes) if mode == "thread" else None
    result: dict[str, Any] = {
        "mode": mode,
        "turns": turns,
        "worker_processes": processes,
        "turn_concurrency": concurrency,
    }
    for pubsub in (True, False):
        settings = {
            **NO_LIMITS,
            "CANCEL_PUBSUB": str(pubsub).lower(),
            "CANCEL_POLL_INTERVAL": interval,
            "OUTPUT_FLUSH_INTERVAL": FLUSH_INTERVAL,
            "WEBHOOK_ALLOW_PRIVATE": "true",
        }
        with servers.stack(**settings) as stack:
            started = time.monotonic()
            workers = start_workers(stack, processes, mode, concurrency, timeout=300)
            result.setdefault("workers_start_s", time.monotonic() - started)
            client, store = Client(stack.url, stack.demo["apiKey"]), Store(stack)
            roots = [w.pid for w in workers]
            # A phase the product could not be brought to (say, its store refusing sessions for minutes) is
            # recorded with why, and the next one still runs.
            try:
                if pubsub:
                    _phase(result, "memory", _memory_phase, stack, client, store, roots, turns, servers.mongo_pid)
                    target = CANCEL_TARGET_PUBSUB
                else:
                    target = interval + POLLING_MARGIN
                name = "pubsub" if pubsub else "polling"
                _phase(result, name, _cancel_phase, stack, client, store, roots, turns, target)
            finally:
                store.close()
                result["setup_503s"] = result.get("setup_503s", 0) + client.unavailable
    return result


def run(
    servers: Servers,
    *,
    turns: int = 200,
    thread_processes: int = 4,
    fork_turns: int = 40,
    interval: float = 1.0,
    modes: tuple[str, ...] = ("thread", "fork"),
) -> dict[str, Any]:
    """Thread mode at `turns` on `thread_processes` processes, fork mode at `fork_turns`, side by side."""
    out: dict[str, Any] = {
        "poll_interval_s": interval,
        "output_flush_interval_s": FLUSH_INTERVAL,
        "finite_turn": FINITE_TURN,
        "long_turn": LONG_TURN,
        "modes": {},
    }
    for mode in modes:
        n, processes = (turns, thread_processes) if mode == "thread" else (fork_turns, fork_turns)
        out["modes"][mode] = run_mode(servers, mode, turns=n, processes=processes, interval=interval)
    return out
