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
from .load_tier import CANCEL_ALL_TARGET_P99, READ_TARGET_P99

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
        "commit": _command("git", "-C", str(RESULTS.parent), "rev-parse", "--short", "HEAD"),
        "branch": _command("git", "-C", str(RESULTS.parent), "rev-parse", "--abbrev-ref", "HEAD"),
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
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {memory} RAM, load average at start {load}; "
        f"commit {info.get('commit') or '?'} ({info.get('branch') or '?'})",
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
        f"2. API under gunicorn (1 instance, 2 gevent workers): {part['connections']} connections, "
        f"{part['seconds']:g} s per endpoint, {part['generator'].split(' Copyright')[0]}",
        f"   {'endpoint':<34}{'req/s':>8}{'p50':>9}{'p99':>9}{'req/s÷base':>12}{'p99÷base':>10}{'errors':>8}"
        f"{'CPU web/mongo':>15}{'store trips, CPU/req':>22}",
    ]
    for entry in part["endpoints"].values():
        lines.append(_api_row(entry))
    lines += _fresh_ratio_lines(part, "")
    embedded = part.get("embedded_store")
    if embedded:
        lines.append(f"   Again on make run's store ({_capacity(embedded.get('store_capacity'))}):")
        for entry in embedded["endpoints"].values():
            lines.append(_api_row(entry))
        lines += _fresh_ratio_lines(embedded, "on make run's store ")
    return lines


def _api_row(entry: dict[str, Any]) -> str:
    p99_ratio, mongo_cpu = entry["p99_vs_baseline"], entry.get("mongo_cpu")
    per_request, cpu_ms = entry.get("store_round_trips_per_request"), entry.get("store_cpu_ms_per_request")
    row = (
        f"   {entry['label']:<34}{entry['requests_per_s']:>8.0f}{ms(entry['p50']):>9}{ms(entry['p99']):>9}"
        f"{entry['rate_vs_baseline']:>12.2f}{(f'{p99_ratio:.2f}' if p99_ratio else '-'):>10}{entry['errors']:>8}"
        f"{entry['web_cpu']:>9.0%} / {(f'{mongo_cpu:.0%}' if mongo_cpu is not None else '-'):<4}"
        f"{(f'{per_request:.1f}' if per_request is not None else '-'):>12}, "
        f"{(f'{cpu_ms:.1f} ms' if cpu_ms else '-'):<9}"
    )
    if entry.get("note"):
        row += f"\n     ({entry['note']})"
    return row


def _fresh_ratio_lines(part: dict[str, Any], where: str) -> list[str]:
    ratio = part.get("fresh_cancel_vs_session_read")
    if not ratio:
        return []
    return [
        f"   → fresh cancels ÷ session reads {where}(issue #10): {ratio['ratio']:.2f} "
        f"(target ≥ {ratio['target_ratio']:.2f}: {yes(ratio['target_met'])}); "
        f"{ratio['fresh_sessions']} fresh sessions for the timed run"
    ]


def _store_line(part: dict[str, Any]) -> str:
    """A load part's store, what it does flat out, and the MONGO_TIMEOUT its stacks had."""
    timeout = (part.get("stack_settings") or {}).get("MONGO_TIMEOUT")
    return f"   store: {part.get('store', '?')}; {_capacity(part.get('store_capacity'))}; MONGO_TIMEOUT " + (
        f"{timeout} s (--mongo-timeout; the product's default is 1 s)" if timeout else "the product's default (1 s)"
    )


