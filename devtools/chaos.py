"""`python -m devtools.chaos` (`make chaos`): the product under random faults, then its invariants checked.

A workload of many sessions over both API families (start, stream, send, cancel, delete, read, at random) runs
against two web instances and two workers on their own redis-server and MongoDB-wire server, while a fault
injector kills (SIGKILL) or stops and resumes (SIGSTOP, SIGCONT) workers, web instances, redis-server and the
MongoDB-wire server at random moments; whatever is killed is restarted, as `make run` does. Then the faults
stop, the product is left to settle, and these must hold over the whole database:

- every session is live (its turns all finished: nothing left running or queued) or ended exactly once, with
  one closing `status` event, its last; no live session has one;
- every transcript's `seq` runs 1, 2, ... without a gap up to the last one its session reserved;
- `cancelledAt` never moved once set: every answer that showed it showed the same, and so does the database;
- no transcript event, Idempotency-Key record or queue entry is left without its session, and no deleted
  session lingers past its grace;
- an Idempotency-Key replay answered with the session the key first created;
- no response was a 500 (or any 5xx but 503);
- every cancel acknowledged with a 200 ended its session within its bound once the faults had stopped.

The seed decides the workload's choices and the fault schedule (not the timing of the machine), and is printed
first, so a failing run can be repeated: `CHAOS_SEED=<seed> make chaos`. Exit status 1 when an invariant failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pymongo
import redis as redis_client
import requests
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue

from .servers import ManagedProcess, free_port, start_mongo, start_redis
from .stack import Stack

# Short intervals, so a run of a minute sees every mechanism at work: lost turns reaped, lost jobs queued again,
# tombstones purged, stale keys and unsettled writes swept.
SETTINGS: dict[str, Any] = {
    "CANCEL_POLL_INTERVAL": 0.5,
    "HEARTBEAT_INTERVAL": 1,
    "HEARTBEAT_TIMEOUT": 6,
    "REAPER_INTERVAL": 1,
    "REQUEUE_AFTER": 4,
    "TOMBSTONE_GRACE": 5,
    "REPAIR_SETTLE": 2,
    "IDEMPOTENCY_STALE_AFTER": 8,
    "SSE_HEARTBEAT": 1,
    "REQUIRE_WORKERS": "false",
    "CANCEL_RATE_LIMIT": "1000000 per minute",
    "DEFAULT_RATE_LIMIT": "1000000 per minute",
    "LOG_LEVEL": "WARNING",
}
# Once the faults stop, a cancelled session ends within this: its worker sees the stamp within a poll, or the
# worker is gone and the reaper ends it after HEARTBEAT_TIMEOUT (plus a pass, plus a loaded machine's slack).
# Settling after the faults: done when nothing is left to do; stuck when nothing moves for STALL_AFTER.
STALL_AFTER = 60.0
SETTLE_CAP = 1200.0
CANCEL_BOUND = SETTINGS["HEARTBEAT_TIMEOUT"] + 3 * SETTINGS["REAPER_INTERVAL"] + 10
APPS = {
    "short": {"steps": 10, "stepDelay": 0.05},
    "long": {"steps": 60, "stepDelay": 0.05},
    "ending": {"steps": 8, "stepDelay": 0.05, "endAfterTurns": 2},
}
REQUEST_TIMEOUT = 8.0  # longer than any stop, so a stopped instance answers once it resumes
ENDED = ("terminated", "error")


def log(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


# -- what faults are done to ----------------------------------------------------------------------------------


class Target:
    """One process the injector may kill or stop; restarted by the supervisor when it dies."""

    kind = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopped = False  # SIGSTOPped now
        self.restarting = False
        self.lock = threading.Lock()

    def pid(self) -> int | None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def signal(self, signum: int) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError


class ServerTarget(Target):
    def __init__(self, name: str, kind: str, server: ManagedProcess) -> None:
        super().__init__(name)
        self.kind, self.server = kind, server

    def pid(self) -> int | None:
        return self.server.pid

    def alive(self) -> bool:
        return self.server.is_running()

    def signal(self, signum: int) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self) -> None:
        self.server.kill()

    def restart(self) -> None:
        self.server.restart()


class ChildTarget(Target):
    """A web instance or a worker: a process group of its own (gunicorn's master and workers go together)."""

    def __init__(self, name: str, kind: str, spawn: Callable[[], subprocess.Popen[bytes]],
                 ready: Callable[[subprocess.Popen[bytes]], None]) -> None:  # fmt: skip
        super().__init__(name)
        self.kind, self.spawn, self.ready = kind, spawn, ready
        self.process = spawn()
        ready(self.process)

    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def restart(self) -> None:
        self.signal(signal.SIGKILL)  # whatever is left of the group
        process = self.spawn()
        self.process = process
        self.ready(process)


# -- the workload's record --------------------------------------------------------------------------------------


@dataclass
class Seen:
    """What the workload learnt of one session."""

    family: str
    created: float
    deleted_at: float | None = None  # wall-clock seconds of a 200 to a delete
    delete_tried: float | None = None  # of the last delete sent, answered or not (a 503 may have deleted it)
    cancel_acks: list[float] = field(default_factory=list)  # wall-clock seconds of 200s to cancels
    cancelled_at: set[str] = field(default_factory=set)  # every cancelledAt an answer showed


@dataclass
class Record:
    sessions: dict[str, Seen] = field(default_factory=dict)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    by_action: collections.Counter[str] = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)
    no_answer: int = 0
    replays: dict[str, set[str]] = field(default_factory=dict)  # Idempotency-Key → session ids answered
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, action: str, response: requests.Response | None) -> None:
        with self.lock:
            self.by_action[action] += 1
            if response is None:
                self.no_answer += 1
                return
            self.statuses[str(response.status_code)] += 1
            if response.status_code >= 500 and response.status_code != 503:
                self.server_errors.append(f"{action}: {response.status_code} {response.text[:300]}")

    def live_ids(self) -> list[str]:
        with self.lock:
            return [sid for sid, seen in self.sessions.items() if seen.deleted_at is None]


