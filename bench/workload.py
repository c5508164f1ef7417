"""What the load parts share (load_tier, many_turns, streams): worker processes started in a chosen mode,
timed keep-alive HTTP from many threads, UI-like readers, a cancel of many sessions sent at once, the
sessions' end read straight from MongoDB, the store's command counters, and PSS from /proc.

Times that are compared across processes (a request sent here, a session's `endedAt` written by a worker)
are wall-clock times of the one machine: `time.time()` here, the product's UTC timestamps there (cut to the
millisecond, so a figure can read up to 1 ms low).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo
import pymongo.errors
import redis
import requests
from bson import ObjectId
from rq import Queue, Worker

from devtools.stack import Stack

from .harness import BenchError, stat_fields, wait_for
from .stats import summarize

# Limits out of the way: the request rate limits, and the fair share of the worker slots one team may hold
# (TEAM_MAX_ACTIVE_TURNS, 8 by default), since every session the bench starts is the demo team's.
NO_LIMITS = {
    "CANCEL_RATE_LIMIT": "1000000 per minute",
    "DEFAULT_RATE_LIMIT": "1000000 per minute",
    "TEAM_MAX_ACTIVE_TURNS": "10000",
}


# -- worker processes ---------------------------------------------------------------------------------------------


def start_workers(
    stack: Stack, count: int, mode: str, concurrency: int | None = None, timeout: float = 180
) -> list[subprocess.Popen[bytes]]:
    """`count` more `python -m workers` processes in `mode`, returned once all of them serve the turn queue."""
    stack.env["WORKER_MODE"] = mode
    if concurrency is not None:
        stack.env["TURN_CONCURRENCY"] = str(concurrency)
    connection = redis.Redis.from_url(stack.env["REDIS_URL"])
    queue = Queue(stack.env["TURN_QUEUE"], connection=connection)
    before = Worker.count(connection=connection, queue=queue)
    started = [stack.start_worker() for _ in range(count)]

    def serving() -> bool:
        for process in started:
            if process.poll() is not None:
                raise BenchError(f"a worker exited with {process.returncode}; see {stack.logs}")
        return Worker.count(connection=connection, queue=queue) >= before + count

    wait_for(serving, timeout, f"{count} {mode}-mode workers to serve the queue", every=0.25)
    connection.close()
    return started


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (fork mode's work horses, gunicorn's workers)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    pending += [int(child) for child in (task / "children").read_text().split()]
    return found


def pss_kib(pids: Sequence[int]) -> int:
    """Sum of the processes' proportional set size (PSS, /proc/<pid>/smaps_rollup), KiB; gone ones count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


def tree_pss_kib(roots: Sequence[int]) -> tuple[int, int]:
    """PSS of the roots and all their descendants (KiB), and how many processes that was."""
    pids = sorted({pid for root in roots for pid in process_tree(root)})
    return pss_kib(pids), len(pids)


