"""Driving a Stack for the benchmarks: start and stop it, start sessions, wait for states, read metrics."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from devtools.servers import start_mongo, start_redis
from devtools.stack import Stack

# A scripted turn that streams for longer than any benchmark waits (the app schema caps `steps` at 10,000).
LONG_TURN = {"steps": 10_000, "stepDelay": 0.05}


class BenchError(RuntimeError):
    """The product did not do what a benchmark needs (so the figure cannot be taken)."""


@dataclass
class Servers:
    """One part's own servers: where they answer, the store's process id and what kind of store it is, and the
    settings every stack of the part gets on them (`--mongo-timeout`, say)."""

    mongo_url: str
    mongo_pid: int | None
    redis_url: str
    store: str
    settings: dict[str, str] = field(default_factory=dict)

    def stack(self, **settings: Any) -> contextlib.AbstractContextManager[Stack]:
        """A started stack on these servers with one web instance and no workers (the part starts its own)."""
        return running_stack(self.mongo_url, self.redis_url, webs=1, workers=0, **{**self.settings, **settings})


@contextlib.contextmanager
def part_servers(on_disk: bool, settings: dict[str, str] | None = None) -> Iterator[Servers]:
    """A redis-server and a MongoDB-wire server (devtools.servers, as `make run` starts them) of one part's own,
    on free loopback ports: on disk in a temp dir of their own (`make run`'s store: the corrected SQLite engine),
    or in memory; both stopped, and the dir removed, however the part ends."""
    directory = tempfile.mkdtemp(prefix="bench-store-") if on_disk else None
    try:
        with start_redis() as redis_server, start_mongo(data_dir=directory) as mongo_server:
            store = "embedded (make run's: corrected SQLite engine, on disk)" if on_disk else "embedded, in memory"
            yield Servers(mongo_server.url, mongo_server.pid, redis_server.url, store, dict(settings or {}))
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def running_stack(mongo_url: str, redis_url: str, webs: int, workers: int, **settings: Any) -> Iterator[Stack]:
    """A started Stack that is always stopped afterwards."""
    stack = Stack(mongo_url, redis_url, **settings)
    try:
        yield stack.start(webs=webs, workers=workers)
    finally:
        stack.stop()


def wait_for[T](predicate: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def parse_time(value: str) -> datetime:
    """An API timestamp (ISO 8601 with offset)."""
    return datetime.fromisoformat(value)


def create_long_app(stack: Stack) -> str:
    """An app in the demo team whose turns stream until cancelled."""
    return stack.cli("apps", "create", stack.demo["teamId"], "--name", "bench", "--config", json.dumps(LONG_TURN))[
        "appId"
    ]


def session(stack: Stack, sid: str, url: str | None = None) -> dict[str, Any]:
    """The session as `GET /<team>/session/<sid>.json` returns it."""
    response = stack.api("GET", f"/{stack.demo['teamId']}/session/{sid}.json", url=url)
    response.raise_for_status()
    return response.json()["session"]


def events(stack: Stack, sid: str) -> list[dict[str, Any]]:
    """The whole transcript (benchmark sessions are short enough for one page)."""
    response = stack.api("GET", f"/{stack.demo['teamId']}/session/{sid}/messages.json?limit=1000")
    response.raise_for_status()
    return response.json()["messages"]


def start_session(stack: Stack, app_id: str) -> str:
    """Start a session with a first message, so its turn is queued; returns the session id."""
    response = stack.api("POST", f"/{stack.demo['teamId']}/forms/session/add", {"appId": app_id, "message": "go"})
    if response.status_code != 200:
        raise BenchError(f"session add answered {response.status_code}: {response.text[:200]}")
    return str(response.json()["_id"])


def wait_running(stack: Stack, sid: str, timeout: float = 30) -> dict[str, Any]:
    """Wait until a worker has claimed the session's turn."""
    return wait_for(
        lambda: (s := session(stack, sid))["status"] == "running" and s, timeout, f"{sid} to run", every=0.2
    )


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (None if the process is gone)."""
    try:
        # Fields after the command name, which may itself contain spaces and parentheses.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int | None, children: bool = False) -> float:
    """User plus system CPU time used so far by the process (and its live children); Linux /proc, else 0."""
    if pid is None:
        return 0.0
    pids = [pid]
    if children:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (fields := stat_fields(int(entry.name))) and int(fields[1]) == pid:
                pids.append(int(entry.name))
    total = 0
    for each in pids:
        fields = stat_fields(each)
        if fields:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wait_ended(stack: Stack, sid: str, timeout: float, first_look: float = 0.0, every: float = 0.25) -> dict[str, Any]:
    """Wait until the session has ended (any final status), looking first after `first_look` seconds."""
    time.sleep(first_look)
    return wait_for(lambda: (s := session(stack, sid)).get("endedAt") and s, timeout, f"{sid} to end", every=every)


def poll_queries_total(stack: Stack) -> float:
    """The product's own count of cancel-poll queries (`agentcloud_cancel_poll_queries_total` on /metrics)."""
    response = stack.api("GET", "/metrics")
    response.raise_for_status()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "agentcloud_cancel_poll_queries_total":
                return float(sample.value)
    raise BenchError("/metrics has no agentcloud_cancel_poll_queries_total")