def _capacity(capacity: dict[str, Any] | None) -> str:
    """The store flat out, for a part's heading."""
    if not capacity:
        return "store capacity not measured"
    reads, appends = capacity["find_one"], capacity["event_append"]
    text = (
        f"flat out while idle: find_one {reads['many_clients']['per_s']:.0f}/s, event append "
        f"{appends['many_clients']['per_s']:.0f}/s from {reads['many_clients']['clients']} clients; "
        f"{reads['one_client']['ms_per_op']:.1f} ms and {appends['one_client']['ms_per_op']:.1f} ms from one"
    )
    beat = capacity.get("heartbeat_50")
    if beat:
        beside = beat["beside_appends"]
        beats = sorted(beside["heartbeat_ms"])
        text += (
            f"; a heartbeat of 50 sessions {beat['alone_ms']} ms alone, "
            f"{beats[len(beats) // 2] if beats else '-'} ms beside {beside['clients']} appenders "
            f"(appends then {beside['per_s']:.0f}/s)"
        )
    return text


def _profile_line(profile: dict[str, Any] | None, what: str) -> list[str]:
    """The store's profiler, summed by command: the largest shares of the time commands spent in the server."""
    if not profile or not profile.get("by_command"):
        return []
    top = ", ".join(
        f"{row['command']} {row['share']:.0%} ({row['n']} × {row['mean_ms']:.0f} ms)"
        for row in profile["by_command"][:4]
    )
    return [
        f"     store profiler, {what} ({profile['seconds']:.0f} s, {profile['commands']} commands; time in the server, "
        f"waiting included): {top}"
    ]


