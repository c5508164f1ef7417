"""Part 8 (issue #15): live streams and webhooks on one web instance.

One web instance as the stack starts it (gunicorn, 2 gevent workers), one thread-mode worker process running
20 long scripted turns (a word every 50 ms, written every 250 ms), a loopback webhook receiver registered for
`session.ended` (WEBHOOK_ALLOW_PRIVATE=true).

1. **Delivery.** 100 streams (`GET /<team>/session/<sid>/events`, 5 per running session) follow the turns for
   `seconds`; each event's delay is its arrival here minus its `createdAt` (written by the worker just before
   its transcript write), on the one machine clock.
2. **1,000 streams.** 900 more streams are opened on 100 idle sessions (a page left open on a session that
   waits for a message), so the instance holds 1,000; the web instance's PSS (gunicorn and its workers) with
   1,000 open against none gives the memory per open stream; delivery on the 100 is measured again.
3. **Webhooks.** All 20 running sessions are cancelled at once (their worker ends them and records the
   deliveries), then 40 idle sessions are cancelled one by one (ended by the web instance at once); the
   receiver notes each `session.ended` arrival, against the session's `endedAt`. Before that, 5 idle sessions
   are cancelled while the worker's every slot runs a turn, to show what a delivery waits for then.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.fakes.receiver import Receiver as FakeReceiver

from .harness import BenchError, Servers, cpu_seconds
from .sse import StreamFleet
from .stats import summarize
from .workload import (
    NO_LIMITS,
    Client,
    NoticeWatcher,
    Store,
    cancel_all,
    commands_between,
    cpu_of_tree,
    start_sessions,
    start_workers,
    steady_tree_pss_kib,
)

DELIVERY_TARGET_P99 = 0.100
WEBHOOK_TARGET_P99 = 1.0
STREAMING_TURN = {"steps": 10_000, "stepDelay": 0.05}


class _Stamped(list[dict[str, Any]]):
    """The fake receiver's record of deliveries, each stamped with `time.time()` as it is recorded."""

    def append(self, record: dict[str, Any]) -> None:
        super().append({**record, "arrived": time.time()})


class Receiver(FakeReceiver):
    """The tests' webhook receiver on loopback (answers 200), started, noting when each delivery arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.received = _Stamped()
        self.start()

    def register(self, client: Client, team: str) -> None:
        """This receiver as the team's webhook endpoint for `session.ended`."""
        client.setup("POST", f"/{team}/forms/webhook/add", {"url": self.url, "eventTypes": ["session.ended"]}, 201)

    def ended(self) -> dict[str, float]:
        """Session → first arrival of its `session.ended`."""
        with self.lock:
            found: dict[str, float] = {}
            for record in self.received:
                body = json.loads(record["body"])
                if body.get("type") == "session.ended":
                    found.setdefault(body["data"]["sessionId"], record["arrived"])
            return found


def _delivery(fleet: StreamFleet, streams: list[Any], seconds: float, notices: NoticeWatcher) -> dict[str, Any]:
    """Delay of every event created during `seconds` on `streams`: arrival here minus `createdAt`, split where
    the bench heard the event's Redis notice (the worker's writes and publish before it, the web instance's
    dispatch and the stream after)."""
    fleet.reset_delays()
    fleet.measure(time.time())
    time.sleep(seconds)
    fleet.measure(float("inf"))
    time.sleep(0.5)  # the last events' frames arrive
    summary = summarize(fleet.delays(streams))
    to_notice, notice_to_stream = [], []
    for stream in streams:
        for seq, received, created in stream.timed:
            heard = notices.heard.get((stream.session_id, seq))
            if heard is not None:
                to_notice.append(heard - created)
                notice_to_stream.append(received - heard)
    return {
        **summary,
        "written_to_notice": summarize(to_notice),
        "notice_to_stream": summarize(notice_to_stream),
        "target_p99_s": DELIVERY_TARGET_P99,
        "target_met": summary["p99"] <= DELIVERY_TARGET_P99,
    }


