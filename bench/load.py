"""HTTP load generation: wrk with a Lua script when it is installed, a Python thread pool otherwise.

Both run a closed loop (each connection sends its next request when the last one is answered) for a fixed
time and report requests per second and latency percentiles in seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from .stats import percentile

# wrk's `done` hook prints one line the bench parses; latencies are in microseconds there.
_WRK_SCRIPT = """
local paths = {%(paths)s}
local counter = 0
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  counter = id
end

function request()
  local path = paths[(counter %% #paths) + 1]
  counter = counter + %(threads)d
  return wrk.format("%(method)s", path, {%(headers)s})
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %%d, "duration_us": %%d, "connect_errors": %%d, "read_errors": %%d, ' ..
    '"write_errors": %%d, "status_errors": %%d, "timeouts": %%d, "p50_us": %%d, "p95_us": %%d, ' ..
    '"p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


@dataclass
class LoadResult:
    """What one load run measured; `errors` counts non-2xx/3xx answers and socket errors."""

    generator: str
    requests: int
    seconds: float
    errors: int
    p50: float
    p95: float
    p99: float
    max: float

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        """The result with the rate, for the JSON report."""
        return {**asdict(self), "requests_per_s": self.rate}


def wrk_version() -> str | None:
    """wrk's version line, or None when wrk is not installed."""
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip()


def run_wrk(
    base_url: str,
    method: str,
    paths: list[str],
    api_key: str | None,
    seconds: float,
    connections: int,
    threads: int,
) -> LoadResult:
    """One wrk run over `paths` round-robin (each wrk thread takes its own stride of them)."""
    script = _WRK_SCRIPT % {
        "paths": ", ".join(json.dumps(p) for p in paths),
        "threads": threads,
        "method": method,
        "headers": f'["Authorization"] = "Bearer {api_key}"' if api_key else "",
    }
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp, "bench.lua")
        lua.write_text(script)
        args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(lua)]
        out = subprocess.run([*args, base_url + paths[0]], capture_output=True, text=True, check=True, timeout=60)
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH "))
    data = json.loads(line[len("BENCH ") :])
    errors = sum(data[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return LoadResult(
        generator="wrk",
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        errors=int(errors),
        p50=data["p50_us"] / 1e6,
        p95=data["p95_us"] / 1e6,
        p99=data["p99_us"] / 1e6,
        max=data["max_us"] / 1e6,
    )


def run_python(
    base_url: str, method: str, paths: list[str], api_key: str | None, seconds: float, connections: int
) -> LoadResult:
    """The same closed loop from `connections` threads, each with its own keep-alive connection."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    start = threading.Barrier(connections + 1)
    deadline = 0.0

    def loop(index: int) -> None:
        nonlocal errors
        http = requests.Session()
        if api_key:
            http.headers["Authorization"] = f"Bearer {api_key}"
        mine: list[float] = []
        failed, n = 0, index
        start.wait()
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                ok = http.request(method, base_url + paths[n % len(paths)], timeout=5).status_code < 400
            except requests.RequestException:
                ok = False
            mine.append(time.monotonic() - sent)
            failed += not ok
            n += connections
        with lock:
            latencies.extend(mine)
            errors += failed

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(connections)]
    for worker in workers:
        worker.start()
    began = time.monotonic()
    deadline = began + seconds
    start.wait()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - began
    return LoadResult(
        generator="python",
        requests=len(latencies),
        seconds=elapsed,
        errors=errors,
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        p99=percentile(latencies, 99),
        max=max(latencies, default=0.0),
    )


def run_load(
    base_url: str,
    method: str,
    paths: list[str],
    api_key: str | None,
    *,
    seconds: float,
    connections: int,
    threads: int,
) -> LoadResult:
    """wrk when installed, the Python loop otherwise; `api_key` None sends no Authorization header."""
    if wrk_version() is not None:
        return run_wrk(base_url, method, paths, api_key, seconds, connections, threads)
    return run_python(base_url, method, paths, api_key, seconds, connections)
