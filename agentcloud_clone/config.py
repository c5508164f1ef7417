"""Configuration: one object, read from the environment, overridable by a mapping."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(RuntimeError):
    """The configuration cannot start the app; the message says what to set."""


def _env_float(name: str, default: float, low: float, high: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _env_int(name: str, default: int, low: int = 0, high: int = 2**31) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if not raw.strip().isascii() or not raw.strip().lstrip("-").isdigit():
        raise ConfigError(f"{name} must be an integer, got {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (os.environ.get(name) or default).strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _dev_secret_key(var_dir: Path) -> str:
    """Generate the development secret once and keep it, so sign-ins survive restarts."""
    path = var_dir / "secret_key"
    if path.exists():
        return path.read_text().strip()
    var_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    path.write_text(key)
    path.chmod(0o600)
    return key


def _make_run_servers(var_dir: Path) -> dict[str, str]:
    """MONGO_URI and REDIS_URL as a running `make run` recorded them in VAR_DIR/run.json, so the admin CLI reaches
    its servers with no set-up. Empty when there is no record or its pid is not alive; the environment wins."""
    try:
        record = json.loads((var_dir / "run.json").read_text())
        os.kill(int(record["pid"]), 0)
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    return {name: record[name] for name in ("MONGO_URI", "REDIS_URL") if isinstance(record.get(name), str)}


class Config:
    """Every setting the app, the workers and the CLI read, with its environment variable."""

    # Bounds on the cancel poll interval; outside them the worker either hammers MongoDB or reacts late.
    POLL_INTERVAL_BOUNDS = (0.05, 5.0)

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        env = os.environ.get("AGENTCLOUD_ENV", "development").lower()
        var_dir = Path(os.environ.get("VAR_DIR", PROJECT_ROOT / "var"))
        redis_prefix = os.environ.get("REDIS_PREFIX", "agentcloud")
        make_run = _make_run_servers(var_dir)
        values: dict[str, Any] = {
            "ENV": env,
            "VAR_DIR": str(var_dir),
            "SECRET_KEY": os.environ.get("SECRET_KEY"),
            # Earlier SECRET_KEYs, still accepted for sign-in cookies and sealed secrets while rotating.
            "SECRET_KEY_FALLBACKS": _env_list("SECRET_KEY_FALLBACKS", ""),
            "MONGO_URI": os.environ.get("MONGO_URI", make_run.get("MONGO_URI", "mongodb://127.0.0.1:27017/agentcloud")),
            "REDIS_URL": os.environ.get("REDIS_URL", make_run.get("REDIS_URL", "redis://127.0.0.1:6379/0")),
            # Namespaces this deployment's metrics and cancel channel on a shared Redis.
            "REDIS_PREFIX": redis_prefix,
            # Seconds a Redis command or a MongoDB operation may take before the server counts as unavailable: the
            # request answers 503 and this process fails fast until the server answers a probe again.
            "REDIS_TIMEOUT": _env_float("REDIS_TIMEOUT", 1.0, 0.05, 60.0),
            "MONGO_TIMEOUT": _env_float("MONGO_TIMEOUT", 1.0, 0.05, 120.0),
            # MongoDB commands slower than this (milliseconds) are logged with their collection; 0 logs none.
            "SLOW_COMMAND_MS": _env_float("SLOW_COMMAND_MS", 500.0, 0.0, 600_000.0),
            # A deleted session stays a tombstone this long before the reaper purges it (and anything written to it
            # since); a write that took longer than half of this checks its session afterwards (services.sessions).
            "TOMBSTONE_GRACE": _env_float("TOMBSTONE_GRACE", 60.0, 0.0, 86400.0),
            # An Idempotency-Key whose request never finished (its process died) is put right after this long.
            "IDEMPOTENCY_STALE_AFTER": _env_float("IDEMPOTENCY_STALE_AFTER", 300.0, 1.0, 86400.0),
            # The reaper looks this far back for transcript writes whose second half never landed, leaving alone
            # those younger than REPAIR_SETTLE (their writer may still be on its way).
            "REPAIR_WINDOW": _env_float("REPAIR_WINDOW", 900.0, 10.0, 7 * 86400.0),
            "REPAIR_SETTLE": _env_float("REPAIR_SETTLE", 5.0, 0.0, 3600.0),
            "CANCEL_POLL_INTERVAL": _env_float("CANCEL_POLL_INTERVAL", 1.0, *self.POLL_INTERVAL_BOUNDS),
            "CANCEL_PUBSUB": _env_bool("CANCEL_PUBSUB", True),
            "HEARTBEAT_INTERVAL": _env_float("HEARTBEAT_INTERVAL", 5.0, 0.05, 300.0),
            "HEARTBEAT_TIMEOUT": _env_float("HEARTBEAT_TIMEOUT", 30.0, 0.5, 3600.0),
            "REAPER_INTERVAL": _env_float("REAPER_INTERVAL", 10.0, 0.1, 3600.0),
            # A worker silent this long no longer counts as alive for /readyz.
            "WORKER_STALE_AFTER": _env_float("WORKER_STALE_AFTER", 15.0, 1.0, 3600.0),
            # /readyz fails while no worker is alive (set false for web-only deployments that queue elsewhere).
            "REQUIRE_WORKERS": _env_bool("REQUIRE_WORKERS", True),
            # Web processes run the reaper too, so stuck sessions end even with every worker gone.
            "WEB_REAPER": _env_bool("WEB_REAPER", True),
            # A turn waiting this long with no job in the queue is queued again by the reaper.
            "REQUEUE_AFTER": _env_float("REQUEUE_AFTER", 60.0, 1.0, 86400.0),
            "TURN_TIMEOUT": _env_int("TURN_TIMEOUT", 600, 1, 7 * 24 * 3600),
            "TURN_MAX_OUTPUT_CHARS": _env_int("TURN_MAX_OUTPUT_CHARS", 2_000_000, 1000, 100_000_000),
            "OUTPUT_FLUSH_INTERVAL": _env_float("OUTPUT_FLUSH_INTERVAL", 0.25, 0.01, 5.0),
            # Seconds a process may keep what a sign-in or API-key lookup read while no credential changed (every
            # change is seen at once through Redis: credentials.py); 0 reads MongoDB on every request.
            "AUTH_CACHE_SECONDS": _env_float("AUTH_CACHE_SECONDS", 10.0, 0.0, 3600.0),
            "TURN_QUEUE": os.environ.get("TURN_QUEUE", "turns"),
            # Webhooks: deliveries retried after these many seconds (at least a day in all), https only in
            # production, and never to loopback or private addresses unless allowed (for receivers on a LAN).
            "WEBHOOK_RETRY_INTERVALS": _env_list(
                "WEBHOOK_RETRY_INTERVALS", "5,30,120,600,1800,3600,7200,14400,28800,36000,36000"
            ),
            # How long a queued delivery is left to its job (RQ's job timeout is 60 s) before the reaper takes the
            # job for lost and queues the delivery again.
            "WEBHOOK_LEASE": _env_float("WEBHOOK_LEASE", 120.0, 0.1, 86400.0),
            "WEBHOOK_REQUIRE_HTTPS": _env_bool("WEBHOOK_REQUIRE_HTTPS", env == "production"),
            "WEBHOOK_ALLOW_PRIVATE": _env_bool("WEBHOOK_ALLOW_PRIVATE", False),
            # Workers: `thread` runs up to TURN_CONCURRENCY turns in one process; `fork` one per forked process.
            "WORKER_MODE": _env_choice("WORKER_MODE", "thread", ("thread", "fork")),
            "TURN_CONCURRENCY": _env_int("TURN_CONCURRENCY", 20, 1, 1000),
            # Thread mode: slots of a worker process that only webhook deliveries use, so a delivery never waits
            # behind turns (its queue is also served first).
            "WEBHOOK_CONCURRENCY": _env_int("WEBHOOK_CONCURRENCY", 8, 0, 100),
            # Thread mode, on SIGTERM: seconds running turns may still finish, then seconds an interrupted turn may
            # take to stop. An interrupted turn is queued again (another worker runs it from the user's message)
            # at most TURN_SHUTDOWN_RETRIES times; after that its session ends `worker_lost`.
            "WORKER_SHUTDOWN_GRACE": _env_float("WORKER_SHUTDOWN_GRACE", 20.0, 0.0, 3600.0),
            "WORKER_INTERRUPT_GRACE": _env_float("WORKER_INTERRUPT_GRACE", 5.0, 0.1, 600.0),
            "TURN_SHUTDOWN_RETRIES": _env_int("TURN_SHUTDOWN_RETRIES", 2, 0, 100),
            # A team's turns queued or running at once, whatever its backlog (the rest wait their turn).
            "TEAM_MAX_ACTIVE_TURNS": _env_int("TEAM_MAX_ACTIVE_TURNS", 8, 1, 10_000),
            # Modules `python` runner callables may come from; anything else is refused when an app is saved
            # and again when a turn runs.
            "PYTHON_RUNNER_MODULES": _env_list("PYTHON_RUNNER_MODULES", "agentcloud_clone.examples"),
            # Rate limits (web/ratelimits.py reads these; flask-limiter reads the RATELIMIT_* ones itself).
            "CANCEL_RATE_LIMIT": os.environ.get("CANCEL_RATE_LIMIT", "30 per minute"),
            "LOGIN_RATE_LIMIT": os.environ.get("LOGIN_RATE_LIMIT", "10 per minute"),
            "LOGIN_ADDRESS_RATE_LIMIT": os.environ.get("LOGIN_ADDRESS_RATE_LIMIT", "100 per minute"),
            "DEFAULT_RATE_LIMIT": os.environ.get("DEFAULT_RATE_LIMIT", "600 per minute"),
            "BULK_CANCEL_RATE_LIMIT": os.environ.get("BULK_CANCEL_RATE_LIMIT", "10 per minute"),
            # The shared routes under /s/<team>/ (anyone holding a public app's link), per address: every request,
            # and those that start a turn (which costs the team model tokens).
            "SHARE_RATE_LIMIT": os.environ.get("SHARE_RATE_LIMIT", "300 per minute"),
            "SHARE_START_RATE_LIMIT": os.environ.get("SHARE_START_RATE_LIMIT", "10 per minute"),
            "RATELIMIT_ENABLED": _env_bool("RATELIMIT_ENABLED", True),
            "RATELIMIT_HEADERS_ENABLED": True,
            # When Redis is unreachable the limiter keeps serving, counting in process memory meanwhile.
            "RATELIMIT_SWALLOW_ERRORS": True,
            "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True,
            # web/ratelimits.py gives the limiter connections that skip Redis while it is known to be away.
            "RATELIMIT_STORAGE_OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
            "MAX_CONTENT_LENGTH": _env_int("MAX_CONTENT_LENGTH", 1024 * 1024, 1024, 1024**3),
            # werkzeug's password hashing; tests use a cheap method, production keeps the strong default.
            "PASSWORD_HASH_METHOD": os.environ.get("PASSWORD_HASH_METHOD", "scrypt"),
            "SESSION_COOKIE_SECURE": _env_bool("SESSION_COOKIE_SECURE", False),
            "SESSION_COOKIE_HTTPONLY": True,
            "SESSION_COOKIE_SAMESITE": "Lax",
            "REMEMBER_COOKIE_HTTPONLY": True,
            "REMEMBER_COOKIE_SAMESITE": "Lax",
            "TRUSTED_ORIGINS": [o for o in os.environ.get("TRUSTED_ORIGINS", "").split(",") if o],
            # Proxies in front of the web app whose X-Forwarded-For / -Proto are believed (0: none are sent).
            "TRUSTED_PROXY_HOPS": _env_int("TRUSTED_PROXY_HOPS", 0, 0, 10),
            "OPENAI_BASE_URL": os.environ.get("OPENAI_BASE_URL"),
            "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY"),
            # An app's own baseUrl may name loopback or private addresses (models on the operator's LAN).
            "UPSTREAM_ALLOW_PRIVATE": _env_bool("UPSTREAM_ALLOW_PRIVATE", False),
            "METRICS_TOKEN": os.environ.get("METRICS_TOKEN") or None,
            # Live streams: a comment line this often, and at most this many open per web process.
            "SSE_HEARTBEAT": _env_float("SSE_HEARTBEAT", 15.0, 0.05, 300.0),
            "MAX_STREAMS_PER_PROCESS": _env_int("MAX_STREAMS_PER_PROCESS", 1000, 1, 100_000),
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO").upper(),
            "LOG_FORMAT": os.environ.get("LOG_FORMAT", "json").lower(),
            "TESTING": False,
        }
        values.update(overrides or {})
        if not values["SECRET_KEY"]:
            if values["ENV"] == "production":
                raise ConfigError(
                    "SECRET_KEY is not set. Production needs a fixed secret, e.g. "
                    "SECRET_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')"
                )
            values["SECRET_KEY"] = _dev_secret_key(Path(values["VAR_DIR"]))
        values.setdefault("WEBHOOK_QUEUE", os.environ.get("WEBHOOK_QUEUE") or f"{values['TURN_QUEUE']}.webhooks")
        # Limiter counters are namespaced per deployment like everything else this app keeps in Redis.
        values.setdefault(
            "RATELIMIT_KEY_PREFIX", os.environ.get("RATELIMIT_KEY_PREFIX") or f"{values['REDIS_PREFIX']}:rl"
        )
        values.setdefault("RATELIMIT_STORAGE_URI", values["REDIS_URL"])
        # "Keep me signed in" cookies travel only where the session cookie may (flask-login's default is never Secure).
        values.setdefault("REMEMBER_COOKIE_SECURE", values["SESSION_COOKIE_SECURE"])
        values.setdefault("RATELIMIT_DEFAULT", values["DEFAULT_RATE_LIMIT"])
        low, high = self.POLL_INTERVAL_BOUNDS
        if not low <= float(values["CANCEL_POLL_INTERVAL"]) <= high:
            raise ConfigError(f"CANCEL_POLL_INTERVAL must be between {low} and {high} seconds")
        self.values = values

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain mapping for `app.config.update`."""
        return dict(self.values)
