"""`make run`: the whole product on loopback, supervised, until Ctrl-C or SIGTERM.

Starts a MongoDB-wire server (data under VAR_DIR/mongo) and redis-server (VAR_DIR/redis) unless MONGO_URI /
REDIS_URL are set, seeds the demo, starts WORKERS workers and the web app, and prints the URL and the demo login
once the web app answers on that URL. From then on every child that dies is restarted (servers on the same port
and data dir) with a back-off of 1 s doubling to 30 s, one log line per event. While it runs, VAR_DIR/run.json
records its pid and the servers' URIs, so the admin CLI finds them (see `agentcloud_clone.config`).

A start-up failure is one line on stderr naming the cause and the variable to change, and exit status 1.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import requests

from agentcloud_clone.config import PROJECT_ROOT

from .servers import LOOPBACK, ManagedProcess, PortInUseError, start_mongo, start_redis

RUN_RECORD = "run.json"
LOCK_FILE = "run.lock"
ERROR_LOG = "make-run-error.log"
FIRST_DELAY, MAX_DELAY = 1.0, 30.0
# A child that stayed up this long before dying starts its back-off again at FIRST_DELAY.
STABLE_AFTER = 30.0
POLL_INTERVAL = 0.5
WEB_START_TIMEOUT = 60.0
SEED_TIMEOUT = 120.0
# The web app's listening socket is make run's own (see _listen); gunicorn gets it as fd://N.
# gevent workers: an open live stream costs a greenlet, not a thread of a small pool (docs/DEPLOY.md).
GUNICORN_OPTIONS = shlex.split(
    "--workers 2 --worker-class gevent --worker-connections 1000 --graceful-timeout 5 --no-control-socket "
    "--access-logfile -"
)


def say(message: str) -> None:
    """One log line of the launcher's own, on stderr."""
    print(f"make run: {message}", file=sys.stderr, flush=True)


class StartupError(Exception):
    """A start-up failure: `line` is what make run prints, `details` (optional) goes to VAR_DIR/make-run-error.log."""

    def __init__(self, line: str, details: str = "") -> None:
        super().__init__(line)
        self.line = line
        self.details = details


def _interrupt(*_: object) -> None:
    """SIGINT and SIGTERM stop everything the same way."""
    raise KeyboardInterrupt


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _reason(exc: BaseException) -> str:
    """The gist of a client error: pymongo's topology description and timeouts are cut off."""
    return re.split(r" \(configured timeouts|, Timeout: ", _first_line(exc))[0][:200]


def _redact(uri: str) -> str:
    """The URI without its password, for messages."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", uri)


# -- supervised children --------------------------------------------------------------------------------------


class Child:
    """One supervised process: how to (re)start it, whether it still runs, how to stop it, and its back-off."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.delay = 0.0  # the current back-off; 0 when the child is not in a restart loop
        self.started_at = time.monotonic()
        self.restart_at: float | None = None  # set while the child is dead and waiting for its restart

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def start(self) -> None:
        """(Re)start; raises RuntimeError or OSError when that failed."""
        raise NotImplementedError

    def exit_code(self) -> int | None:
        """None while running, else the exit status (negative: killed by that signal)."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def reap(self) -> None:
        """Clear up after the child died (before its restart is due)."""

    def next_delay(self) -> float:
        """The back-off before the next restart: 1 s, doubling to 30 s; from 1 s again after a stable run."""
        if time.monotonic() - self.started_at >= STABLE_AFTER:
            self.delay = 0.0
        self.delay = min(MAX_DELAY, self.delay * 2) if self.delay else FIRST_DELAY
        return self.delay


class ServerChild(Child):
    """The MongoDB-wire server or redis-server: restarted with the same command, so on the same port and data."""

    def __init__(self, server: ManagedProcess) -> None:
        super().__init__(server.name)
        self.server = server

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def start(self) -> None:
        self.server.restart()  # reaps the dead process, then waits until the new one answers
        self.started_at = time.monotonic()
        say(f"{self.name} restarted on {LOOPBACK}:{self.server.port} (pid {self.pid})")

    def exit_code(self) -> int | None:
        process = self.server.process
        return None if process is None else process.poll()

    def stop(self) -> None:
        self.server.stop()

    def reap(self) -> None:
        self.server.stop()  # collects the exit status and closes its output pipe


class CommandChild(Child):
    """A worker or the web app: a command in its own session, so Ctrl-C reaches only make run, which stops it.

    `stop_signals` are sent to its process group in turn, each followed by a wait; then SIGKILL."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        stop_signals: tuple[tuple[signal.Signals, float], ...] = ((signal.SIGTERM, 10.0),),
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        super().__init__(name)
        self.argv = argv
        self.env = env
        self.stop_signals = stop_signals
        self.pass_fds = pass_fds
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=self.pass_fds,
        )
        self.started_at = time.monotonic()

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        if self.process is None:
            return
        for signum, grace in self.stop_signals:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        self._kill_group()
        self.process.wait()

    def reap(self) -> None:
        # What is left of its process group (gunicorn's workers) goes at once, not when the restart is due.
        self._kill_group()

    def _kill_group(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)


