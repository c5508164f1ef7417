"""Dummy job functions for the thread-mode worker tests, importable by the worker processes they start.

Each job records what it did as JSON lines on a Redis list (`log_key`), with the time, pid and thread, so a
test can show overlap and who ran what from the records rather than from its own clock.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from redis import Redis
from rq import get_current_job
from rq.job import Job

from workers.pool import AbnormalEnd, current_control

POLL = 0.02


def _record(log_key: str, event: str, tag: str, **fields: Any) -> None:
    job = get_current_job()
    assert job is not None
    entry = {"event": event, "tag": tag, "t": time.time(), "pid": os.getpid(), "thread": threading.get_ident()}
    job.connection.rpush(log_key, json.dumps({**entry, **fields}))


def gated(log_key: str, gate_key: str, tag: str, on_stop: str = "return") -> str:
    """Run until `gate_key` exists in Redis. When the worker sets the control: `return`, `raise` (what
    JobControl.raise_if_set raises) or `ignore` it (keep waiting for the gate, deaf to the control)."""
    job = get_current_job()
    assert job is not None
    control = current_control()
    _record(log_key, "start", tag, control=control is not None)
    if control is not None:
        control.on_stop(lambda: job.connection.rpush(log_key, json.dumps({"event": "hook", "tag": tag})))
    while not job.connection.exists(gate_key):
        if control is not None and control.is_set() and on_stop != "ignore":
            _record(log_key, "stop-seen", tag, reason=control.reason)
            if on_stop == "raise":
                control.raise_if_set()
            return f"{tag}:{control.reason}"
        if control is not None and on_stop != "ignore":
            control.wait(POLL)
        else:
            time.sleep(POLL)
    _record(log_key, "end", tag)
    return f"{tag}:done"


def file_gated(path: str) -> str:
    """Run until the file at `path` exists: a job that needs no Redis while it runs."""
    control = current_control()
    while not os.path.exists(path):
        if control is not None:
            control.wait(POLL)
        else:
            time.sleep(POLL)
    return "done"


def deaf_until_file(path: str) -> str:
    """Run until the file at `path` exists, deaf to the worker's control and needing no Redis."""
    while not os.path.exists(path):
        time.sleep(POLL)
    return "done"


def leaves_a_courtesy(url: str, key: str) -> str:
    """Hand this process's Redis outbox a slow courtesy (it sets `key` after half a second), and return at once."""
    from agentcloud_clone import queueing

    queueing.send_later(_set_later, url, key)
    return "returned"


def _set_later(url: str, key: str) -> None:
    time.sleep(0.5)  # a send that takes a while (a loaded Redis)
    Redis.from_url(url).set(key, "sent")


def sleeper(seconds: float) -> str:
    """Sleep (waking early if the worker sets the control): the benchmark's stand-in for a turn."""
    control = current_control()
    if control is not None:
        control.wait(seconds)
    else:
        time.sleep(seconds)
    return "slept"


def blocking_reader(list_key: str) -> str:
    """Hold a Redis connection the whole time (a blocking read, as a job waiting on a stream might)."""
    job = get_current_job()
    assert job is not None
    control = current_control()
    _record(list_key + ":log", "start", job.id)
    while control is None or not control.is_set():
        if job.connection.blpop([list_key], timeout=1):
            return "read"
    return f"stopped:{control.reason}"


def failing(log_key: str, tag: str) -> None:
    _record(log_key, "start", tag)
    raise ValueError(f"{tag} failed on purpose")


def abnormal_key(queue_name: str) -> str:
    return f"pool-test:abnormal:{queue_name}"


def record_abnormal_end(job: Job, end: AbnormalEnd) -> None:
    """The abnormal-end handler the test workers run with."""
    entry = {
        "job": job.id,
        "reason": end.reason,
        "forced": end.forced,
        "retried": end.retried,
        "worker": end.worker_name,
        "by": os.getpid(),
        "message": end.message[-500:],
    }
    job.connection.rpush(abnormal_key(job.origin), json.dumps(entry))
