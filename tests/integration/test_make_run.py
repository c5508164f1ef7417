"""`make run` as a user meets it: the real launcher (`python -m devtools.run`) on free ports, the README's quick
start over HTTP and the admin CLI, start-up failures, and children that die under it."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from devtools.servers import free_port
from tests.support import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FLASK = str(Path(sys.executable).with_name("flask"))  # the `flask` the README's command runs, from this venv
TAG_VARIABLE = "MAKE_RUN_TEST_TAG"  # marks every process a launcher started, so teardown finds even orphans
START_TIMEOUT = 180.0  # generous: the machine is shared and this is a cold start of five processes


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours
        return b""


@contextlib.contextmanager
def _sigint_default() -> Iterator[None]:
    """Children start with Ctrl-C's default action, as a terminal's foreground job does, even when this run
    inherited SIGINT ignored (a job started in the background by a shell without job control): a handler,
    unlike an ignored signal, is reset to the default by exec, and make ignores SIGINT for good if it started
    with it ignored (it would then exit 0 after the launcher, not as interrupted)."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class MakeRun:
    """One `python -m devtools.run` on free ports with its own VAR_DIR, its output in files, every process it
    starts findable by a tag in their environment."""

    def __init__(self, tmp_path: Path, name: str, **settings: str) -> None:
        self.tag = uuid.uuid4().hex[:12]
        self.var_dir = tmp_path / "var"
        self.ports = {"PORT": free_port(), "MONGO_PORT": free_port(), "REDIS_PORT": free_port()}
        self.env = {k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "REDIS_URL")}
        self.env.update(
            {name: str(port) for name, port in self.ports.items()},
            VAR_DIR=str(self.var_dir),
            PYTHONUNBUFFERED="1",
            LOG_FORMAT="text",
            **{TAG_VARIABLE: self.tag},
            **settings,
        )
        self.logs = ROOT / "test-artifacts" / "integration" / "make_run" / f"{name}-{self.tag}"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.via_make = False
        self.banner: dict[str, str] = {}

    def start(self, *, via_make: bool = False) -> MakeRun:
        """Start the launcher, or `make run` itself in a process group of its own, as a terminal runs it."""
        command = ["make", "--no-print-directory", "run"] if via_make else [sys.executable, "-m", "devtools.run"]
        logs = self.logs
        with open(logs / "stdout.log", "wb") as out, open(logs / "stderr.log", "wb") as err, _sigint_default():
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=out, stderr=err, start_new_session=via_make
            )
        self.via_make = via_make
        return self

    def ctrl_c(self) -> None:
        """What Ctrl-C does: SIGINT to the terminal's foreground process group (make and all it started)."""
        assert self.process is not None
        if self.via_make:
            os.killpg(self.process.pid, signal.SIGINT)
        else:
            self.process.send_signal(signal.SIGINT)

    @property
    def url(self) -> str:
        return self.banner["url"]

    def stdout(self) -> str:
        return (self.logs / "stdout.log").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.logs / "stderr.log").read_text(errors="replace")

    def own_lines(self) -> list[str]:
        """The launcher's own log lines (children write to the same stderr)."""
        return [line for line in self.stderr().splitlines() if line.startswith("make run: ")]

    def wait_for_banner(self) -> dict[str, str]:
        def banner() -> re.Match[str] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"make run exited {self.process.returncode}: {self.own_lines()} (see {self.logs})")
            return re.search(
                r"running at (?P<url>\S+)\n\s+sign in as (?P<email>\S+) / (?P<password>\S+)\n"
                r"\s+API key \(shown once\): (?P<apiKey>\S+)\n"
                r"\s+team id: (?P<teamId>\w+)\s+demo app id: (?P<appId>\w+)",
                self.stdout(),
            )

        self.banner = wait_until(banner, START_TIMEOUT, f"the banner (see {self.logs})").groupdict()
        return self.banner

    def wait_for_exit(self, timeout: float = 120) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def processes(self) -> dict[int, str]:
        """Every live process this launcher started (not the launcher itself) → its command line."""
        marker = f"{TAG_VARIABLE}={self.tag}".encode()
        # redis-server writes its process title over its environment, so it is known by its port instead.
        redis_title = f"redis-server 127.0.0.1:{self.ports['REDIS_PORT']}"
        launcher = self.process.pid if self.process else None
        found = {}
        for pid in (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()):
            cmdline = _proc(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
            if pid != launcher and (marker in _proc(pid, "environ").split(b"\0") or cmdline.endswith(redis_title)):
                found[pid] = cmdline
        return found

    def children(self, needle: str) -> list[int]:
        """The launcher's direct children whose command line contains `needle`."""
        assert self.process is not None
        return sorted(
            pid
            for pid, cmdline in self.processes().items()
            if needle in cmdline and _proc(pid, "stat").rsplit(b")", 1)[-1].split()[1] == str(self.process.pid).encode()
        )

    def api(self, method: str, path: str, key: str | None = None, body: Any = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {key or self.banner['apiKey']}"}
        with requests.Session() as http:
            http.trust_env = False
            return http.request(method, self.url + path.lstrip("/"), json=body, headers=headers, timeout=15)

    def start_session(self) -> str:
        team = self.banner["teamId"]
        created = self.api("POST", f"{team}/forms/session/add", body={"appId": self.banner["appId"], "message": "go"})
        assert created.status_code == 200, created.text
        return created.json()["_id"]

    def wait_for_output(self, sid: str, timeout: float = 120) -> None:
        def streamed() -> bool:
            events = self.api("GET", f"{self.banner['teamId']}/session/{sid}/messages.json").json()["messages"]
            return any(event["type"] == "output" for event in events)

        wait_until(streamed, timeout, f"output of session {sid} (see {self.logs})")

    def kill_all(self) -> None:
        """Teardown: SIGKILL the launcher and everything it started, whatever state they are in."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_run(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., MakeRun]]:
    started: list[MakeRun] = []

    def _make(**settings: str) -> MakeRun:
        run = MakeRun(tmp_path, request.node.name.replace("[", "-").rstrip("]"), **settings)
        started.append(run)
        return run

    yield _make
    for run in started:
        run.kill_all()


def assert_everything_stopped(run: MakeRun) -> None:
    wait_until(lambda: not run.processes(), 60, "every child of make run to be gone")
    for name, port in run.ports.items():
        assert wait_until(lambda port=port: port_is_free(port), 30, f"{name} {port} to be free")
    assert not (run.var_dir / "run.json").exists()


def test_quick_start_end_to_end_then_ctrl_c_stops_everything(make_run: Callable[..., MakeRun]) -> None:
    """The README's quick start: make run, sign in with the printed login, the seed's curl examples (a cookie
    and Origin cancel, then its idempotent repeat), a key from the CLI (which finds make run's servers by
    itself), start → cancel → cancel again → delete; then Ctrl-C."""
    run = make_run().start(via_make=True)
    banner = run.wait_for_banner()
    assert banner["url"] == f"http://127.0.0.1:{run.ports['PORT']}/"
    record = json.loads((run.var_dir / "run.json").read_text())
    assert record["url"] == banner["url"] and record["pid"] in run.processes()

    with requests.Session() as browser:
        browser.trust_env = False
        login = browser.post(
            run.url + "forms/account/login", json={"email": banner["email"], "password": banner["password"]}, timeout=15
        )
        assert login.status_code == 200 and login.json()["csrf"], login.text
        assert browser.get(run.url + "account.json", timeout=15).json()["account"]["email"] == banner["email"]
        cookie = "; ".join(f"{c.name}={c.value}" for c in browser.cookies)
    cancelled = run.start_session()
    curl = [
        "curl", "-sS", "-X", "POST", run.url + "api/managed-agents/cancel",
        "-H", "Content-Type: application/json",
        "-H", f"Origin: {run.url.rstrip('/')}",
        "-H", f"Cookie: {cookie}",
        "-d", json.dumps({"sessionId": cancelled}),
    ]  # fmt: skip
    answers = [json.loads(subprocess.run(curl, capture_output=True, check=True, timeout=60).stdout) for _ in "12"]
    assert answers == [{"ok": True}, {"ok": True, "alreadyCancelled": True}], answers

    cli_env = {k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "REDIS_URL")}
    cli_env["VAR_DIR"] = str(run.var_dir)
    created = subprocess.run(
        [FLASK, "--app", "app", "apikeys", "create", "demo@example.com"],
        cwd=ROOT,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout.strip().splitlines()[-1])["key"]

    team = banner["teamId"]
    started = run.api("POST", f"{team}/forms/session/add", key, {"appId": banner["appId"], "message": "hello"})
    assert started.status_code == 200, started.text
    sid = started.json()["_id"]
    first = run.api("POST", f"{team}/forms/session/{sid}/cancel", key)
    assert first.status_code == 200 and first.json()["ok"] is True and "alreadyCancelled" not in first.json()
    again = run.api("POST", f"{team}/forms/session/{sid}/cancel", key)
    assert again.status_code == 200 and again.json()["ok"] is True and again.json()["alreadyCancelled"] is True
    wait_until(
        lambda: run.api("GET", f"{team}/session/{sid}.json", key).json()["session"]["status"] == "terminated",
        120,
        "the worker to end the cancelled session",
    )
    deleted = run.api("DELETE", f"{team}/forms/session/{sid}", key)
    assert deleted.status_code == 200 and deleted.json()["ok"] is True, deleted.text
    assert run.api("GET", f"{team}/session/{sid}.json", key).status_code == 404

    children = run.processes()
    assert len(children) >= 6, children  # the launcher, store, redis-server, a worker, gunicorn and its workers
    run.ctrl_c()
    # make reports the interrupt (and exits as interrupted) once the launcher has stopped everything
    assert run.wait_for_exit() == -signal.SIGINT, run.stderr()
    assert not [line for line in run.own_lines() if "could not stop" in line], run.own_lines()
    assert_everything_stopped(run)
    assert not any(line for line in run.own_lines() if "restarting" in line), run.own_lines()


class Stranger(http.server.BaseHTTPRequestHandler):
    """Another server on the port, answering everything (as another instance's /healthz would)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.parametrize("variable", ["PORT", "MONGO_PORT", "REDIS_PORT"])
def test_a_taken_port_is_one_line_naming_its_variable_and_no_banner(
    make_run: Callable[..., MakeRun], variable: str
) -> None:
    run = make_run()
    port = run.ports[variable]
    stranger = http.server.ThreadingHTTPServer(("127.0.0.1", port), Stranger)
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    try:
        code = run.start().wait_for_exit()
    finally:
        stranger.shutdown()
        stranger.server_close()
    assert code != 0
    lines = run.stderr().strip().splitlines()
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port} is already in use" in lines[0] and f"set {variable} to a free port" in lines[0], lines
    assert "running at" not in run.stdout()
    assert_everything_stopped(run)


def test_a_killed_worker_is_restarted_and_a_queued_turn_then_runs(make_run: Callable[..., MakeRun]) -> None:
    run = make_run(WORKERS="2").start()
    run.wait_for_banner()
    workers = wait_until(lambda: len(run.children("-m workers")) == 2 and run.children("-m workers"), 60, "2 workers")
    os.kill(workers[0], signal.SIGKILL)
    os.kill(workers[1], signal.SIGKILL)
    sid = run.start_session()  # queued: no worker is alive until the restarts are due
    for pid in workers:
        wait_until(
            lambda pid=pid: any(
                f"(pid {pid}) was killed by SIGKILL; restarting in 1s" in line for line in run.own_lines()
            ),
            60,
            f"the death of worker {pid} to be logged",
        )
    replaced = wait_until(
        lambda: (now := run.children("-m workers")) and len(now) == 2 and not set(now) & set(workers) and now,
        60,
        "two new workers",
    )
    run.wait_for_output(sid)
    assert set(replaced).isdisjoint(workers)
    run.api("POST", f"{run.banner['teamId']}/forms/session/{sid}/cancel")


def test_a_killed_redis_server_comes_back_on_its_port_and_sigterm_stops_everything(
    make_run: Callable[..., MakeRun],
) -> None:
    run = make_run().start()
    run.wait_for_banner()
    port = run.ports["REDIS_PORT"]
    (old,) = run.children("redis-server")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: any(f"restarted on 127.0.0.1:{port}" in line for line in run.own_lines()), 60, "the restart")
    (new,) = run.children("redis-server")
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    assert new != old and int(client.info("server")["process_id"]) == new
    client.close()
    with requests.Session() as http:
        http.trust_env = False
        wait_until(lambda: http.get(run.url + "readyz", timeout=5).status_code == 200, 60, "/readyz")
    sid = run.start_session()
    run.wait_for_output(sid)  # the worker found the new redis-server too
    run.api("POST", f"{run.banner['teamId']}/forms/session/{sid}/cancel")

    run.process.send_signal(signal.SIGTERM)
    assert run.wait_for_exit() == 0, run.own_lines()
    assert_everything_stopped(run)


def test_the_cli_without_make_run_fails_in_one_json_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "REDIS_URL")}
    env.update(VAR_DIR=str(tmp_path), MONGO_URI=f"mongodb://127.0.0.1:{free_port()}/nothing_here")
    result = subprocess.run(
        [FLASK, "--app", "app", "apikeys", "create", "demo@example.com"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    error = json.loads(result.stderr.strip().splitlines()[-1])
    assert error["code"] == 503 and "MONGO_URI" in error["message"], error
