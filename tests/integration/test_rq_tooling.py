"""RQ's own tools on the product's queues, as the README tells operators to run them: `rq info` and rq-dashboard
through `flask --app app queues ...`, which find the queues and Redis from the product's settings."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import requests

from devtools.servers import free_port
from devtools.stack import ROOT, Stack
from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(mongo_server, redis_server):
    # No worker: the turn stays queued, for the tools to show.
    product = Stack(mongo_server.url, redis_server.url, REQUIRE_WORKERS="false")
    try:
        yield product.start(webs=1, workers=0)
    finally:
        product.stop()


def _queued_turn(stack: Stack) -> str:
    body = {"appId": stack.demo["appId"], "message": "hi"}
    return stack.api("POST", f"/{stack.demo['teamId']}/forms/session/add", body).json()["_id"]


def _flask(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "flask", "--app", "app", *args]
    return subprocess.run(command, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_rq_info_shows_the_products_queues_and_the_queued_turn(stack):
    _queued_turn(stack)
    listed = stack.cli("queues", "list")
    turns = stack.env["TURN_QUEUE"]
    assert listed["queues"] == [turns, f"{turns}.webhooks"]
    assert "@" not in listed["redis"] and listed["redis"].startswith("127.0.0.1:")
    info = _flask(stack, "queues", "info")
    assert info.returncode == 0, info.stderr
    # e.g. "turns-3f2a… |█ 1, 0 executing, 0 finished, 0 failed"
    line = next(line for line in info.stdout.splitlines() if line.startswith(turns + " "))
    assert re.search(r"\|\S*\s+1, 0 executing", line), info.stdout


def test_rq_dashboard_serves_the_products_queues_on_loopback(stack):
    _queued_turn(stack)
    port = free_port()
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "queues", "dashboard", "--port", str(port)],
        env=stack.env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def queues() -> dict | None:
            try:
                return requests.get(f"http://127.0.0.1:{port}/0/data/queues.json", timeout=5).json()
            except requests.RequestException:
                return None

        answer = wait_until(queues, 60, "rq-dashboard answering")
        counts = {queue["name"]: queue["count"] for queue in answer["queues"]}
        assert counts[stack.env["TURN_QUEUE"]] == 1
    finally:
        dashboard.terminate()
        dashboard.wait(20)


def test_the_dashboard_refuses_to_listen_beyond_loopback_without_a_password(stack):
    refused = _flask(stack, "queues", "dashboard", "--bind", "0.0.0.0")
    assert refused.returncode == 1
    assert "RQ_DASHBOARD_PASSWORD" in refused.stderr and refused.stdout == ""