class Supervisor:
    """Restarts children that die, with back-off; stops them all in reverse start order."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def add(self, child: Child) -> Child:
        """Supervise a child that is already running."""
        self.children.append(child)
        return child

    def check(self) -> None:
        """One pass: notice deaths and schedule restarts; run the restarts that are due."""
        for child in self.children:
            if child.restart_at is None:
                code = child.exit_code()
                if code is not None:
                    child.reap()
                    delay = child.next_delay()
                    child.restart_at = time.monotonic() + delay
                    say(f"{child.name} (pid {child.pid}) {_exit_reason(code)}; restarting in {delay:g}s")
            elif time.monotonic() >= child.restart_at:
                try:
                    child.start()
                    child.restart_at = None
                except (RuntimeError, OSError) as exc:
                    delay = child.next_delay()
                    child.restart_at = time.monotonic() + delay
                    say(f"{child.name} did not restart: {_first_line(exc)}; retrying in {delay:g}s")

    def run(self) -> None:
        """Supervise until interrupted (KeyboardInterrupt from Ctrl-C or SIGTERM)."""
        while True:
            self.check()
            time.sleep(POLL_INTERVAL)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                say(f"could not stop {child.name}: {_first_line(exc)}")


# -- start-up -------------------------------------------------------------------------------------------------


def _env_int(env: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise StartupError(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
    return value


def _lock_var_dir(var_dir: Path) -> IO[str]:
    """Hold VAR_DIR/run.lock for make run's lifetime: two launchers must not share one store's data files."""
    lock = open(var_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise StartupError(
            f"another make run (pid {holder}) is using VAR_DIR={var_dir}; stop it, or set VAR_DIR to another directory"
        ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _listen(host: str, port: int) -> socket.socket:
    """The web app's listening socket, bound here and handed to gunicorn: a taken port fails now, in one line,
    and whatever answers on it afterwards can only be our own gunicorn (it also survives gunicorn restarts)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc}; set HOST to an address of this machine") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does; a TIME_WAIT is no obstacle
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"cannot serve the web app: {host}:{port} is already in use (another make run, or another server); "
                "set PORT to a free port"
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}; set HOST or PORT") from None
    return sock


def _start_server(
    what: str, start: Callable[[], ManagedProcess], port: int, port_var: str, uri_var: str
) -> ManagedProcess:
    try:
        return start()
    except PortInUseError:
        raise StartupError(
            f"cannot start {what}: {LOOPBACK}:{port} is already in use; set {port_var} to a free port, "
            f"or {uri_var} to use a server that is already running"
        ) from None
    except RuntimeError as exc:
        raise StartupError(
            f"{what} did not come up on {LOOPBACK}:{port}: {_first_line(exc)}; set {port_var} to another port, "
            f"or {uri_var} to use a server that is already running",
            details=str(exc),
        ) from None


def _check_mongo(uri: str) -> None:
    import pymongo
    import pymongo.errors

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=3000, connectTimeoutMS=3000
    )
    try:
        client.admin.command("ping")
    except (pymongo.errors.PyMongoError, ValueError) as exc:
        raise StartupError(
            f"MongoDB at MONGO_URI={_redact(uri)} does not answer ({_reason(exc)}); fix MONGO_URI, "
            "or unset it to let make run start its own"
        ) from None
    finally:
        client.close()


def _check_redis(url: str) -> None:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError) as exc:
        raise StartupError(
            f"Redis at REDIS_URL={_redact(url)} does not answer ({_reason(exc)}); fix REDIS_URL, "
            "or unset it to let make run start its own"
        ) from None


def _seed(env: dict[str, str]) -> dict[str, str]:
    """The demo user, team, app and a fresh API key, through the admin CLI."""
    where = f"into MONGO_URI={_redact(env['MONGO_URI'])}"
    try:
        seed = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app", "seed-demo"],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=SEED_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise StartupError(f"seeding the demo {where} did not finish within {SEED_TIMEOUT:.0f}s") from None
    lines = seed.stdout.strip().splitlines()
    try:
        if seed.returncode == 0:
            return dict(json.loads(lines[-1]))
    except (IndexError, ValueError):
        pass
    last = (seed.stderr.strip().splitlines() or ["no output"])[-1]
    with contextlib.suppress(ValueError, TypeError, KeyError):
        last = json.loads(last)["message"]  # the CLI's own {message, code}
    raise StartupError(
        f"seeding the demo {where} failed (exit status {seed.returncode}): {_reason(RuntimeError(last))}",
        details=seed.stdout + seed.stderr,
    )


