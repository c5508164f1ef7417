"""`make run`: the whole product on loopback with embedded defaults.

Starts a MongoDB-wire server (data under var/mongo) and redis-server unless MONGO_URI / REDIS_URL are set,
seeds the demo, starts one worker, and serves the web app until Ctrl-C. Prints the URL and the demo login.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agentcloud_clone.config import PROJECT_ROOT

from .servers import ManagedProcess, start_mongo, start_redis


def _stop_on_sigterm(*_: object) -> None:
    """SIGTERM stops everything the same way Ctrl-C does."""
    raise KeyboardInterrupt


def main() -> int:
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "5000"))
    var_dir = Path(os.environ.get("VAR_DIR", PROJECT_ROOT / "var"))
    var_dir.mkdir(parents=True, exist_ok=True)
    started: list[ManagedProcess | subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    try:
        if not env.get("MONGO_URI"):
            mongo = start_mongo(int(env.get("MONGO_PORT", "27018")), data_dir=str(var_dir / "mongo"))
            started.append(mongo)
            env["MONGO_URI"] = mongo.url.rstrip("/") + "/agentcloud"
        if not env.get("REDIS_URL"):
            redis = start_redis(int(env.get("REDIS_PORT", "6380")), data_dir=str(var_dir / "redis"))
            started.append(redis)
            env["REDIS_URL"] = redis.url
        seed = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app", "seed-demo"],
            env=env,
            cwd=PROJECT_ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        demo = json.loads(seed.stdout.strip().splitlines()[-1])
        started.append(subprocess.Popen([sys.executable, "-m", "workers"], env=env, cwd=PROJECT_ROOT))
        web = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"{host}:{port}",
                "--workers",
                "2",
                "--threads",
                "4",
                "--access-logfile",
                "-",
                "app:app",
            ],
            env=env,
            cwd=PROJECT_ROOT,
        )
        started.append(web)
        time.sleep(1.0)
        print(
            f"\n  agentcloud_clone is running at http://{host}:{port}/\n"
            f"  sign in as {demo['email']} / {demo['password']}\n"
            f"  API key (shown once): {demo['apiKey']}\n"
            f"  team id: {demo['teamId']}   demo app id: {demo['appId']}\n"
            f"  MongoDB: {env['MONGO_URI']}   Redis: {env['REDIS_URL']}\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        web.wait()
    except KeyboardInterrupt:
        pass
    except subprocess.CalledProcessError as exc:
        print(f"seeding the demo failed:\n{exc.stderr}", file=sys.stderr)
        return 1
    finally:
        for process in reversed(started):
            if isinstance(process, ManagedProcess):
                process.stop()
            elif process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
