"""The pieces of `make run` that need no servers: its supervisor's back-off and log lines, the run record the
CLI's configuration falls back to, and the CLI's one-line error when MongoDB does not answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentcloud_clone import create_app
from agentcloud_clone.config import Config
from devtools import run as make_run
from devtools.servers import free_port


class FakeChild(make_run.Child):
    """A child whose life the test decides."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__("fake")
        self.code: int | None = None
        self.failures = failures
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return 42

    def start(self) -> None:
        self.starts += 1
        if self.failures:
            self.failures -= 1
            raise RuntimeError("cannot start fake: port taken\n--- fake output ---\nnoise")
        self.code = None

    def exit_code(self) -> int | None:
        return self.code

    def stop(self) -> None:
        self.code = 0


def test_back_off_doubles_to_thirty_seconds_and_starts_over_after_a_stable_run(monkeypatch) -> None:
    child = FakeChild()
    assert [child.next_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    child.started_at -= make_run.STABLE_AFTER
    assert child.next_delay() == 1


def test_a_dead_child_is_logged_and_restarted_and_a_failing_restart_backs_off(capsys) -> None:
    supervisor = make_run.Supervisor()
    child = supervisor.add(FakeChild(failures=2))
    supervisor.check()
    assert capsys.readouterr().err == ""
    child.code = -9
    supervisor.check()
    assert capsys.readouterr().err == "make run: fake (pid 42) was killed by SIGKILL; restarting in 1s\n"
    for expected in (2, 4):
        child.restart_at = 0  # due now
        supervisor.check()
        line = f"make run: fake did not restart: cannot start fake: port taken; retrying in {expected}s\n"
        assert capsys.readouterr().err == line
    child.restart_at = 0
    supervisor.check()
    assert child.starts == 3 and child.restart_at is None and child.exit_code() is None


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def record(monkeypatch, tmp_path: Path):
    """`record(pid)` writes VAR_DIR/run.json as a running make run does."""
    monkeypatch.setenv("VAR_DIR", str(tmp_path))
    monkeypatch.delenv("MONGO_URI", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)

    def _write(pid: int) -> None:
        servers = {"MONGO_URI": "mongodb://127.0.0.1:27999/agentcloud", "REDIS_URL": "redis://127.0.0.1:6999/0"}
        (tmp_path / "run.json").write_text(json.dumps({"pid": pid, "url": "http://127.0.0.1:5000/", **servers}))

    return _write


def test_config_uses_the_servers_of_a_running_make_run(record) -> None:
    record(os.getpid())
    values = Config({"SECRET_KEY": "x"}).values
    assert values["MONGO_URI"] == "mongodb://127.0.0.1:27999/agentcloud"
    assert values["REDIS_URL"] == "redis://127.0.0.1:6999/0"


def test_the_environment_wins_over_the_run_record(record, monkeypatch) -> None:
    record(os.getpid())
    monkeypatch.setenv("MONGO_URI", "mongodb://db.example:27017/mine")
    values = Config({"SECRET_KEY": "x"}).values
    assert values["MONGO_URI"] == "mongodb://db.example:27017/mine"
    assert values["REDIS_URL"] == "redis://127.0.0.1:6999/0"


def test_a_record_left_by_a_make_run_that_is_gone_is_ignored(record, tmp_path: Path) -> None:
    record(_dead_pid())
    values = Config({"SECRET_KEY": "x"}).values
    assert values["MONGO_URI"] == "mongodb://127.0.0.1:27017/agentcloud"
    assert values["REDIS_URL"] == "redis://127.0.0.1:6379/0"
    (tmp_path / "run.json").write_text("{not json")
    assert Config({"SECRET_KEY": "x"}).values["MONGO_URI"] == "mongodb://127.0.0.1:27017/agentcloud"


def test_the_cli_reports_an_unreachable_mongodb_as_one_503_line() -> None:
    uri = f"mongodb://someone:secret@127.0.0.1:{free_port()}/nothing?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    app = create_app(
        {"MONGO_URI": uri, "REDIS_URL": "redis://127.0.0.1:1/0", "SECRET_KEY": "x", "CREATE_INDEXES": False}
    )
    result = app.test_cli_runner().invoke(args=["apikeys", "create", "demo@example.com"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    error = json.loads(line)
    assert error["code"] == 503 and "MONGO_URI" in error["message"] and "secret" not in error["message"]