def _pair(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    return f"{ms(summary['p50'])} / {ms(summary['p99'])}"


def _cpu(cpu: dict[str, Any], *names: str) -> str:
    return " / ".join(f"{cpu[n]:.0%}" if cpu.get(n) is not None else "-" for n in names)


def _load_tier_lines(part: dict[str, Any]) -> list[str]:
    layouts = {name: layout for name, layout in part["layouts"].items() if "error" not in layout}
    missing = [f"   {name}: could not be measured: {layout['error']}" for name, layout in part["layouts"].items()
               if "error" in layout]  # fmt: skip
    first = {"session_read": {"target_p99_s": READ_TARGET_P99}, "cancel_all": {"target_p99_s": CANCEL_ALL_TARGET_P99}}
    lines = [
        f"6. Load tier (issue #10): {part['turns']} running turns (a word every {part['turn']['stepDelay']:g} s), "
        f"a UI-like reader per session (messages.json?after every 500 ms), session reads 5/s, fresh cancels 2/s, "
        f"for {part['seconds']:g} s; then a cancel of all {part['turns']} at once (pub/sub on)",
        _store_line(part),
        f"   {'layout':<22}{'session read p50/p99':>22}{'UI poll p50/p99':>20}{'cancel p50/p99':>20}"
        f"{'store RT p50/p99':>20}{'healthz p99':>12}{'store trips/s':>13}{'CPU web/workers/mongo':>23}  read ≤ "
        f"{ms(first['session_read']['target_p99_s'])}",
    ]
    for layout in layouts.values():
        base = layout.get("baseline")
        if base:
            lines.append(
                f"   {'  (no turns running)':<22}{_pair(base['session_read']):>22}{'':>20}{'':>20}"
                f"{_pair(base['store_round_trip']):>20}{ms(base['healthz']['p99']):>12}"
            )
        lines.append(
            f"   {_layout_name(layout):<22}{_pair(layout['session_read']):>22}{_pair(layout['ui_poll']):>20}"
            f"{_pair(layout['cancel_request']):>20}{_pair(layout['store_round_trip']):>20}"
            f"{ms(layout['healthz']['p99']):>12}{layout['window']['store_commands']['per_s']:>13.0f}"
            f"{_cpu(layout['window']['cpu'], 'web', 'workers', 'mongo'):>23}  "
            f"{yes(layout['session_read']['target_met'] and layout['ui_poll']['target_met'])}"
            + (
                f"  (read p99 {layout['session_read_p99_vs_baseline']:.1f}× idle)"
                if layout.get("session_read_p99_vs_baseline")
                else ""
            )
            + _refused(reads=layout["session_read"], ui_polls=layout["ui_poll"], cancels=layout["cancel_request"])
        )
        lines += _profile_line(layout["window"].get("store_profile"), "same load")
    lines.append(
        f"   {'cancel all':<22}{'to end p50/p99':>22}{'max':>9}{'stamp→end p99':>15}{'answer p99':>12}"
        f"{'live @5 s':>11}{'all ended after':>17}{'store trips/s':>14}"
        f"  to end p99 ≤ {ms(first['cancel_all']['target_p99_s'])}{'notices lost':>14}"
    )
    for layout in layouts.values():
        c = layout["cancel_all"]
        lines.append(
            f"   {_layout_name(layout):<22}{_pair(c['cancel_to_end']):>22}{ms(c['cancel_to_end']['max']):>9}"
            f"{ms(c['stamp_to_end']['p99']):>15}{ms(c['request']['p99']):>12}"
            f"{c['live_after_s'].get('5', '-'):>11}{_seconds(c['all_ended_after_s']):>17}"
            f"{c['store_commands']['per_s']:>14.0f}  {yes(c['target_met']):<18}"
            f"{c.get('closing_notices_missing', '-'):>14}"
            + (f" ({c['not_ended']} never ended)" if c["not_ended"] else "")
            + _failed(layout.get("turns_failed"), "before the cancel, left out of it")
            + _refused(cancels=c["request"])
        )
        lines += _setup_line(layout)
    return lines + missing


def _failed(figures: dict[str, Any] | None, when: str) -> str:
    """A note for a row whose turns did not all run: how many failed, and why (the first reason)."""
    if not figures or not figures.get("not_running"):
        return ""
    return f"  ({figures['not_running']} turns FAILED {when}: {(figures.get('why') or ['?'])[0][:160]})"


def _refused(**summaries: dict[str, Any] | None) -> str:
    """A note for a row whose requests did not all succeed (a 503 while the store was too slow, say)."""
    failed = []
    for name, summary in summaries.items():
        if summary and (n := summary.get("errors")):
            how = ", ".join(f"{kind} ×{f['n']}" for kind, f in (summary.get("failures") or {}).items())
            failed.append(f"{n} {name}" + (f": {how}" if how else ""))
    return f"  (requests that failed: {'; '.join(failed)})" if failed else ""


def _setup_line(part: dict[str, Any]) -> list[str]:
    """How often the product refused the requests a part needed to set up (each sent again)."""
    count = part.get("setup_503s") or 0
    if not count:
        return []
    why = "503, or 409 while a first attempt was still in progress"
    return [f"   (setting up, the product refused {count} requests ({why}): each sent again a second later)"]


def _layout_name(layout: dict[str, Any]) -> str:
    """A worker layout (load_tier's and many_turns' modes alike): fork, N processes, or thread, P × C."""
    if layout["mode"] == "fork":
        return f"fork, {layout['worker_processes']} processes"
    return f"thread, {layout['worker_processes']} × {layout['turn_concurrency']}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _many_turns_lines(part: dict[str, Any]) -> list[str]:
    modes = part["modes"]
    finite = part["finite_turn"]
    lines = [
        f"7. Many turns (issue #16): finite turns of {finite['steps']} words, one every {finite['stepDelay']:g} s "
        f"({finite['steps'] * finite['stepDelay']:g} s), output written every {part['output_flush_interval_s']:g} s; "
        f"then long turns cancelled all at once, with pub/sub and without (CANCEL_POLL_INTERVAL "
        f"{part['poll_interval_s']:g} s)",
        _store_line(part),
        f"   {'mode':<22}{'turns':>6}{'idle PSS':>10}{'running':>10}{'per turn':>10}  ≤ 5 MiB"
        f"{'all PSS ÷ turns':>17}{'complete':>10}{'session read p50/p99':>22}{'all ran / all ended':>21}",
    ]
    for mode in modes.values():
        m = mode.get("memory")
        if not m:
            continue
        lines.append(
            f"   {_layout_name(mode):<22}{mode['turns']:>6}"
            f"{m['idle_pss_mib']:>7.0f} MiB{m['running_pss_mib']:>6.0f} MiB"
            f"{_mib(m['pss_per_turn_mib']):>10}  {yes(m['pss_target_met']):<7}{_mib(m['pss_total_per_turn_mib']):>17}"
            f"{m['output']['complete']:>5}/{m['output']['checked']:<4}{_pair(m['session_read']):>22}"
            f"{m['all_running_after_s']:>9.1f} s / {m['all_ended_after_s']:.1f} s"
            + _failed(m.get("turns_failed"), "before all ran")
            + (f"  ({early} had finished before all ran)" if (early := m.get("finished_before_all_ran")) else "")
            + _refused(reads=m["session_read"])
        )
    lines.append(
        f"   {'cancel all':<22}{'turns':>6}{'to end p50/p99':>22}{'max':>9}{'stamp→end p99':>15}{'answer p99':>12}"
        f"{'live @1/2/5 s':>16}{'ended':>8}{'store trips/s':>14}  target   met"
        f"{'notices lost':>14}{'webhook p50/p99, delivered':>32}"
    )
    for mode in modes.values():
        for key in ("pubsub", "polling"):
            c = mode.get(key)
            if not c:
                continue
            live = "/".join(str(c["live_after_s"].get(k, "-")) for k in ("1", "2", "5"))
            lines.append(
                f"   {_layout_name(mode) + (', pub/sub' if key == 'pubsub' else ', polling'):<22}{c['sessions']:>6}"
                f"{_pair(c['cancel_to_end']):>22}{ms(c['cancel_to_end']['max']):>9}{ms(c['stamp_to_end']['p99']):>15}"
                f"{ms(c['request']['p99']):>12}{live:>16}{c['sessions'] - c['not_ended']:>4}/{c['sessions']:<3}"
                f"{c['store_commands']['per_s']:>14.0f}  ≤ {ms(c['target_p99_s']):<8}{yes(c['target_met']):<4}"
                f"{c.get('closing_notices_missing', '-'):>13}{_webhook_cell(c.get('webhook_session_ended')):>32}"
                + _failed(c.get("turns_failed"), "before the cancel, left out of it")
                + _refused(cancels=c["request"])
            )
            lines += _profile_line(c.get("store_profile_before"), f"{c['sessions']} turns running, before the cancel")
    for mode in modes.values():
        lines += _setup_line(mode)
        for phase, error in (mode.get("errors") or {}).items():
            lines.append(f"   {_layout_name(mode)}, {phase}: could not be measured: {error}")
    return lines


def _webhook_cell(hook: dict[str, Any] | None) -> str:
    if not hook:
        return "-"
    return f"{_pair(hook) if hook['delivered'] else '-'}, {hook['delivered']}/{hook['sessions']}"


def _mib(value: float) -> str:
    return f"{value * 1024:.0f} KiB" if value < 1 else f"{value:.1f} MiB"


def _streams_lines(part: dict[str, Any]) -> list[str]:
    d, h, w = part["delivery"], part["held"], part["webhooks"]
    lines = [
        f"8. Streams and webhooks (issue #15): 1 web instance (2 gevent workers), {part['turns']} running turns "
        f"(a word every {part['turn']['stepDelay']:g} s), {part['seconds']:g} s per measurement",
        _store_line(part),
        *(
            [f"   {f['streams']} of {f['of']} streams FAILED to open ({', '.join(f['errors'])}); the figures: the rest"]
            if (f := part.get("failed_to_open") or {}).get("streams")
            else []
        ),
        f"   delivery, worker's createdAt → received here, {d['streams']} streams on the running turns: "
        f"p50 {ms(d['p50'])}, p99 {ms(d['p99'])}, max {ms(d['max'])} ({d['n']} events, {d['frames_per_s']:.0f}/s); "
        f"target p99 ≤ {ms(d['target_p99_s'])}: {yes(d['target_met'])}; store {d['store_commands']['per_s']:.0f} "
        f"round trips/s, CPU web / mongo {_cpu(d['cpu'], 'web', 'mongo')}",
        f"     split where the bench heard the Redis notice: createdAt → notice (the worker's writes, publish) "
        f"{_pair(d['written_to_notice'])}, notice → stream (the web instance) {_pair(d['notice_to_stream'])}"
        " (p50 / p99)",
        f"   {h['target_streams']} streams held: {h['streams_opened']} more opened in {h['open_s']:.1f} s "
        f"(answers {h['statuses']}, opening p50/p99 {_pair(h['open_latency'])}), {h['open_now']} open: "
        f"{yes(h['held_all'])}; web PSS {h['web_pss_no_streams_mib']:.0f} → {h['web_pss_held_mib']:.0f} MiB = "
        f"{h['kib_per_stream']:.0f} KiB per open stream",
        f"   with {h['open_now']} open: delivery on the {d['streams']} p50 {ms(h['delivery_on_active']['p50'])}, "
        f"p99 {ms(h['delivery_on_active']['p99'])} "
        f"(notice → stream {_pair(h['delivery_on_active']['notice_to_stream'])}); "
        f"store {h['store_commands']['per_s']:.0f} round trips/s, "
        f"CPU web / mongo {_cpu(h['cpu'], 'web', 'mongo')}",
        *_profile_line(h.get("store_profile"), f"{h['open_now']} streams open"),
    ]
    a, worker, web, busy = w["all"], w["ended_by_worker"], w["ended_by_web"], w["while_slots_busy"]
    lines += [
        f"   webhook session.ended, arrival − endedAt: ended by the worker (cancel all {worker['sessions']}) "
        f"p50 {ms(worker['p50'])} p99 {ms(worker['p99'])}; ended by the web instance ({web['sessions']} idle, one by "
        f"one) p50 {ms(web['p50'])} p99 {ms(web['p99'])}; all {a['n']}/{a['sessions']} p99 {ms(a['p99'])} "
        f"(target ≤ {ms(a['target_p99_s'])}): {yes(a['target_met'])}",
        *(
            [
                f"   of which, ended by the worker: end → recorded {_pair(worker['stages']['end_to_recorded'])}, "
                f"recorded → first attempt {_pair(worker['stages']['recorded_to_attempt'])}, "
                f"attempt → arrival {_pair(worker['stages']['attempt_to_arrival'])} (p50/p99)"
            ]
            if worker.get("stages", {}).get("end_to_recorded", {}).get("n")
            else []
        ),
        f"   while all {busy['turn_concurrency']} worker slots ran turns: "
        + ", ".join(f"{n} of {busy['sessions']} delivered within {s} s" for s, n in busy["delivered_within_s"].items())
        + f"; they arrived p50 {_seconds(busy['p50'])} after their sessions ended (once the cancel-all freed slots)",
        f"   streams on the cancelled sessions that got session.ended: {part['streams_ended']['on_cancelled_sessions']}"
        f"/{part['streams_ended']['of']}",
        *_setup_line(part),
        *(
            [_failed(part.get("turns_failed"), "before the streams opened, left out").strip()]
            if part.get("turns_failed", {}).get("not_running")
            else []
        ),
    ]
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
    "load_tier": _load_tier_lines,
    "many_turns": _many_turns_lines,
    "streams": _streams_lines,
}


def render(results: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    lines = ["agentcloud_clone benchmarks", *_machine_lines(results["machine"]), ""]
    for key, renderer in RENDERERS.items():
        if key in results["parts"]:
            load, end = results["load_average"].get(key), results["load_average"].get(f"{key}:end")
            lines += [*renderer(results["parts"][key])]
            if load:
                took = results.get("part_seconds", {}).get(key)
                lines.append(
                    f"   (1-minute load average when this part started: {load[0]:.2f}"
                    + (f", when it ended: {end[0]:.2f}" if end else "")
                    + (f"; it took {took:.0f} s)" if took is not None else ")")
                )
            lines.append("")
    for key, error in results["errors"].items():
        lines.append(f"{key}: could not be measured: {error}")
    lines.append(f"Total {results['seconds']:.0f} s; JSON in {results.get('json', '?')}")
    return "\n".join(lines)