def steady_tree_pss_kib(roots: Sequence[int], reads: int = 3, every: float = 0.3) -> tuple[int, int]:
    """The median of a few reads of `tree_pss_kib` (PSS moves a little as pages are touched)."""
    values = []
    for index in range(reads):
        values.append(tree_pss_kib(roots))
        if index < reads - 1:
            time.sleep(every)
    values.sort()
    return values[len(values) // 2]


def cpu_of_tree(roots: Sequence[int]) -> float:
    """User + system CPU seconds used so far by the roots and their live descendants, and by the children
    they have reaped (fork mode's finished work horses)."""
    total = 0
    for pid in {pid for root in roots for pid in process_tree(root)}:
        if fields := stat_fields(pid):
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / os.sysconf("SC_CLK_TCK")


def stop_processes(processes: Sequence[subprocess.Popen[bytes]], timeout: float = 15) -> None:
    """SIGTERM every process group at once, then SIGKILL what is left after `timeout` (Stack.stop goes one by one,
    which with many workers adds up)."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            Stack.kill(process)


# -- HTTP ------------------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One timed request: status (None on a socket error), JSON body ({} otherwise), when sent, how long."""

    status: int | None
    body: dict[str, Any]
    sent: float
    seconds: float
    error: str | None = None


class Client:
    """Keep-alive HTTP to one web instance with the demo user's API key: one connection per calling thread."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 60) -> None:
        self.base_url, self.api_key, self.timeout = base_url, api_key, timeout
        self._local = threading.local()
        # Answers `setup` waited out: 503s (the product failing fast while its store was too slow to answer),
        # and 409s of a retry whose first attempt was still in progress
        self.unavailable = 0
        self._lock = threading.Lock()

    def http(self) -> requests.Session:
        http = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = requests.Session()
            http.headers["Authorization"] = f"Bearer {self.api_key}"
        return http

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
        sent = time.time()
        started = time.perf_counter()
        try:
            response = self.http().request(
                method, self.base_url + path, json=body, headers=headers, timeout=self.timeout
            )
        except requests.RequestException as exc:
            return Answer(None, {}, sent, time.perf_counter() - started, f"{exc.__class__.__name__}: {exc}")
        seconds = time.perf_counter() - started
        try:
            data = response.json()
        except ValueError:
            data = {}
        return Answer(response.status_code, data if isinstance(data, dict) else {}, sent, seconds)

    def setup(
        self,
        method: str,
        path: str,
        body: Any = None,
        expect: int = 200,
        *,
        idempotent: bool = False,
        done_if_conflict: bool = False,
        wait: float = 60,
    ) -> Answer:
        """A request a part needs in order to take its figures, not one it measures: a 503 is sent again after
        a second, as the product's answer asks, for up to `wait` s (each counted in `unavailable`). A 503 can
        come after the write took (a reply that missed its deadline): with `idempotent` every attempt carries
        the same Idempotency-Key (and a 409, the first attempt still in progress, is waited out too), and with
        `done_if_conflict` a 409 after a 503 counts as done. BenchError for any other answer than `expect`."""
        headers = {"Idempotency-Key": f"bench-{uuid.uuid4().hex}"} if idempotent else None
        again = {503, 409} if idempotent else {503}
        deadline, refused = time.monotonic() + wait, False
        while True:
            answer = self.call(method, path, body, headers)
            if answer.status not in again or time.monotonic() >= deadline:
                break
            refused = True
            with self._lock:
                self.unavailable += 1
            time.sleep(1.0)
        if refused and done_if_conflict and answer.status == 409:
            return answer
        if answer.status != expect:
            raise BenchError(f"{method} {path} answered {answer.status}: {answer.body or answer.error}")
        return answer


def start_sessions(
    client: Client, team: str, app_id: str, count: int, message: str | None = "go", skip_run: bool = False
) -> list[str]:
    """`count` sessions of the app, each with a first message (so its turn is queued) unless `message` is None;
    with `skip_run` the message waits for `start_turns` (Agentcloud's skipRun)."""
    body: dict[str, Any] = {"appId": app_id}
    if message is not None:
        body["message"] = message
    if skip_run:
        body["skipRun"] = True

    def add(_: int) -> str:
        return str(client.setup("POST", f"/{team}/forms/session/add", body, idempotent=True).body["_id"])

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(add, range(count)))


def start_turns(client: Client, team: str, sids: Sequence[str], parallel: int = 16) -> float:
    """`POST .../forms/session/<sid>/start` for every session (created with `skip_run`), `parallel` at a time,
    so that all their turns are queued within a short while; returns how long that took."""
    from concurrent.futures import ThreadPoolExecutor

    def start(sid: str) -> None:
        client.setup("POST", f"/{team}/forms/session/{sid}/start", {}, done_if_conflict=True)

    began = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(start, sids))
    return time.monotonic() - began


class Every(threading.Thread):
    """Calls `action()` on a fixed schedule (every `period` s, from a random phase) until stopped, keeping each
    Answer; a slow answer delays the next call rather than piling calls up."""

    def __init__(self, period: float, action: Callable[[], Answer | None], name: str = "every") -> None:
        super().__init__(name=name, daemon=True)
        self.period, self.action = period, action
        self.answers: list[Answer] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic() + random.uniform(0, self.period)
        while not self.stopping.wait(max(0.0, next_at - time.monotonic())):
            answer = self.action()
            if answer is not None:
                self.answers.append(answer)
            next_at = max(next_at + self.period, time.monotonic())

    def stop(self) -> None:
        self.stopping.set()