def _wait_for_web(web: CommandChild, health_url: str, deadline: float) -> None:
    """Return once /healthz answers 200 through our socket; fail if gunicorn exits or the deadline passes."""
    http = requests.Session()
    http.trust_env = False  # straight to loopback, never through a proxy from the environment
    while time.monotonic() < deadline:
        code = web.exit_code()
        if code is not None:
            raise StartupError(f"the web app (gunicorn) {_exit_reason(code)} before answering; its output is above")
        try:
            if http.get(health_url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise StartupError(f"the web app did not answer {health_url} within {WEB_START_TIMEOUT:.0f}s")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _write_record(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


class Launcher:
    """Everything `make run` starts, in order, and the supervisor that keeps it running."""

    def __init__(self, environ: dict[str, str]) -> None:
        self.env = dict(environ)
        self.var_dir = Path(self.env.get("VAR_DIR") or PROJECT_ROOT / "var").resolve()
        self.env["VAR_DIR"] = str(self.var_dir)  # children run in the project root
        self.env["PYTHONUNBUFFERED"] = "1"
        self.supervisor = Supervisor()
        self.lock: IO[str] | None = None
        self.listener: socket.socket | None = None
        self.record = self.var_dir / RUN_RECORD

    def start(self) -> dict[str, str]:
        """Start everything and return the demo's ids; StartupError says what failed."""
        env = self.env
        host = env.get("HOST") or "127.0.0.1"
        port = _env_int(env, "PORT", 5000, 1, 65535)
        mongo_port = _env_int(env, "MONGO_PORT", 27018, 1, 65535)
        redis_port = _env_int(env, "REDIS_PORT", 6380, 1, 65535)
        workers = _env_int(env, "WORKERS", 1, 0, 64)
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.lock = _lock_var_dir(self.var_dir)
        (self.var_dir / ERROR_LOG).unlink(missing_ok=True)  # an earlier failure's details
        self.listener = _listen(host, port)

        if env.get("MONGO_URI"):
            _check_mongo(env["MONGO_URI"])
        else:
            data = str(self.var_dir / "mongo")
            mongo = _start_server(
                "the MongoDB-wire server",
                lambda: start_mongo(mongo_port, data_dir=data),
                mongo_port,
                "MONGO_PORT",
                "MONGO_URI",
            )
            self.supervisor.add(ServerChild(mongo))
            env["MONGO_URI"] = mongo.url.rstrip("/") + "/agentcloud"
        if env.get("REDIS_URL"):
            _check_redis(env["REDIS_URL"])
        else:
            data = str(self.var_dir / "redis")
            redis = _start_server(
                "redis-server", lambda: start_redis(redis_port, data_dir=data), redis_port, "REDIS_PORT", "REDIS_URL"
            )
            self.supervisor.add(ServerChild(redis))
            env["REDIS_URL"] = redis.url

        demo = _seed(env)
        for number in range(1, workers + 1):
            # A second SIGTERM after the first is RQ's cold shutdown: it ends a turn still running after 10 s.
            worker = CommandChild(
                f"worker-{number}",
                [sys.executable, "-m", "workers"],
                env,
                stop_signals=((signal.SIGTERM, 10.0), (signal.SIGTERM, 5.0)),
            )
            worker.start()
            self.supervisor.add(worker)
        fd = self.listener.fileno()
        web = CommandChild(
            "web",
            [sys.executable, "-m", "gunicorn", "--bind", f"fd://{fd}", *GUNICORN_OPTIONS, "app:app"],
            env,
            pass_fds=(fd,),
        )
        web.start()
        self.supervisor.add(web)

        bound_host, bound_port = self.listener.getsockname()[:2]
        probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound_host, bound_host)
        _wait_for_web(web, _url(probe_host, bound_port) + "healthz", time.monotonic() + WEB_START_TIMEOUT)
        url = _url(host, port)
        _write_record(
            self.record,
            {"pid": os.getpid(), "url": url, "MONGO_URI": env["MONGO_URI"], "REDIS_URL": env["REDIS_URL"]},
        )
        print(
            f"\n  agentcloud_clone is running at {url}\n"
            f"  sign in as {demo['email']} / {demo['password']}\n"
            f"  API key (shown once): {demo['apiKey']}\n"
            f"  team id: {demo['teamId']}   demo app id: {demo['appId']}\n"
            f"  MongoDB: {env['MONGO_URI']}   Redis: {env['REDIS_URL']}   workers: {workers}\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        return demo

    def stop(self) -> None:
        """Stop every child (web first, the store last), release the port, the record and the lock."""
        self.supervisor.stop_all()
        if self.listener is not None:
            self.listener.close()
        if self.lock is not None:  # the record is ours only while we hold the lock
            self.record.unlink(missing_ok=True)
            self.lock.close()


def main() -> int:
    # Installed even where SIGINT came in ignored (a background job of a script): SIGINT always stops make run.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    launcher = Launcher(dict(os.environ))
    status = 0
    try:
        launcher.start()
        launcher.supervisor.run()
    except KeyboardInterrupt:
        pass
    except StartupError as exc:
        line = exc.line
        if exc.details:
            log = launcher.var_dir / ERROR_LOG
            with contextlib.suppress(OSError):
                log.write_text(exc.details)
                line += f" (details in {log})"
        say(line)
        status = 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        launcher.stop()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
