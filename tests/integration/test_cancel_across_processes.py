"""Cancel crosses a process boundary: HTTP to gunicorn, a stamp in MongoDB, a worker process that stops."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from devtools.stack import Stack
from tests.fakes.openai_server import FakeOpenAI
from tests.integration.common import events_of, session_of, start_running, wait_until

pytestmark = pytest.mark.integration

POLL = 0.5
MARGIN = 0.5


def _stack(mongo_server, redis_server, **settings) -> Iterator[Stack]:
    stack = Stack(mongo_server.url, redis_server.url, CANCEL_POLL_INTERVAL=POLL, OUTPUT_FLUSH_INTERVAL=0.1, **settings)
    try:
        yield stack.start(webs=1, workers=1)
    finally:
        stack.stop()


@pytest.fixture(params=["pubsub", "polling-only"])
def stack(request, mongo_server, redis_server) -> Iterator[Stack]:
    yield from _stack(mongo_server, redis_server, CANCEL_PUBSUB="true" if request.param == "pubsub" else "false")


def _session_doc_worker(stack: Stack, sid: str) -> str:
    """The `workerId` (host:pid) recorded on the session by the process running its turn."""
    import pymongo
    from bson import ObjectId

    uri = stack.env["MONGO_URI"]
    client = pymongo.MongoClient(uri)
    try:
        return client.get_default_database().sessions.find_one({"_id": ObjectId(sid)})["workerId"]
    finally:
        client.close()


def test_cancel_over_http_stops_the_worker_within_one_poll_interval(stack):
    team = stack.demo["teamId"]
    app_id = stack.cli("apps", "create", team, "--name", "slow", "--config", '{"steps": 2000, "stepDelay": 0.02}')[
        "appId"
    ]
    sid = start_running(stack, app_id)
    assert session_of(stack, sid)["status"] == "running"
    response = stack.api("POST", f"/{team}/forms/session/{sid}/cancel")
    assert response.status_code == 200 and response.json()["ok"] is True
    ended = wait_until(
        lambda: (s := session_of(stack, sid))["status"] == "terminated" and s, POLL + MARGIN + 2, "the end"
    )
    events = events_of(stack, sid)
    cancel_at = datetime.fromisoformat(next(e for e in events if e["type"] == "cancel")["createdAt"])
    ended_at = datetime.fromisoformat(ended["endedAt"])
    assert (ended_at - cancel_at).total_seconds() < POLL + MARGIN
    outputs = [e for e in events if e["type"] == "output"]
    assert outputs and outputs[-1].get("interrupted") is True
    assert events[-1]["type"] == "status" and events[-1]["status"] == "terminated"
    again = stack.api("POST", f"/{team}/forms/session/{sid}/cancel").json()
    assert again["alreadyCancelled"] is True and again["cancelledAt"] == ended["cancelledAt"]


@pytest.fixture
def polling_stack(mongo_server, redis_server) -> Iterator[Stack]:
    yield from _stack(mongo_server, redis_server, CANCEL_PUBSUB="false")


def test_cancel_closes_the_upstream_openai_stream(polling_stack):
    stack = polling_stack
    fake = FakeOpenAI(chunks=5000, interval=0.01).start()
    try:
        team = stack.demo["teamId"]
        config = f'{{"model": "fake", "baseUrl": "{fake.base_url}", "apiKey": "sk-test"}}'
        app_id = stack.cli("apps", "create", team, "--name", "llm", "--runner", "openai", "--config", config)["appId"]
        sid = start_running(stack, app_id)
        cancelled_at = time.monotonic()
        stack.api("POST", f"/{team}/forms/session/{sid}/cancel")
        wait_until(lambda: fake.streams[0]["closed_by_client"], POLL + MARGIN + 2, "the upstream stream to close")
        assert fake.streams[0]["closed_at"] - cancelled_at < POLL + MARGIN
        sent_at_close = fake.streams[0]["sent"]
        time.sleep(0.3)
        assert fake.streams[0]["sent"] == sent_at_close and not fake.streams[0]["done"]
        wait_until(lambda: session_of(stack, sid)["status"] == "terminated", 5, "the session to end")
    finally:
        fake.stop()


@pytest.fixture
def reaper_stack(mongo_server, redis_server) -> Iterator[Stack]:
    stack = Stack(
        mongo_server.url,
        redis_server.url,
        CANCEL_POLL_INTERVAL=POLL,
        HEARTBEAT_INTERVAL=0.2,
        HEARTBEAT_TIMEOUT=2,
        REAPER_INTERVAL=0.5,
    )
    try:
        yield stack.start(webs=1, workers=1)
    finally:
        stack.stop()


def test_killed_worker_is_reaped_with_transcript_intact(reaper_stack):
    stack = reaper_stack
    team = stack.demo["teamId"]
    app_id = stack.cli("apps", "create", team, "--name", "slow", "--config", '{"steps": 2000, "stepDelay": 0.02}')[
        "appId"
    ]
    sid = start_running(stack, app_id)
    before = events_of(stack, sid)
    victim = stack.workers[0]
    stack.start_worker()  # the survivor, whose reaper notices the loss
    # The machine running the turn is lost: the worker and the job process it forked (which RQ puts in a
    # session of its own) both die at once.
    job_pid = int(_session_doc_worker(stack, sid).rsplit(":", 1)[1])
    killed_at = time.monotonic()
    stack.kill(victim)
    os.kill(job_pid, signal.SIGKILL)
    ended = wait_until(lambda: (s := session_of(stack, sid))["status"] == "error" and s, 2 + 0.5 + 5, "the reaper")
    assert time.monotonic() - killed_at < 2 + 0.5 + 3
    events = events_of(stack, sid)
    assert [e["seq"] for e in events[: len(before)]] == [e["seq"] for e in before]
    assert "Worker lost" in events[-1]["message"] and ended["endedAt"]


def test_killed_job_process_ends_its_session_at_once(polling_stack):
    """Only the forked process running the turn dies (say, the OOM killer): its worker ends the session
    `error` straight away, without waiting for the heartbeat bound (30 s here)."""
    stack = polling_stack
    team = stack.demo["teamId"]
    app_id = stack.cli("apps", "create", team, "--name", "slow", "--config", '{"steps": 2000, "stepDelay": 0.02}')[
        "appId"
    ]
    sid = start_running(stack, app_id)
    os.kill(int(_session_doc_worker(stack, sid).rsplit(":", 1)[1]), signal.SIGKILL)
    ended = wait_until(
        lambda: (s := session_of(stack, sid))["status"] == "error" and s, 5, "the worker to end the session"
    )
    assert ended["endedAt"]
    assert "process running this turn died" in events_of(stack, sid)[-1]["message"]