class UiReader(Every):
    """What the session page does when it polls (static/session.js): `messages.json?after=<lastSeq>` every
    500 ms while the agent answers."""

    PERIOD = 0.5

    def __init__(self, client: Client, team: str, sid: str) -> None:
        self.client, self.path, self.last_seq = client, f"/{team}/session/{sid}/messages.json", 0
        super().__init__(self.PERIOD, self.poll, name=f"ui-reader-{sid}")

    def poll(self) -> Answer:
        answer = self.client.call("GET", f"{self.path}?after={self.last_seq}")
        if answer.status == 200:
            self.last_seq = int(answer.body.get("lastSeq") or self.last_seq)
        return answer


@contextlib.contextmanager
def running(threads: Sequence[Every]) -> Iterator[None]:
    """Start the loops, and stop and join them however the block ends."""
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.stop()
        for thread in threads:
            thread.join(30)


def latency_summary(answers: Sequence[Answer]) -> dict[str, Any]:
    """Latency (seconds) of the answered requests, with how many failed and how: each kind of failure (the
    status and the error's code, or the socket error) with how many answers had it and how long they took."""
    ok = [a.seconds for a in answers if a.status is not None and a.status < 400]
    failures: dict[str, list[float]] = {}
    for answer in answers:
        if answer.status is None or answer.status >= 400:
            kind = f"{answer.status} {answer.body.get('code', '')}".strip() if answer.status else str(answer.error)
            failures.setdefault(kind[:200], []).append(answer.seconds)
    why = {kind: {"n": len(took), "p50_s": summarize(took)["p50"]} for kind, took in failures.items()}
    return {**summarize(ok), "errors": len(answers) - len(ok), "failures": why}


# -- MongoDB, read by the bench itself ------------------------------------------------------------------------------


@dataclass
class Claimed:
    """How long until every turn was claimed; the sessions whose turn runs; those whose turn was already over
    (session → status, end reason and closing message)."""

    seconds: float
    running: list[str]
    over: dict[str, str]

    def figures(self) -> dict[str, Any]:
        """For the JSON: how many turns were not running when they all should have been, and why (a few)."""
        return {"not_running": len(self.over), "why": sorted(set(self.over.values()))[:3]}