def _cancelled_at(body: Any) -> str | None:
    if isinstance(body, dict):
        for found in (body.get("cancelledAt"), (body.get("session") or {}).get("cancelledAt")):
            if found:
                return str(found)
    return None


class Client(threading.Thread):
    """One user of the product: picks an action at random, does it over HTTP, notes what it saw."""

    WEIGHTS: ClassVar[dict[str, int]] = {
        "create": 3,
        "create_managed": 2,
        "send": 3,
        "cancel": 3,
        "delete": 2,
        "read": 3,
        "messages": 2,
        "list": 1,
        "stream": 1,
    }

    def __init__(self, number: int, seed: int, chaos: Chaos) -> None:
        super().__init__(name=f"client-{number}", daemon=True)
        self.rng = random.Random(seed)
        self.chaos, self.record = chaos, chaos.record
        self.http = requests.Session()
        self.http.trust_env = False
        self.team = chaos.stack.demo["teamId"]
        self.headers = {"Authorization": f"Bearer {chaos.stack.demo['apiKey']}"}

    def run(self) -> None:
        actions, weights = zip(*self.WEIGHTS.items(), strict=True)
        while not self.chaos.workload_over.is_set():
            action = self.rng.choices(actions, weights)[0]
            try:
                getattr(self, action)()
            except Exception as exc:  # a bug in the workload must not pass for a quiet product
                log(f"{self.name}: {action} failed in the workload itself: {exc!r}")
                self.chaos.workload_errors.append(f"{action}: {exc!r}")
            self.chaos.workload_over.wait(self.rng.uniform(0.02, 0.15))

    def _call(self, action: str, method: str, path: str, body: Any = None, **kwargs: Any) -> requests.Response | None:
        url = self.rng.choice(self.chaos.web_urls)
        headers = {**self.headers, **kwargs.pop("headers", {})}
        try:
            response = self.http.request(method, url + path, json=body, headers=headers, timeout=REQUEST_TIMEOUT,
                                         **kwargs)  # fmt: skip
        except requests.RequestException:
            response = None
        self.record.answer(action, response)
        return response

    def _pick(self) -> str | None:
        live = self.record.live_ids()
        return self.rng.choice(live[-40:]) if live else None  # mostly recent sessions: they are the busy ones

    def _note(self, sid: str, family: str) -> None:
        with self.record.lock:
            self.record.sessions.setdefault(sid, Seen(family, time.time()))

    def _saw(self, sid: str, response: requests.Response | None) -> None:
        if response is None or response.status_code != 200:
            return
        with contextlib.suppress(ValueError):
            stamp = _cancelled_at(response.json())
            if stamp:
                with self.record.lock:
                    if sid in self.record.sessions:
                        self.record.sessions[sid].cancelled_at.add(stamp)

    def _app(self) -> str:
        return self.chaos.apps[self.rng.choice(list(self.chaos.apps))]

    def create(self) -> None:
        body = {"appId": self._app(), "message": f"hello {uuid.uuid4().hex[:6]}"}
        key = uuid.uuid4().hex if self.rng.random() < 0.4 else None
        headers = {"Idempotency-Key": key} if key else {}
        for _ in range(2 if key and self.rng.random() < 0.5 else 1):  # a client retrying with its key
            response = self._call("create", "POST", f"/{self.team}/forms/session/add", body, headers=headers)
            if response is not None and response.status_code == 200:
                sid = response.json()["_id"]
                self._note(sid, "agentcloud")
                if key:
                    with self.record.lock:
                        self.record.replays.setdefault(key, set()).add(sid)

    def create_managed(self) -> None:
        body = {"appId": self._app(), "message": "hi"}
        response = self._call("create", "POST", "/api/managed-agents/sessions", body)
        if response is not None and response.status_code == 201:
            self._note(response.json()["session"]["_id"], "managed")

    def send(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        on_busy = self.rng.choice(["reject", "enqueue", "interrupt"])
        if self.rng.random() < 0.5:
            self._call(
                "send", "POST", f"/{self.team}/session/{sid}/send-message", {"message": "more", "onBusy": on_busy}
            )
        else:
            path = f"/api/managed-agents/sessions/{sid}/messages"
            self._call("send", "POST", path, {"message": "more", "onBusy": on_busy})

    def cancel(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        if self.rng.random() < 0.5:
            response = self._call("cancel", "POST", f"/{self.team}/forms/session/{sid}/cancel")
        else:
            response = self._call("cancel", "POST", "/api/managed-agents/cancel", {"sessionId": sid})
        if response is not None and response.status_code == 200:
            with self.record.lock:
                self.record.sessions[sid].cancel_acks.append(time.time())
            self._saw(sid, response)

    def delete(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        with self.record.lock:
            self.record.sessions[sid].delete_tried = time.time()
        if self.rng.random() < 0.5:
            response = self._call("delete", "DELETE", f"/{self.team}/forms/session/{sid}")
        else:
            response = self._call("delete", "DELETE", f"/api/managed-agents/sessions/{sid}")
        if response is not None and response.status_code == 200:
            with self.record.lock:
                self.record.sessions[sid].deleted_at = time.time()

    def read(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        if self.rng.random() < 0.5:
            self._saw(sid, self._call("read", "GET", f"/{self.team}/session/{sid}.json"))
        else:
            self._saw(sid, self._call("read", "GET", f"/api/managed-agents/sessions/{sid}"))

    def messages(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        if self.rng.random() < 0.5:
            self._call("messages", "GET", f"/{self.team}/session/{sid}/messages.json")
        else:
            self._call("messages", "GET", f"/api/managed-agents/sessions/{sid}/events")

    def list(self) -> None:
        if self.rng.random() < 0.5:
            self._call("list", "GET", f"/{self.team}/sessions.json")
        else:
            self._call("list", "GET", "/api/managed-agents/sessions")

    def stream(self) -> None:
        sid = self._pick()
        if sid is None:
            return
        path = f"/{self.team}/session/{sid}/events" if self.rng.random() < 0.5 else (
            f"/api/managed-agents/sessions/{sid}/stream")  # fmt: skip
        response = self._call("stream", "GET", path, stream=True)
        if response is None:
            return
        with contextlib.suppress(requests.RequestException, ValueError), response:
            until = time.monotonic() + self.rng.uniform(0.2, 1.5)
            for _ in response.iter_lines():
                if time.monotonic() > until:
                    break


# -- the run ----------------------------------------------------------------------------------------------------


@dataclass
class Fault:
    at: float
    target: str
    action: str
    seconds: float = 0.0


class Chaos:
    """Servers, a Stack, the supervisor, the injector and the workload for one run."""

    def __init__(self, seed: int, duration: float, *, webs: int = 2, workers: int = 2, clients: int = 6,
                 data_dir: str | None = None) -> None:  # fmt: skip
        self.seed, self.duration = seed, duration
        self.webs, self.workers, self.clients = webs, workers, clients
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="chaos-"))
        self.record = Record()
        self.faults: list[Fault] = []
        self.workload_errors: list[str] = []
        self.workload_over = threading.Event()
        self.faults_over = threading.Event()
        self.done = threading.Event()
        self.targets: list[Target] = []
        self.web_urls: list[str] = []
        self.apps: dict[str, str] = {}
        self.stack: Stack

    # ---- set-up and supervision

    def start(self) -> None:
        mongo = start_mongo(data_dir=str(self.data_dir / "mongo"))
        redis = start_redis(data_dir=str(self.data_dir / "redis"))
        self.mongo, self.redis = mongo, redis
        self.targets += [ServerTarget("mongo", "mongo", mongo), ServerTarget("redis", "redis", redis)]
        self.stack = Stack(mongo.url, redis.url, **SETTINGS)
        self.stack.demo = self.stack.cli("seed-demo")
        team = self.stack.demo["teamId"]
        for name, config in APPS.items():
            self.apps[name] = self.stack.cli("apps", "create", team, "--name", name, "--config", json.dumps(config))[
                "appId"
            ]
        for number in range(self.webs):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            self.web_urls.append(url)
            self.targets.append(
                ChildTarget(
                    f"web-{number}",
                    "web",
                    lambda port=port: self.stack.spawn_web(port),
                    lambda process, url=url: self.stack.wait_for_web(process, url, 60),
                )
            )
        for number in range(self.workers):
            self.targets.append(
                ChildTarget(
                    f"worker-{number}",
                    "worker",
                    lambda n=number: self.stack.spawn_worker(f"worker-{n}.log"),
                    lambda process: None,
                )
            )
        threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()

    def _supervise(self) -> None:
        while not self.done.is_set():
            for target in self.targets:
                with target.lock:
                    due = not target.stopped and not target.restarting and not target.alive()
                    if due:
                        target.restarting = True
                if due:
                    threading.Thread(target=self._restart, args=(target,), daemon=True).start()
            self.done.wait(0.2)

    def _restart(self, target: Target) -> None:
        delay = 1.0  # as make run does
        while not self.done.is_set():
            self.done.wait(delay)
            try:
                target.restart()
                break
            except (RuntimeError, OSError) as exc:
                log(f"{target.name} did not restart ({str(exc).splitlines()[0]}); trying again")
                delay = min(delay * 2, 5.0)
        with target.lock:
            target.restarting = False

    # ---- faults

    def _inject(self, rng: random.Random) -> None:
        began = time.monotonic()
        kinds = {"worker": 3, "web": 2, "redis": 2, "mongo": 2}
        while not self.faults_over.is_set():
            if self.faults_over.wait(min(max(rng.expovariate(1 / 2.0), 0.3), 6.0)):
                break
            kind = rng.choices(list(kinds), list(kinds.values()))[0]
            target = rng.choice([t for t in self.targets if t.kind == kind])
            kill = rng.random() < 0.35
            seconds = round(rng.uniform(0.5, 4.0), 2)
            with target.lock:
                busy = target.stopped or target.restarting or not target.alive()
                faulted = sum(1 for t in self.targets if t.stopped or t.restarting)
                if busy or faulted >= 2:
                    continue  # the draw is spent either way, so the schedule stays the seed's
                if kill:
                    target.kill()
                else:
                    target.signal(signal.SIGSTOP)
                    target.stopped = True
            at = round(time.monotonic() - began, 2)
            self.faults.append(Fault(at, target.name, "kill -9" if kill else "stop", 0.0 if kill else seconds))
            if not kill:
                threading.Timer(seconds, self._resume, args=(target,)).start()

    def _resume(self, target: Target) -> None:
        with target.lock:
            if target.stopped:
                target.signal(signal.SIGCONT)
                target.stopped = False

    # ---- the run

    def run(self) -> dict[str, Any]:
        log(f"seed {self.seed} (CHAOS_SEED={self.seed} make chaos repeats this run's choices), {self.duration:g} s")
        started = time.monotonic()
        self.start()
        log(f"started in {time.monotonic() - started:.1f} s: {', '.join(t.name for t in self.targets)}; "
            f"logs in {self.stack.logs}")  # fmt: skip
        clients = [Client(n, self.seed * 1000 + n, self) for n in range(self.clients)]
        for client in clients:
            client.start()
        injector = threading.Thread(target=self._inject, args=(random.Random(self.seed),), daemon=True)
        injector.start()
        self.faults_over.wait(self.duration)
        self.faults_over.set()
        self.workload_over.set()
        injector.join(10)
        for target in self.targets:
            self._resume(target)
        for client in clients:
            client.join(REQUEST_TIMEOUT + 5)
        faults_end = time.time()
        log(f"faults stopped after {len(self.faults)} faults; letting the product settle")
        settled = self._settle(faults_end)
        report = self._check(faults_end, settled)
        report["duration_s"] = round(self.duration, 1)
        report["wall_s"] = round(time.monotonic() - started, 1)
        return report

    def stop(self) -> None:
        self.faults_over.set()
        self.workload_over.set()
        self.done.set()
        for target in self.targets:
            target.signal(signal.SIGCONT)
        with contextlib.suppress(Exception):
            self.stack.stop()
        for target in self.targets:
            if isinstance(target, ChildTarget):
                target.signal(signal.SIGKILL)
        for server in (getattr(self, "mongo", None), getattr(self, "redis", None)):
            if server is not None:
                server.stop()

    # ---- settling and checking

    def _db(self) -> Any:
        uri = self.stack.env["MONGO_URI"]
        client: Any = pymongo.MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=20000, socketTimeoutMS=60000)
        return client[uri.rsplit("/", 1)[1]]

    def _pending(self, db: Any) -> dict[str, int]:
        """What the product has still to do: turns running or queued, tombstones to purge, cancels to finish,
        transcript writes to repair."""
        live = {"status": {"$nin": list(ENDED)}, "deletedAt": {"$exists": False}}
        busy = db.sessions.count_documents({**live, "$or": [{"status": "running"}, {"activeTurnId": {"$ne": None}}]})
        stamped = db.sessions.count_documents({**live, "cancelledAt": {"$exists": True}})
        pending = {
            "busy": busy,
            "cancelling": stamped,
            "tombstones": db.sessions.count_documents({"deletedAt": {"$exists": True}}),
        }
        # Last, and only once the rest is done: it reads every stored event (tens of thousands after a long run).
        pending["unwritten"] = 0 if any(pending.values()) else self._unwritten(db)
        return pending

    @staticmethod
    def _unwritten(db: Any) -> int:
        """Sessions with fewer transcript events stored than `seq`s reserved: writes whose writer died between
        its two writes, which the reaper's repair stores (or stands in for) once they have settled."""
        stored = {row["_id"]: row["n"] for row in db.session_events.aggregate(
            [{"$group": {"_id": "$sessionId", "n": {"$sum": 1}}}]
        )}  # fmt: skip
        live = db.sessions.find({"deletedAt": {"$exists": False}}, {"eventSeq": 1})
        return sum(1 for doc in live if stored.get(doc["_id"], 0) < int(doc.get("eventSeq") or 0))

    def _busy_sample(self, db: Any) -> list[dict[str, Any]]:
        """A few sessions still busy, with their turn's job as RQ has it (what a slow settle is waiting for)."""
        from rq.job import Job

        found = []
        query = {"status": {"$nin": list(ENDED)}, "deletedAt": {"$exists": False},
                 "$or": [{"status": "running"}, {"activeTurnId": {"$ne": None}}]}  # fmt: skip
        fields = {"status": 1, "activeTurnId": 1, "turnQueuedAt": 1, "heartbeatAt": 1, "cancelledAt": 1}
        connection = redis_client.Redis.from_url(self.redis.url)
        for doc in db.sessions.find(query, fields).limit(3):
            try:
                job = Job.fetch(f"turn-{doc.get('activeTurnId')}", connection=connection)
                doc["job"] = (job.get_status(), job.worker_name)
                if job.rate_limit_key:  # waiting for a team slot: who holds the slots
                    doc["slots"] = self._slot_holders(connection, job.rate_limit_key)
            except Exception as exc:
                doc["job"] = repr(exc)[:80]
            found.append({k: str(v) for k, v in doc.items()})
        return found

    @staticmethod
    def _slot_holders(connection: Any, key: str) -> list[tuple[str, str]]:
        """The jobs holding a team's turn slots, with their status as RQ has it."""
        from rq.job import Job
        from rq.rate_limit import RateLimitRegistry

        registry = RateLimitRegistry(key, connection=connection)
        holders = registry.get_allowed_job_ids()
        statuses = [connection.hget(Job.key_for(job_id), "status") for job_id in holders]
        return [(job_id, (status or b"missing").decode()) for job_id, status in zip(holders, statuses, strict=True)]

    def _settle(self, faults_end: float) -> dict[str, Any]:
        """Wait until nothing is left to do. A long run leaves a backlog of turns that takes as long as it takes
        (one team's turns hold at most TEAM_MAX_ACTIVE_TURNS slots): settling fails only when nothing moves for
        STALL_AFTER seconds, or after SETTLE_CAP in all."""
        deadline = time.monotonic() + SETTLE_CAP
        while time.monotonic() < deadline and not all(t.alive() for t in self.targets):
            time.sleep(0.2)
        db = self._db()
        pending: dict[str, int] = {}
        reported = moved = time.monotonic()
        while time.monotonic() < min(deadline, moved + STALL_AFTER):
            with contextlib.suppress(pymongo.errors.PyMongoError):
                now = self._pending(db)
                if now != pending:
                    moved = time.monotonic()
                pending = now
                if not any(pending.values()):
                    break
            if time.monotonic() - reported > 10:
                log(f"still settling: {pending}; for instance {self._busy_sample(db)}")
                reported = time.monotonic()
            time.sleep(0.5)
        # The reaper's sweeps look at writes settled for REPAIR_SETTLE, every REAPER_INTERVAL: let a few run.
        time.sleep(SETTINGS["REPAIR_SETTLE"] + 4 * SETTINGS["REAPER_INTERVAL"])
        return {
            "settled_s": round(time.time() - faults_end, 1),
            "still_pending": {k: v for k, v in pending.items() if v},
        }

    def _swept(self) -> dict[str, float]:
        with contextlib.suppress(requests.RequestException):
            text = requests.get(f"{self.web_urls[0]}/metrics", timeout=10).text
            for family in text_string_to_metric_families(text):
                if family.name == "agentcloud_reaper_swept":
                    return {s.labels["kind"]: s.value for s in family.samples if s.name.endswith("_total")}
        return {}

    def _check(self, faults_end: float, settled: dict[str, Any]) -> dict[str, Any]:
        db = self._db()
        violations: list[str] = []
        if settled["still_pending"]:
            violations.append(
                f"the product did not settle (nothing moved for {STALL_AFTER:g} s, or {SETTLE_CAP:g} s in all):"
                f" {settled['still_pending']}"
            )
        sessions = {doc["_id"]: doc for doc in db.sessions.find({}, {"pendingEvents": 0})}
        events: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
        for event in db.session_events.find({}, {"sessionId": 1, "seq": 1, "type": 1, "status": 1}).sort("seq", 1):
            events[event["sessionId"]].append(event)
        now = datetime.now(UTC)
        for sid, doc in sessions.items():
            if doc.get("deletedAt"):
                if doc["deletedAt"] < now - timedelta(seconds=SETTINGS["TOMBSTONE_GRACE"] + 10):
                    violations.append(f"session {sid}: deleted {doc['deletedAt']} and never purged")
                continue
            found = events.get(sid, [])
            seqs = [e["seq"] for e in found]
            if seqs != list(range(1, int(doc.get("eventSeq", 0)) + 1)):
                violations.append(f"session {sid}: seq {seqs[:50]} for eventSeq {doc.get('eventSeq')}")
            closing = [e for e in found if e["type"] == "status"]
            if doc["status"] in ENDED:
                if len(closing) != 1 or found[-1]["type"] != "status" or closing[0].get("status") != doc["status"]:
                    violations.append(f"session {sid}: ended {doc['status']} with closing events {closing}")
                if not doc.get("endedAt"):
                    violations.append(f"session {sid}: ended with no endedAt")
            else:
                if closing:
                    violations.append(f"session {sid}: live ({doc['status']}) with closing events {closing}")
                if doc["status"] == "running" and (doc.get("heartbeatAt") or now) < now - timedelta(
                    seconds=SETTINGS["HEARTBEAT_TIMEOUT"]
                ):
                    violations.append(f"session {sid}: running with a stale heartbeat {doc.get('heartbeatAt')}")
        existing = {sid for sid, doc in sessions.items() if not doc.get("deletedAt")}
        orphans = collections.Counter(str(sid) for sid in events if sid not in existing)
        if orphans:
            violations.append(f"{sum(orphans.values())} transcript events of {len(orphans)} missing sessions")
        for key in db.idempotency_keys.find({}):
            if key.get("sessionId") is not None and key["sessionId"] not in existing:
                violations.append(f"Idempotency-Key {key['key']}: its session {key['sessionId']} is gone")
            elif key.get("sessionId") is None and key.get("result") is None:
                violations.append(f"Idempotency-Key {key['key']}: a request that never finished, left behind")
        queue = Queue(self.stack.env["TURN_QUEUE"], connection=redis_client.Redis.from_url(self.redis.url))
        for job_id in queue.get_job_ids():
            turn = job_id.removeprefix("turn-")
            if not any(str(d.get("activeTurnId")) == turn and d["status"] not in ENDED and d["_id"] in existing
                       for d in sessions.values()):  # fmt: skip
                violations.append(f"queue entry {job_id} without a live session running that turn")
        violations += [f"a {error}" for error in self.record.server_errors]
        for key, answered in self.record.replays.items():
            if len(answered) > 1:
                violations.append(f"Idempotency-Key {key} answered with {len(answered)} different sessions")
        acknowledged = 0
        for sid_text, seen in self.record.sessions.items():
            doc = sessions.get(pymongo_object_id(sid_text))
            if (doc is None or doc.get("deletedAt")) and seen.delete_tried is None:
                violations.append(f"session {sid_text}: answered as created, and gone with no delete asked for")
            stamps = set(seen.cancelled_at)
            if doc is not None and doc.get("cancelledAt") is not None and stamps:
                stamps.add(_iso(doc["cancelledAt"]))
            if len({_iso_key(s) for s in stamps}) > 1:
                violations.append(f"session {sid_text}: cancelledAt moved: {sorted(stamps)}")
            if not seen.cancel_acks:
                continue
            acknowledged += 1
            bound = max(min(seen.cancel_acks), faults_end) + CANCEL_BOUND
            if seen.deleted_at is not None:
                ended = seen.deleted_at
            elif doc is not None and doc["status"] in ENDED and doc.get("endedAt"):
                ended = doc["endedAt"].timestamp()
            elif doc is None and seen.delete_tried is not None:
                # Deleted by a request whose answer was lost (a 503 or no answer): it had ended by then.
                ended = min(seen.delete_tried + REQUEST_TIMEOUT, bound)
            else:
                violations.append(f"session {sid_text}: a cancel was acknowledged and it never ended")
                continue
            if ended > bound:
                violations.append(f"session {sid_text}: ended {ended - bound:.1f} s past its cancel's bound")
        kinds = collections.Counter(f"{f.action} {f.target.split('-')[0]}" for f in self.faults)
        return {
            "seed": self.seed,
            "faults": dict(sorted(kinds.items())),
            "faults_total": len(self.faults),
            "fault_log": [vars(f) for f in self.faults],
            "sessions": {
                "created": len(self.record.sessions),
                "deleted": sum(1 for s in self.record.sessions.values() if s.deleted_at is not None),
                "in_database": len(existing),
                "ended": sum(1 for s in sessions.values() if s["status"] in ENDED and not s.get("deletedAt")),
                "transcript_events": sum(len(found) for found in events.values()),
            },
            "requests": {
                "answered": sum(self.record.statuses.values()),
                "unanswered": self.record.no_answer,
                "by_status": dict(sorted(self.record.statuses.items())),
                "by_action": dict(sorted(self.record.by_action.items())),
            },
            "cancels_acknowledged": acknowledged,
            "swept_by_the_reaper": self._swept(),
            "settle": settled,
            "workload_errors": self.workload_errors[:20],
            "violations": violations,
        }


def pymongo_object_id(text: str) -> Any:
    from bson import ObjectId

    return ObjectId(text) if ObjectId.is_valid(text) else text


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _iso_key(text: str) -> str:
    """A timestamp as it compares: to the millisecond, in UTC (MongoDB keeps milliseconds)."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat(timespec="milliseconds")


@contextlib.contextmanager
def chaos_run(seed: int, duration: float, **options: Any) -> Iterator[Chaos]:
    """A Chaos whose processes are all stopped afterwards."""
    chaos = Chaos(seed, duration, **options)
    try:
        yield chaos
    finally:
        chaos.stop()


def summary(report: dict[str, Any]) -> str:
    """The report in a few lines."""
    lines = [
        f"seed {report['seed']}: {report['duration_s']:g} s of faults ({report['wall_s']:g} s in all)",
        f"faults injected: {report['faults_total']} ({', '.join(f'{k} {v}' for k, v in report['faults'].items())})",
        f"sessions: {report['sessions']}",
        f"requests: {report['requests']['answered']} answered ({report['requests']['by_status']}), "
        f"{report['requests']['unanswered']} unanswered (instance killed or stopped)",
        f"cancels acknowledged: {report['cancels_acknowledged']}; swept by the reaper: {report['swept_by_the_reaper']}",
        f"settled {report['settle']['settled_s']} s after the faults stopped",
        f"invariant violations: {len(report['violations'])}",
    ]
    lines += [f"  - {v}" for v in report["violations"][:50]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=float(os.environ.get("CHAOS_SECONDS") or 180))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED") or random.randrange(1, 10**6)))
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--json", help="write the full report to this file")
    args = parser.parse_args(argv)
    with chaos_run(args.seed, args.duration, clients=args.clients) as chaos:
        report = chaos.run()
    print(summary(report), flush=True)
    if report["violations"]:
        log(f"the servers' data is kept in {chaos.data_dir}, the processes' logs in {chaos.stack.logs}")
    else:
        shutil.rmtree(chaos.data_dir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
