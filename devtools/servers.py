"""Local servers for `make run` and the tests: redis-server and a MongoDB-wire server (mongoeco), loopback only.

CLI (runs the MongoDB-wire server in the foreground until SIGTERM/SIGINT):

    python -m devtools.servers mongo --host 127.0.0.1 --port N [--data-dir DIR | --memory]

It prints exactly one line, `ready mongodb://127.0.0.1:N`, once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["LOOPBACK", "ManagedProcess", "PortInUseError", "free_port", "main", "start_mongo", "start_redis"]

# The only address anything here binds: these servers have no authentication.
LOOPBACK = "127.0.0.1"
READY_PREFIX = "ready "
REDIS_START_TIMEOUT = 10.0
MONGO_START_TIMEOUT = 20.0
SQLITE_FILENAME = "mongoeco.sqlite3"
# The project root (it holds `devtools` and the product packages), so `python -m` works in the child from any cwd.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])
# Auto-chosen ports can be taken by someone else between free_port() and the server's bind; retry that.
_AUTO_PORT_ATTEMPTS = 3

_live: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    """True if a server could listen on 127.0.0.1:port now (TIME_WAIT leftovers do not count as taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option redis-server and asyncio use, so a just-stopped server's TIME_WAIT does not block a restart.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        return True


class PortInUseError(RuntimeError):
    """A server was not started because its loopback port is already taken; `port` says which."""

    def __init__(self, name: str, port: int) -> None:
        super().__init__(
            f"cannot start {name}: {LOOPBACK}:{port} is already in use (a server left over from an earlier run?)"
        )
        self.port = port


class ManagedProcess:
    """One server child process on a fixed loopback port.

    Guarantees: after construction (via start_redis/start_mongo) the server answers on `url`; `stop()` and `kill()`
    return only after the process has been reaped, so its port is released; `restart()` runs the same command on
    the same port. Children run in their own session so a terminal Ctrl-C reaches only the parent, which then
    stops them in order.
    """

    def __init__(
        self,
        name: str,
        build_command: Callable[[int], list[str]],
        port: int,
        url_for: Callable[[int], str],
        wait_ready: Callable[[ManagedProcess, float], None],
        timeout: float,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.url = url_for(port)
        self.process: subprocess.Popen[str] | None = None
        self._build_command = build_command
        self._url_for = url_for
        self._wait_ready = wait_ready
        self._timeout = timeout
        self._env = env
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._ready_line: str | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        """The argv that (re)starts this server on its port."""
        return self._build_command(self.port)

    @property
    def pid(self) -> int | None:
        """The child's pid, or None before the first start."""
        return self.process.pid if self.process else None

    def is_running(self) -> bool:
        """True while the child process exists and has not exited."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> Self:
        """Launch the command and return once the server is ready; on failure the child is gone and RuntimeError
        says why (with the tail of its output)."""
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        # A port of 0 means "let the server pick": only the mongo CLI supports that (it reports the real port).
        if self.port and not _port_is_free(self.port):
            raise PortInUseError(self.name, self.port)
        self._output.clear()
        self._ready.clear()
        self._ready_line = None
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            # Merged, drained by a thread: a full pipe would block the server, and the tail explains failures.
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=self._env,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._drain, args=(self.process,), name=f"{self.name}-output", daemon=True
        )
        self._reader.start()
        _live.add(self)
        _register_cleanup()
        try:
            self._wait_ready(self, time.monotonic() + self._timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 5) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit code once reaped (None if never started).
        Safe to call repeatedly."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        self._finish_reader()
        return process.returncode

    def kill(self) -> int | None:
        """SIGKILL at once, as a crashed machine would; returns the exit code once reaped."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        self._finish_reader()
        return process.returncode

    def restart(self, timeout: float = 5) -> Self:
        """Stop (if running) and start the same command on the same port; returns once it is ready again."""
        self.stop(timeout)
        return self.start()

    def output_tail(self) -> str:
        """The last lines the server printed (stdout and stderr), for diagnostics."""
        return "".join(self._output)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<ManagedProcess {self.name} {self.url} pid={self.pid} {state}>"

    # -- internals -------------------------------------------------------------------------------------------

    def _drain(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # the pipe is closed under us after a kill
            for line in process.stdout:
                self._output.append(line)
                if self._ready_line is None and line.startswith(READY_PREFIX):
                    self._ready_line = line.strip()
                    self._ready.set()

    def _finish_reader(self) -> None:
        if self._reader is not None:
            # The child is reaped, so its end of the pipe is closed and the reader sees EOF promptly.
            self._reader.join(2)
            self._reader = None
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        _live.discard(self)

    def _fail(self, reason: str) -> RuntimeError:
        tail = self.output_tail().strip()
        details = f"\n--- {self.name} output ---\n{tail}" if tail else ""
        return RuntimeError(f"{self.name} on {LOOPBACK}:{self.port} {reason}{details}")

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            if self._reader is not None:
                self._reader.join(1)  # collect its last words for the message
            raise self._fail(f"exited with code {self.process.returncode} during start-up")


def _stop_leftovers() -> None:
    # Children live in their own session, so nothing else would stop them if the owner forgot to.
    for server in list(_live):
        server.stop(timeout=2)


_cleanup_registered = False


def _register_cleanup() -> None:
    """Stop this process's servers at interpreter exit; registered with the first server, not at import."""
    global _cleanup_registered
    if not _cleanup_registered:
        atexit.register(_stop_leftovers)
        _cleanup_registered = True


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start_with_retries(make: Callable[[int], ManagedProcess], port: int | None) -> ManagedProcess:
    """Start on `port`, or on a free port, retrying a few times if another process grabs it first."""
    if port is not None:
        return make(port).start()
    for attempt in range(_AUTO_PORT_ATTEMPTS):
        server = make(free_port())
        try:
            return server.start()
        except RuntimeError:
            if attempt == _AUTO_PORT_ATTEMPTS - 1 or _port_is_free(server.port):
                raise  # a real failure, not a lost race for the port
    raise AssertionError("unreachable")


# -- redis ----------------------------------------------------------------------------------------------------


def _redis_ready(server: ManagedProcess, deadline: float) -> None:
    import redis

    last_error: Exception | None = None
    while time.monotonic() < deadline:
        server._check_alive()
        client = redis.Redis(host=LOOPBACK, port=server.port, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            if client.ping():
                # The pid check proves the answer came from our child and not from a stranger on the same port.
                info = client.info("server")
                if int(info.get("process_id", -1)) == server.pid:
                    return
                raise server._fail(f"is answered by another redis-server (pid {info.get('process_id')})")
        except redis.exceptions.RedisError as exc:
            last_error = exc
        finally:
            client.close()
        time.sleep(0.05)
    raise server._fail(f"did not answer PING within {REDIS_START_TIMEOUT:.0f}s (last error: {last_error})")


def start_redis(port: int | None = None, *, data_dir: str | None = None) -> ManagedProcess:
    """Start redis-server on 127.0.0.1 (a free port unless `port` is given) and return once PING answers.

    Without `data_dir` nothing is persisted (`--save ''`, `--appendonly no`); with it, RDB snapshots and an
    append-only file go into that directory and survive restarts. Raises RuntimeError if redis-server is missing,
    the port is taken, or it is not ready within 10 s. url = redis://127.0.0.1:PORT/0.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError(
            "redis-server is not installed or not on PATH: install it with `apt-get install redis-server` "
            "(or `make system-packages`), or set REDIS_URL to an existing server"
        )
    if data_dir is not None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        data_dir = str(Path(data_dir).resolve())

    def build(port: int) -> list[str]:
        args = [executable, "--port", str(port), "--bind", LOOPBACK, "--protected-mode", "yes", "--daemonize", "no"]
        if data_dir is None:
            args += ["--save", "", "--appendonly", "no"]
        else:
            # Redis's stock snapshot points plus an fsync-every-second AOF: a crash loses at most about a second.
            args += ["--dir", data_dir, "--save", "3600 1 300 100 60 10000", "--appendonly", "yes"]
        return args

    def make(port: int) -> ManagedProcess:
        return ManagedProcess(
            "redis-server", build, port, lambda p: f"redis://{LOOPBACK}:{p}/0", _redis_ready, REDIS_START_TIMEOUT
        )

    return _start_with_retries(make, port)


# -- MongoDB-wire server (mongoeco) ---------------------------------------------------------------------------


def _mongo_ready(server: ManagedProcess, deadline: float) -> None:
    while not server._ready.wait(0.05):
        server._check_alive()
        if time.monotonic() >= deadline:
            raise server._fail(f"printed no ready line within {MONGO_START_TIMEOUT:.0f}s")
    ready_url = (server._ready_line or "")[len(READY_PREFIX) :]
    port = int(ready_url.rsplit(":", 1)[1].rstrip("/"))
    if server.port not in (0, port):
        raise server._fail(f"reported port {port} instead of {server.port}")
    # Port 0 asked the server to choose: from now on (restarts included) this is its port.
    server.port = port
    server.url = server._url_for(port)

    import pymongo
    import pymongo.errors

    last_error: Exception | None = None
    while time.monotonic() < deadline:
        server._check_alive()
        remaining_ms = max(100, int((deadline - time.monotonic()) * 1000))
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            server.url, serverSelectionTimeoutMS=min(remaining_ms, 2000), connectTimeoutMS=2000
        )
        try:
            client.admin.command("ping")
            return
        except pymongo.errors.PyMongoError as exc:
            last_error = exc
        finally:
            client.close()
        time.sleep(0.05)
    raise server._fail(f"did not answer a pymongo ping within {MONGO_START_TIMEOUT:.0f}s (last error: {last_error})")


def start_mongo(port: int | None = None, *, data_dir: str | None = None) -> ManagedProcess:
    """Start the mongoeco MongoDB-wire server on 127.0.0.1 and return once pymongo's `ping` succeeds.

    With `data_dir` the data lives in a SQLite file there (mongoeco's SQLite engine as corrected by
    `embedded_store.EmbeddedSQLiteEngine`) and survives restarts and a kill; otherwise it is in memory and a
    restart starts empty. Without `port` the server picks a free one itself (no race), and keeps it on restart.
    Raises RuntimeError if it is not ready within 20 s. url = mongodb://127.0.0.1:PORT/.
    """
    storage = ["--memory"]
    if data_dir is not None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        storage = ["--data-dir", str(Path(data_dir).resolve())]

    def build(port: int) -> list[str]:
        return [sys.executable, "-m", "devtools.servers", "mongo", "--host", LOOPBACK, "--port", str(port),
                *storage]  # fmt: skip

    server = ManagedProcess(
        "mongoeco", build, port or 0, lambda p: f"mongodb://{LOOPBACK}:{p}/", _mongo_ready, MONGO_START_TIMEOUT,
        env=_child_env(),
    )  # fmt: skip
    return server.start()


async def _serve_mongo(host: str, port: int, data_dir: str | None) -> None:
    # Imported here: only the server process needs mongoeco, and importing it costs start-up time.
    from mongoeco.engines import MemoryEngine
    from mongoeco.wire import AsyncMongoEcoProxyServer

    from .embedded_store import EmbeddedSQLiteEngine

    if data_dir is not None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        # mongoeco's SQLite engine with its insert path corrected (see embedded_store.py).
        engine = EmbeddedSQLiteEngine(str(Path(data_dir) / SQLITE_FILENAME))
    else:
        engine = MemoryEngine()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers go in before start(), so a SIGTERM during start-up still ends in a clean close().
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = AsyncMongoEcoProxyServer(engine=engine, host=host, port=port)
    address = await server.start()
    try:
        print(f"{READY_PREFIX}mongodb://{address.host}:{address.port}", flush=True)
        await stopping.wait()
    finally:
        # Closes the listener and the engine (SQLite commits and closes its file).
        await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: `mongo` runs the MongoDB-wire server in the foreground until SIGTERM/SIGINT; exits 0 then."""
    parser = argparse.ArgumentParser(prog="python -m devtools.servers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mongo = commands.add_parser("mongo", help="run the mongoeco MongoDB-wire server")
    # No authentication on these servers, so listening anywhere but loopback is refused outright.
    mongo.add_argument("--host", default=LOOPBACK, choices=[LOOPBACK])
    mongo.add_argument("--port", type=int, default=0, help="0 picks a free port (reported on the ready line)")
    storage = mongo.add_mutually_exclusive_group()
    storage.add_argument("--data-dir", help=f"persist in DIR/{SQLITE_FILENAME} (SQLite engine)")
    storage.add_argument("--memory", action="store_true", help="keep data in memory (the default)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve_mongo(args.host, args.port, args.data_dir))
    except OSError as exc:
        print(f"mongoeco could not listen on {args.host}:{args.port}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