class Store:
    """The stack's database, for what the bench reads in one query instead of one request per session: session
    states and the MongoDB-wire server's command counters."""

    def __init__(self, stack: Stack) -> None:
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(stack.env["MONGO_URI"], tz_aware=True)
        self.db = self.client.get_default_database()

    def sessions(self, sids: Sequence[str], fields: Sequence[str] = ("status", "endedAt", "cancelledAt")) -> dict:
        ids = [ObjectId(s) for s in sids]
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):
            for doc in self.db.sessions.find({"_id": {"$in": ids[start : start + 500]}}, dict.fromkeys(fields, 1)):
                found[str(doc["_id"])] = doc
        return found

    def first_deliveries(self, sids: Sequence[str], kind: str) -> dict[str, dict[str, Any]]:
        """Session → its first `kind` webhook delivery: when it was recorded (`createdAt`) and its first attempt
        began (`attempts[0].at`). Read once, after the fact (the query has no index of its own)."""
        found: dict[str, dict[str, Any]] = {}
        query = {"type": kind, "payload.data.sessionId": {"$in": list(sids)}}
        for doc in self.db.webhook_deliveries.find(query, {"payload.data.sessionId": 1, "createdAt": 1, "attempts": 1}):
            sid = doc["payload"]["data"]["sessionId"]
            if sid not in found or doc["createdAt"] < found[sid]["createdAt"]:
                found[sid] = doc
        return found

    def live(self, sids: Sequence[str]) -> list[str]:
        """The sessions that have not ended yet."""
        states = self.sessions(sids, ("endedAt",))
        return [sid for sid in sids if not states.get(sid, {}).get("endedAt")]

    def wait_claimed(self, sids: Sequence[str], timeout: float, every: float = 1.0) -> Claimed:
        """Until no session's turn is still queued: each one running or already over (a turn that failed, say;
        its status and closing message come back and the part goes on with the others), looking once every
        `every` s (one query each time: the bench's only load on the store meanwhile). BenchError after
        `timeout`, saying how the sessions stand, or when none runs."""
        started = time.monotonic()
        states: dict[str, dict[str, Any]] = {}

        def settled() -> bool:
            states.update(self.sessions(sids, ("status", "endReason")))
            return all(states.get(sid, {}).get("status") not in (None, "started") for sid in sids)

        def standing() -> str:
            seen: dict[str, int] = {}
            for doc in states.values():
                key = f"{doc.get('status')}/{doc.get('endReason')}"
                seen[key] = seen.get(key, 0) + 1
            return f"status/endReason of the sessions: {seen}"

        try:
            wait_for(settled, timeout, f"{len(sids)} turns to run", every=every)
        except BenchError as exc:
            raise BenchError(f"{exc}; {standing()}") from None
        running = [sid for sid in sids if states[sid].get("status") == "running"]
        over = [sid for sid in sids if states[sid].get("status") != "running"]
        why = self.why_ended(over)
        if not running:
            raise BenchError(f"no turn ran; {standing()}; {dict(list(why.items())[:3])}")
        failed = {sid: f"{states[sid].get('status')}, {why.get(sid, 'no closing event')}" for sid in over}
        return Claimed(time.monotonic() - started, running, failed)

    def probe(self, sid: str) -> Answer:
        """One timed `find_one` by `_id` from here: how long any client's round trip waits on the store now."""
        sent, started = time.time(), time.perf_counter()
        self.db.sessions.find_one({"_id": ObjectId(sid)}, {"status": 1})
        return Answer(200, {}, sent, time.perf_counter() - started)

    def why_ended(self, sids: Sequence[str]) -> dict[str, str]:
        """Session → its end reason and closing message, for the sessions among these that have ended."""
        ids = [ObjectId(s) for s in sids]
        found: dict[str, str] = {}
        for doc in self.db.session_events.find({"sessionId": {"$in": ids}, "type": "status"}):
            found[str(doc["sessionId"])] = f"{doc.get('endReason')}: {str(doc.get('message'))[:300]}"
        return found

    def interrupted_outputs(self, sids: Sequence[str]) -> dict[str, Any]:
        """Session → `createdAt` of its event marked interrupted: the cut-off output (a cancelled turn's last
        text), or its closing event when nothing was left to write (the transcript is append-only)."""
        found: dict[str, Any] = {}
        ids = [ObjectId(s) for s in sids]
        for start in range(0, len(ids), 500):
            query = {"sessionId": {"$in": ids[start : start + 500]}, "interrupted": True}
            for doc in self.db.session_events.find(query, {"sessionId": 1, "createdAt": 1, "type": 1}):
                if str(doc["sessionId"]) not in found or doc.get("type") == "output":
                    found[str(doc["sessionId"])] = doc["createdAt"]
        return found

    def commands(self) -> dict[str, int]:
        """The server's opcounters (serverStatus): insert, query, update, delete, getmore, command (see
        `commands_between`)."""
        counters = self.client.admin.command("serverStatus").get("opcounters") or {}
        return {key: int(value) for key, value in counters.items()}

    def profile(self, seconds: float, during: Callable[[], Any] | None = None) -> dict[str, Any]:
        """Where the store's time goes: its profiler (level 2: every command, with the time the server took)
        on the stack's database for `seconds` (or while `during()` runs), then the commands grouped by name and
        collection, most time first. The profiler itself adds about 15% to each command, so the parts take
        their figures outside these windows."""
        with contextlib.suppress(pymongo.errors.PyMongoError):
            self.db.command("profile", 0)
            self.db.drop_collection("system.profile")
        self.db.command("profile", 2)
        started = time.monotonic()
        try:
            if during is not None:
                during()
            else:
                time.sleep(seconds)
        finally:
            elapsed = time.monotonic() - started
            self.db.command("profile", 0)
        groups: dict[str, dict[str, float]] = {}
        for entry in self.db.system.profile.find({"op": "command"}, {"command": 1, "millis": 1}):
            command = entry.get("command") or {}
            name = next(iter(command), "?")
            key = f"{name} {command.get(name)}" if isinstance(command.get(name), str) else name
            if key.startswith(("profile", "serverStatus")):
                continue
            group = groups.setdefault(key, {"n": 0, "ms": 0.0})
            group["n"] += 1
            group["ms"] += float(entry.get("millis") or 0)
        total = sum(g["ms"] for g in groups.values())
        top = sorted(groups.items(), key=lambda item: -item[1]["ms"])
        return {
            "seconds": elapsed,
            "commands": sum(int(g["n"]) for g in groups.values()),
            "server_ms": total,
            "server_ms_per_s": total / elapsed if elapsed else None,
            "by_command": [
                {"command": key, "n": int(g["n"]), "ms": g["ms"], "mean_ms": g["ms"] / g["n"], "share": g["ms"] / total}
                for key, g in top[:12]
            ],
        }

    def close(self) -> None:
        self.client.close()