def webhook_latency(receiver: Receiver, store: Store, sids: list[str], wait: float) -> dict[str, Any]:
    """Arrival of each session's `session.ended` minus its `endedAt`; waits up to `wait` s for the stragglers.
    `stages` splits it at the delivery's record (`createdAt`, as the recording process queued it) and its first
    attempt's start (after the job was picked up and claimed the attempt)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and len(set(sids) & receiver.ended().keys()) < len(sids):
        time.sleep(0.1)
    arrived, ended = receiver.ended(), store.sessions(sids, ("endedAt",))
    delays = [arrived[s] - ended[s]["endedAt"].timestamp() for s in sids if s in arrived and ended[s].get("endedAt")]
    summary = summarize(delays)
    to_record, to_attempt, to_arrival = [], [], []
    for sid, delivery in store.first_deliveries(sids, "session.ended").items():
        ended_at, attempts = ended.get(sid, {}).get("endedAt"), delivery.get("attempts") or []
        if ended_at is None or not attempts or sid not in arrived:
            continue
        recorded, attempted = delivery["createdAt"].timestamp(), attempts[0]["at"].timestamp()
        to_record.append(recorded - ended_at.timestamp())
        to_attempt.append(attempted - recorded)
        to_arrival.append(arrived[sid] - attempted)
    stages = {
        "end_to_recorded": summarize(to_record),
        "recorded_to_attempt": summarize(to_attempt),
        "attempt_to_arrival": summarize(to_arrival),
    }
    return {**summary, "sessions": len(sids), "delivered": len(delays), "waited_up_to_s": wait, "stages": stages}


def run(
    servers: Servers,
    *,
    turns: int = 20,
    active_streams: int = 100,
    total_streams: int = 1000,
    idle_sessions: int = 100,
    seconds: float = 10.0,
) -> dict[str, Any]:
    """The three phases on one stack (on the part's servers)."""
    settings = {**NO_LIMITS, "WEBHOOK_ALLOW_PRIVATE": "true", "CANCEL_PUBSUB": "true"}
    receiver = Receiver()
    result: dict[str, Any] = {"turns": turns, "seconds": seconds, "turn": STREAMING_TURN}
    try:
        mongo_pid = servers.mongo_pid
        with servers.stack(**settings) as stack:
            workers = start_workers(stack, 1, "thread", turns)
            team, key = stack.demo["teamId"], stack.demo["apiKey"]
            client, store = Client(stack.url, key), Store(stack)
            fleet = StreamFleet(stack.url, key)
            notices = NoticeWatcher(stack, keep_events=True).__enter__()
            web_root = stack.webs[0][0].pid
            try:
                receiver.register(client, team)
                app_id = stack.cli("apps", "create", team, "--name", "stream", "--config", json.dumps(STREAMING_TURN))[
                    "appId"
                ]
                idle = start_sessions(client, team, stack.demo["appId"], idle_sessions + 45, message=None)
                watched_idle, to_cancel = idle[:idle_sessions], idle[idle_sessions:]
                claimed = store.wait_claimed(start_sessions(client, team, app_id, turns), 120, every=0.5)
                sids, result["turns_failed"] = claimed.running, claimed.figures()
                time.sleep(1.0)
                web_idle_kib, web_processes = steady_tree_pss_kib([web_root])

                # 1. delivery with `active_streams` following the running turns
                per_session = max(1, active_streams // turns)
                active = fleet.open([f"/{team}/session/{sid}/events" for sid in sids for _ in range(per_session)])
                opened = [s for s in active if s.status == 200 and not s.error]
                result["failed_to_open"] = {
                    "streams": len(active) - len(opened),
                    "of": len(active),
                    "errors": sorted({str(s.error) for s in active if s not in opened})[:3],
                }
                if not opened:
                    raise BenchError(f"none of {len(active)} streams opened: {result['failed_to_open']['errors']}")
                active = opened  # the figures are of the streams that opened; the others are counted
                time.sleep(1.0)
                before = (store.commands(), cpu_of_tree([web_root]), cpu_seconds(mongo_pid), time.monotonic())
                frames_before = sum(s.frames for s in active)
                delivery = _delivery(fleet, active, seconds, notices)
                elapsed = time.monotonic() - before[3]
                result["delivery"] = {
                    "streams": len(active),
                    **delivery,
                    "store_commands": commands_between(before[0], store.commands(), elapsed),
                    "cpu": {
                        "web": (cpu_of_tree([web_root]) - before[1]) / elapsed,
                        "mongo": (cpu_seconds(mongo_pid) - before[2]) / elapsed if mongo_pid else None,
                    },
                    "frames_per_s": (sum(s.frames for s in active) - frames_before) / elapsed,
                }

                # 2. hold `total_streams`: the rest on idle sessions
                extra = total_streams - len(active)
                paths = [f"/{team}/session/{watched_idle[i % len(watched_idle)]}/events" for i in range(extra)]
                opened_at = time.monotonic()
                held = fleet.open(paths, parallel=50, timeout=300)
                open_seconds = time.monotonic() - opened_at
                statuses: dict[str, int] = {}
                for stream in held:
                    statuses[str(stream.status)] = statuses.get(str(stream.status), 0) + 1
                time.sleep(1.0)
                web_held_kib, _ = steady_tree_pss_kib([web_root])
                open_now = sum(
                    1 for s in fleet.streams if s.status == 200 and not s.error and not s.closed and not s.ended
                )
                before = (store.commands(), cpu_of_tree([web_root]), cpu_seconds(mongo_pid), time.monotonic())
                delivery_held = _delivery(fleet, active, seconds, notices)
                elapsed = time.monotonic() - before[3]
                held_commands = commands_between(before[0], store.commands(), elapsed)
                held_cpu = {
                    "web": (cpu_of_tree([web_root]) - before[1]) / elapsed,
                    "mongo": (cpu_seconds(mongo_pid) - before[2]) / elapsed if mongo_pid else None,
                }
                profile = store.profile(3.0)  # where the store's time goes with all streams open (not timed)
                result["held"] = {
                    "streams_opened": len(held),
                    "open_s": open_seconds,
                    "open_latency": summarize([s.open_seconds for s in held if s.open_seconds is not None]),
                    "statuses": statuses,
                    "open_now": open_now,
                    "target_streams": total_streams,
                    "held_all": open_now >= total_streams,
                    "web_processes": web_processes,
                    "web_pss_no_streams_mib": web_idle_kib / 1024,
                    "web_pss_held_mib": web_held_kib / 1024,
                    "kib_per_stream": (web_held_kib - web_idle_kib) / max(1, open_now),
                    "delivery_on_active": delivery_held,
                    "store_commands": held_commands,
                    "store_profile": profile,
                    "cpu": held_cpu,
                }

                # 3. webhooks: while every worker slot is busy, then the running sessions, then idle ones
                busy, after_idle = to_cancel[:5], to_cancel[5:]
                for sid in busy:
                    client.call("POST", f"/{team}/forms/session/{sid}/cancel")
                busy_wait = 3.0
                time.sleep(busy_wait)
                delivered_while_busy = len(set(busy) & receiver.ended().keys())
                outcome = cancel_all(client, team, sids, store, notices, look_at=(5.0,), wait=30)
                for sid in after_idle:
                    client.call("POST", f"/{team}/forms/session/{sid}/cancel")
                    time.sleep(0.2)
                result["webhooks"] = {
                    "ended_by_worker": webhook_latency(receiver, store, sids, wait=15),
                    "ended_by_web": webhook_latency(receiver, store, after_idle, wait=15),
                    "while_slots_busy": {
                        **webhook_latency(receiver, store, busy, wait=0),
                        "delivered_within_s": {f"{busy_wait:g}": delivered_while_busy},
                        "turn_concurrency": turns,
                        "running_turns": turns,
                    },
                }
                both = [
                    *_delays(receiver, store, sids),
                    *_delays(receiver, store, after_idle),
                ]
                summary = summarize(both)
                result["webhooks"]["all"] = {
                    **summary,
                    "sessions": len(sids) + len(after_idle),
                    "target_p99_s": WEBHOOK_TARGET_P99,
                    "target_met": len(both) == len(sids) + len(after_idle) and summary["p99"] <= WEBHOOK_TARGET_P99,
                }
                result["cancel_all"] = outcome.figures(0.5)
                time.sleep(1.0)
                result["streams_ended"] = {
                    "on_cancelled_sessions": sum(1 for s in active if s.ended),
                    "of": len(active),
                    "errors": sorted({s.error for s in fleet.streams if s.error})[:5],
                }
            finally:
                notices.__exit__()
                fleet.close()
                store.close()
                result["setup_503s"] = client.unavailable
                del workers
    finally:
        receiver.stop()
    return result


def _delays(receiver: Receiver, store: Store, sids: list[str]) -> list[float]:
    arrived, ended = receiver.ended(), store.sessions(sids, ("endedAt",))
    return [arrived[s] - ended[s]["endedAt"].timestamp() for s in sids if s in arrived and ended[s].get("endedAt")]
