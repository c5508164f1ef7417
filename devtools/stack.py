"""The product as separate processes on loopback: gunicorn web instances and `python -m workers`.

Used by the integration, browser and contract tests and by the benchmarks; each Stack gets its own
database, queue and rate-limit prefix on the shared servers, and its processes' logs under test-artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from .servers import free_port

ROOT = Path(__file__).resolve().parents[1]


class Stack:
    """Web instances and workers sharing one MongoDB database and one Redis."""

    def __init__(self, mongo_url: str, redis_url: str, **settings: Any) -> None:
        tag = uuid.uuid4().hex[:10]
        self.env = {
            **os.environ,
            "MONGO_URI": mongo_url.rstrip("/") + f"/it_{tag}",
            "REDIS_URL": redis_url,
            "TURN_QUEUE": f"turns-{tag}",
            "SECRET_KEY": "integration-secret",
            "RATELIMIT_KEY_PREFIX": f"rl-{tag}",
            "REDIS_PREFIX": f"ac-{tag}",
            "PYTHONUNBUFFERED": "1",
            **{key: str(value) for key, value in settings.items()},
        }
        self.webs: list[tuple[subprocess.Popen[bytes], str]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.spawned: list[subprocess.Popen[bytes]] = []
        self.demo: dict[str, str] = {}
        self.logs = Path(ROOT, "test-artifacts", "integration", tag)
        self.logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / log_name, "ab")  # noqa: SIM115 - kept open for the child's lifetime (appended: restarts)
        # Own process group, so a kill takes the worker's forked job process with it (a lost machine).
        process = subprocess.Popen(
            args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.spawned.append(process)
        return process

    def cli(self, *args: str) -> dict[str, Any]:
        """Run an admin command against this stack's servers; its JSON answer (RuntimeError with its stderr)."""
        out = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"flask {' '.join(args[:2])} failed: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def spawn_web(self, port: int) -> subprocess.Popen[bytes]:
        """Launch a web instance (gunicorn, gevent workers) on `port` without waiting for it."""
        return self._spawn(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-b",
                f"127.0.0.1:{port}",
                "-w",
                "2",
                # The serving model of production: gevent workers, so open live streams cost greenlets.
                "-k",
                "gevent",
                "--worker-connections",
                "1000",
                "--graceful-timeout",
                "5",
                "--no-control-socket",
                "app:app",
            ],
            f"web-{port}.log",
        )

    def wait_for_web(self, process: subprocess.Popen[bytes], url: str, timeout: float = 30) -> None:
        """Return once the instance answers /healthz; RuntimeError if it exits or does not within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"web app exited with {process.returncode}; see {self.logs}")
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"web app did not start; see {self.logs}")

    def start_web(self, port: int | None = None) -> str:
        port = port or free_port()
        process = self.spawn_web(port)
        url = f"http://127.0.0.1:{port}"
        self.wait_for_web(process, url)
        self.webs.append((process, url))
        return url

    def spawn_worker(self, log_name: str) -> subprocess.Popen[bytes]:
        """Launch a worker (`python -m workers`) logging to `log_name`."""
        return self._spawn([sys.executable, "-m", "workers"], log_name)

    def start_worker(self) -> subprocess.Popen[bytes]:
        process = self.spawn_worker(f"worker-{len(self.workers)}.log")
        self.workers.append(process)
        return process

    def start(self, webs: int = 1, workers: int = 1) -> Stack:
        self.demo = self.cli("seed-demo")
        for _ in range(webs):
            self.start_web()
        for _ in range(workers):
            self.start_worker()
        return self

    @property
    def url(self) -> str:
        return self.webs[0][1]

    def api(self, method: str, path: str, body: Any = None, url: str | None = None) -> requests.Response:
        """A request with the demo user's API key."""
        headers = {"Authorization": f"Bearer {self.demo['apiKey']}"}
        return requests.request(method, f"{url or self.url}{path}", json=body, headers=headers, timeout=10)

    @staticmethod
    def kill(process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and its group, as a lost machine would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        """Stop every process this stack spawned, including any that never became ready."""
        for process in self.spawned:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(process)