def commands_between(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, Any]:
    """What the MongoDB-wire server was asked meanwhile: each counter's increase, and the round trips (its
    `command` counter, which counts every command a client sends once: a find, a findAndModify, an insert; the
    other counters count documents and finds over again) in all and per second. Each reading of the counters
    is one round trip itself."""
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    trips = max(0, delta.get("command", 0) - 1)
    return {"by_kind": delta, "round_trips": trips, "per_s": trips / seconds if seconds else None}


# -- cancelling many sessions at once -------------------------------------------------------------------------------


@dataclass
class CancelAll:
    """A cancel of every session sent at once, one thread and keep-alive connection each, and how it ended."""

    sent: dict[str, float] = field(default_factory=dict)
    answers: dict[str, Answer] = field(default_factory=dict)
    first_sent: float = 0.0
    live_after: dict[str, int] = field(default_factory=dict)
    all_ended_after: float | None = None
    ended: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped: dict[str, Any] = field(default_factory=dict)
    notices_missing: list[str] = field(default_factory=list)

    def figures(self, target_p99: float) -> dict[str, Any]:
        """Cancel-to-end per session: the request sent here → the session's `endedAt` (what a user waits), and
        the stamp (`cancelledAt`) → `endedAt`; the answers' latency; how many never ended."""
        to_end, stamp_to_end, noticed, finish = [], [], [], []
        for sid, sent in self.sent.items():
            doc = self.ended.get(sid) or {}
            if doc.get("endedAt"):
                to_end.append(doc["endedAt"].timestamp() - sent)
                if doc.get("cancelledAt"):
                    stamp_to_end.append((doc["endedAt"] - doc["cancelledAt"]).total_seconds())
                    if sid in self.stopped:  # the runner was stopped and its last output written then
                        noticed.append((self.stopped[sid] - doc["cancelledAt"]).total_seconds())
                        finish.append((doc["endedAt"] - self.stopped[sid]).total_seconds())
        statuses: dict[str, int] = {}
        for doc in self.ended.values():
            statuses[str(doc.get("status"))] = statuses.get(str(doc.get("status")), 0) + 1
        summary = summarize(to_end)
        not_ended = len(self.sent) - len(to_end)
        return {
            "sessions": len(self.sent),
            "send_spread_s": max(self.sent.values()) - self.first_sent if self.sent else None,
            "cancel_to_end": summary,
            "stamp_to_end": summarize(stamp_to_end),
            # Split at the interrupted output's createdAt, where a stopped runner's last text was written.
            "noticed": summarize(noticed),
            "finish": summarize(finish),
            "request": latency_summary(list(self.answers.values())),
            "statuses": statuses,
            "live_after_s": self.live_after,
            "not_ended": not_ended,
            "all_ended_after_s": self.all_ended_after,
            # Ended, but their closing transcript notice (Redis) never reached this bench: live streams on
            # them learn of the end only at their next heartbeat.
            "closing_notices_missing": len(self.notices_missing),
            "target_p99_s": target_p99,
            "target_met": not_ended == 0 and summary["p99"] <= target_p99,
        }


class NoticeWatcher(threading.Thread):
    """Hears the product's transcript notices on Redis (`<REDIS_PREFIX>:session:<sid>`, published for every
    transcript write) and notes when each session's first event of each type was announced: the bench learns
    which turns have ended and which sessions have closed (their one `status` event) without adding a single
    query to the MongoDB-wire server it is measuring."""

    def __init__(self, stack: Stack, keep_events: bool = False) -> None:
        super().__init__(name="notice-watcher", daemon=True)
        self.connection = redis.Redis.from_url(stack.env["REDIS_URL"])
        self.prefix = f"{stack.env['REDIS_PREFIX']}:session:"
        self.seen: dict[str, dict[str, float]] = {}
        # (session, seq) → when its notice was heard here, with `keep_events`
        self.keep_events = keep_events
        self.heard: dict[tuple[str, int], float] = {}
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        import json

        pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe(self.prefix + "*")
        self.ready.set()
        while not self.stopping.is_set():
            message = pubsub.get_message(timeout=0.2)
            if not message or message.get("type") != "pmessage":
                continue
            received = time.time()
            sid = message["channel"].decode()[len(self.prefix) :]
            for event in json.loads(message["data"]).get("events") or []:
                self.seen.setdefault(str(event.get("type")), {}).setdefault(sid, received)
                if self.keep_events and "seq" in event:
                    self.heard.setdefault((sid, int(event["seq"])), received)
        pubsub.close()

    def __enter__(self) -> NoticeWatcher:
        self.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join(5)
        self.connection.close()

    @property
    def ended(self) -> dict[str, float]:
        """Session → when its closing `status` event was announced."""
        return self.seen.get("status", {})

    def live(self, sids: Sequence[str]) -> list[str]:
        """The sessions whose closing event has not been announced."""
        ended = self.ended
        return [sid for sid in sids if sid not in ended]

    def without(self, kind: str, sids: Sequence[str]) -> list[str]:
        """The sessions with no event of `kind` announced yet."""
        seen = self.seen.get(kind, {})
        return [sid for sid in sids if sid not in seen]


def cancel_all(
    client: Client,
    team: str,
    sids: Sequence[str],
    store: Store,
    ends: NoticeWatcher,
    *,
    look_at: Sequence[float] = (5.0,),
    wait: float = 60,
) -> CancelAll:
    """POST cancel for every session at the same moment (one thread each, connected beforehand); count the
    sessions not yet ended `look_at` seconds after the first was sent (from the transcript notices, so the
    count costs the store nothing), wait up to `wait` s for the rest, then read every session's end from
    MongoDB in one query."""
    result = CancelAll()
    barrier = threading.Barrier(len(sids) + 1)
    lock = threading.Lock()

    def one(sid: str) -> None:
        client.call("GET", "/healthz")  # this thread's connection is open before the barrier
        barrier.wait(120)
        answer = client.call("POST", f"/{team}/forms/session/{sid}/cancel", {"reason": "bench: cancel all"})
        with lock:
            result.sent[sid], result.answers[sid] = answer.sent, answer

    threads = [threading.Thread(target=one, args=(sid,), daemon=True) for sid in sids]
    for thread in threads:
        thread.start()
    barrier.wait(120)
    result.first_sent = time.time()
    looks = sorted(look_at)
    confirmed: set[str] = set()  # ended according to the store, though their closing notice has not come
    last_check = time.monotonic()

    def live() -> list[str]:
        return [sid for sid in ends.live(sids) if sid not in confirmed]

    while True:
        elapsed = time.time() - result.first_sent
        pending = live()
        # A closing notice can be lost (the notices are best effort): look in the store for the few still
        # missing, once the cancels are answered, at most every half second.
        if pending and len(pending) <= 50 and len(result.sent) == len(sids) and time.monotonic() - last_check > 0.5:
            last_check = time.monotonic()
            states = store.sessions(pending, ("endedAt",))
            confirmed.update(sid for sid in pending if states.get(sid, {}).get("endedAt"))
            pending = live()
        while looks and elapsed >= looks[0]:
            result.live_after[f"{looks.pop(0):g}"] = len(pending)
        if not pending:
            for look in looks:  # every session has ended: none is live at any later look
                result.live_after[f"{look:g}"] = 0
            break
        if elapsed >= wait:
            for look in looks:
                result.live_after[f"{look:g}"] = len(pending)
            break
        time.sleep(0.02)
    for thread in threads:
        thread.join(60)
    result.first_sent = min([result.first_sent, *result.sent.values()])
    time.sleep(1.0)  # closing notices still on their way
    result.ended = store.sessions(sids)
    ended_at = [doc["endedAt"].timestamp() for doc in result.ended.values() if doc.get("endedAt")]
    if len(ended_at) == len(sids):
        result.all_ended_after = max(ended_at) - result.first_sent
    result.notices_missing = [sid for sid in sids if sid not in ends.ended and result.ended.get(sid, {}).get("endedAt")]
    result.stopped = store.interrupted_outputs(sids)
    return result


# -- the store's own throughput ---------------------------------------------------------------------------------------


def store_capacity(mongo_url: str, seconds: float = 1.0, threads: int = 8) -> dict[str, Any]:
    """What the MongoDB-wire server does flat out, in a scratch database with the product's indexes
    (`agentcloud_clone.db.ensure_indexes`) and nothing else running:

    - `find_one` by `_id`, and the product's event append (`find_one_and_update` with `$inc` on a session, then
      `insert_one` of the event), each from one client (its service time) and from `threads` clients;
    - the cancel watcher's heartbeat (`update_many` of `heartbeatAt` on 50 running sessions, what one worker
      process with 50 turns sends every HEARTBEAT_INTERVAL) alone, and while `threads` clients append flat out,
      with the appends' rate meanwhile.

    The load parts' latencies are best read against these."""
    from datetime import UTC, datetime

    from agentcloud_clone.db import ensure_indexes

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url, maxPoolSize=threads + 8)
    db = client[f"bench_capacity_{ObjectId()}"]
    ensure_indexes(db)
    team = ObjectId()
    sessions = [ObjectId() for _ in range(max(threads, 50))]
    now = datetime.now(UTC)
    db.sessions.insert_many(
        [{"_id": sid, "teamId": team, "eventSeq": 0, "status": "running", "heartbeatAt": now} for sid in sessions]
    )

    def read(index: int) -> None:
        db.sessions.find_one({"_id": sessions[index], "teamId": team})

    def append(index: int) -> None:
        doc = db.sessions.find_one_and_update(
            {"_id": sessions[index], "teamId": team, "status": "running"},
            {"$inc": {"eventSeq": 1}},
            return_document=pymongo.ReturnDocument.AFTER,
        )
        db.session_events.insert_one(
            {"sessionId": sessions[index], "teamId": team, "seq": doc["eventSeq"], "type": "output", "text": "x"}
        )

    def heartbeat() -> float:
        started = time.perf_counter()
        db.sessions.update_many(
            {"_id": {"$in": sessions[:50]}, "teamId": team, "status": "running"},
            {"$set": {"heartbeatAt": datetime.now(UTC)}},
        )
        return time.perf_counter() - started

    def flat_out(op: Callable[[int], None], clients: int, beside: Callable[[], Any] | None = None) -> dict[str, Any]:
        counts = [0] * clients
        stop_at = time.monotonic() + seconds
        beats: list[float] = []

        def loop(index: int) -> None:
            while time.monotonic() < stop_at:
                op(index)
                counts[index] += 1

        def beat_loop() -> None:
            while time.monotonic() < stop_at:
                beats.append(heartbeat())

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
        if beside is not None:
            workers.append(threading.Thread(target=beat_loop))
        began = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.monotonic() - began
        done = sum(counts)
        out: dict[str, Any] = {
            "clients": clients,
            "ops": done,
            "per_s": done / elapsed,
            "ms_per_op": elapsed * 1000 * clients / max(1, done),
        }
        if beside is not None:
            out["heartbeat_ms"] = [round(b * 1000) for b in beats]
        return out

    try:
        alone = [heartbeat() for _ in range(3)]
        return {
            "seconds": seconds,
            "indexes": "the product's (agentcloud_clone.db.ensure_indexes)",
            "find_one": {"one_client": flat_out(read, 1), "many_clients": flat_out(read, threads)},
            "event_append": {"one_client": flat_out(append, 1), "many_clients": flat_out(append, threads)},
            "heartbeat_50": {
                "alone_ms": sorted(round(a * 1000) for a in alone)[1],
                "beside_appends": flat_out(append, threads, beside=heartbeat),
            },
        }
    finally:
        client.drop_database(db.name)
        client.close()
