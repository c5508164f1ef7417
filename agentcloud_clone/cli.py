"""Admin commands; each prints JSON on stdout so scripts can use it."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import click
import pymongo
from flask import Flask, current_app
from flask.cli import AppGroup
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError

from .access import ROLES, parse_id
from .db import LONG_OPERATION, ensure_indexes_once
from .errors import DomainError, InvalidInput, NotFound
from .jobs.reaper import reap_once
from .repositories import accounts as accounts_repo
from .repositories import apps as apps_repo
from .sealing import reseal_all
from .services import accounts as accounts_service
from .services import apps as apps_service
from .vocabulary import RUNNER_NAMES, Runner
from .web.errors import status_for

users_cli = AppGroup("users", help="Manage user accounts.")
teams_cli = AppGroup("teams", help="Manage teams and their members.")
apikeys_cli = AppGroup("apikeys", help="Manage API keys.")
apps_cli = AppGroup("apps", help="Manage apps (agent configurations).")
queues_cli = AppGroup("queues", help="The RQ queues, through RQ's own tools (for operators).")

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"
DEMO_TEAM = "Demo team"


def _emit(payload: dict[str, Any]) -> None:
    click.echo(json.dumps(payload, default=str))


def _fail(message: str, code: int, errors: Any = None) -> None:
    body: dict[str, Any] = {"message": message, "code": code}
    if errors:
        body["errors"] = errors
    click.echo(json.dumps(body, default=str), err=True)
    sys.exit(1)


def _unreachable(server: str, uri: str, variable: str) -> str:
    """What to say when a server does not answer: where it was looked for (without credentials) and what to do."""
    parts = urlsplit(uri)
    where = f"{parts.hostname or ''}:{parts.port}" if parts.port else (parts.hostname or uri.split("://")[0])
    return f"{server} is unreachable at {where}: start `make run`, or set {variable}."


def _reports_errors(command: Callable[..., Any], *, deadline: float | None = LONG_OPERATION) -> Callable[..., Any]:
    """A domain error, or a server that cannot be reached, is one `{message, code}` line on stderr, exit 1.

    Once MongoDB has answered (the index check pings it first, with a short timeout), the command has `deadline`
    to finish: an admin on a busy store waits, where the API's MONGO_TIMEOUT (1 s by default, for requests that
    must not queue) would call a merely slow store unreachable. None: the command bounds its own steps."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            ensure_indexes_once(current_app._get_current_object())  # type: ignore[attr-defined]
            with pymongo.timeout(deadline) if deadline is not None else contextlib.nullcontext():
                return command(*args, **kwargs)
        except DomainError as exc:
            _fail(exc.message, status_for(exc), exc.errors)
        except PyMongoError:
            _fail(_unreachable("MongoDB", current_app.config["MONGO_URI"], "MONGO_URI"), 503)
        except RedisError:
            _fail(_unreachable("Redis", current_app.config["REDIS_URL"], "REDIS_URL"), 503)

    return wrapper


def _team(value: str | None) -> dict[str, Any]:
    return accounts_service.get_team(parse_id(value, "team"))


def create_user(email: str, password: str, name: str | None, team_name: str | None, role: str) -> dict[str, str | None]:
    """An account, optionally on a team (created with its org when new), as the CLI reports it."""
    account = accounts_service.create_account(email, password, name)
    result = {"accountId": str(account["_id"]), "orgId": None, "teamId": None}
    if team_name:
        team = accounts_service.ensure_team(team_name)
        accounts_service.add_member(team["_id"], email, role)
        result.update(orgId=str(team["orgId"]), teamId=str(team["_id"]))
    return result


@users_cli.command("create")
@click.argument("email")
@click.option("--password", required=True, help="At least 8 characters.")
@click.option("--name", default=None)
@click.option("--team", "team_name", default=None, help="Team name; created with its org when new.")
@click.option("--role", type=click.Choice(ROLES), default="owner", show_default=True)
@_reports_errors
def users_create(email: str, password: str, name: str | None, team_name: str | None, role: str) -> None:
    """Create an account → {"accountId", "orgId", "teamId"}."""
    _emit(create_user(email, password, name, team_name, role))


@teams_cli.command("add-member")
@click.argument("team_id")
@click.argument("email")
@click.option("--role", type=click.Choice(ROLES), required=True)
@_reports_errors
def teams_add_member(team_id: str, email: str, role: str) -> None:
    """Give an existing account a role on a team, or change its role there."""
    account = accounts_service.add_member(_team(team_id)["_id"], email, role)
    _emit({"accountId": str(account["_id"]), "teamId": team_id, "role": role})


@teams_cli.command("remove-member")
@click.argument("team_id")
@click.argument("email")
@_reports_errors
def teams_remove_member(team_id: str, email: str) -> None:
    """Take an account off a team; its next request no longer reaches the team."""
    team = _team(team_id)
    account = accounts_repo.find_account_by_email(email)
    if account is None:
        raise NotFound(f"No account with email {email}.")
    accounts_service.remove_member(team["_id"], account)
    _emit({"accountId": str(account["_id"]), "teamId": team_id, "removed": True})


@teams_cli.command("set-turn-slots")
@click.argument("team_id")
@click.argument("slots", type=click.IntRange(1, 10_000), required=False)
@click.option("--default", "use_default", is_flag=True, help="Go back to TEAM_MAX_ACTIVE_TURNS.")
@_reports_errors
def teams_set_turn_slots(team_id: str, slots: int | None, use_default: bool) -> None:
    """How many of the team's turns may hold the workers at once (fair scheduling); an operator's setting that
    team admins cannot change. Takes effect within 30 s in every process."""
    if (slots is None) == (not use_default):
        raise InvalidInput("Give the number of slots, or --default.")
    team = accounts_service.set_team_turn_slots(_team(team_id)["_id"], None if use_default else slots)
    _emit({"teamId": team_id, "maxActiveTurns": team.get("maxActiveTurns")})


@teams_cli.command("members")
@click.argument("team_id")
@_reports_errors
def teams_members(team_id: str) -> None:
    """List a team's members and their roles."""
    members = accounts_service.team_members(_team(team_id)["_id"])
    _emit({"members": [{"accountId": str(m["_id"]), "email": m["email"], "role": m["role"]} for m in members]})


@apikeys_cli.command("create")
@click.argument("email")
@click.option("--name", default="CLI key")
@_reports_errors
def apikeys_create(email: str, name: str) -> None:
    """Create an API key for an account → {"id", "key"} (the key is shown only now)."""
    account = accounts_repo.find_account_by_email(email)
    if account is None:
        raise NotFound(f"No account with email {email}.")
    record, key = accounts_service.create_api_key(account["_id"], name)
    _emit({"id": str(record["_id"]), "key": key})


@apps_cli.command("create")
@click.argument("team_id")
@click.option("--name", required=True)
@click.option("--runner", type=click.Choice(RUNNER_NAMES), default=Runner.SCRIPTED.value, show_default=True)
@click.option("--config", "config_json", default="{}", help="Runner settings as a JSON object.")
@_reports_errors
def apps_create(team_id: str, name: str, runner: str, config_json: str) -> None:
    """Create an app in a team → {"appId"}."""
    team = _team(team_id)
    try:
        config = json.loads(config_json)
    except ValueError:
        raise InvalidInput("--config must be a JSON object.") from None
    if not isinstance(config, dict):
        raise InvalidInput("--config must be a JSON object.")
    app = apps_service.create_app_record(team, name, runner, config, None)
    _emit({"appId": str(app["_id"])})


def seed_demo() -> dict[str, str | None]:
    """The demo user, team, scripted app and API key; reuses them when they exist."""
    account = accounts_repo.find_account_by_email(DEMO_EMAIL)
    if account is None:
        ids = create_user(DEMO_EMAIL, DEMO_PASSWORD, "Demo user", DEMO_TEAM, "owner")
    else:
        team = accounts_service.ensure_team(DEMO_TEAM)
        accounts_service.add_member(team["_id"], DEMO_EMAIL, "owner")
        ids = {"accountId": str(account["_id"]), "orgId": str(team["orgId"]), "teamId": str(team["_id"])}
    team = _team(ids["teamId"])
    existing = [a for a in apps_repo.list_apps(team["_id"]) if a["name"] == "Scripted demo agent"]
    app = (
        existing[0]
        if existing
        else apps_service.create_app_record(
            team, "Scripted demo agent", Runner.SCRIPTED, {"steps": 20, "stepDelay": 0.3}, None
        )
    )
    record, key = accounts_service.create_api_key(parse_id(ids["accountId"], "account"), "demo key")
    return {
        **ids,
        "appId": str(app["_id"]),
        "email": DEMO_EMAIL,
        "password": DEMO_PASSWORD,
        "apiKeyId": str(record["_id"]),
        "apiKey": key,
    }


def _queue_names() -> list[str]:
    return [current_app.config["TURN_QUEUE"], current_app.config["WEBHOOK_QUEUE"]]


def _run_tool(name: str, args: list[str], env: dict[str, str]) -> None:
    """Replace this process with one of RQ's tools from this environment, the Redis URL passed in `env` (not on
    the command line, where `ps` would show its password)."""
    tool = os.path.join(os.path.dirname(sys.executable), name)
    if not os.access(tool, os.X_OK):
        _fail(f"`{name}` is not installed here: `pip install '.[ops]'` (make install does).", 503)
    # Not flask's own markers: rq-dashboard is a Flask app too, and would take itself for a `flask` command.
    inherited = {k: v for k, v in os.environ.items() if k not in ("FLASK_RUN_FROM_CLI", "FLASK_APP")}
    os.execve(tool, [tool, *args], {**inherited, **env})


@queues_cli.command("list")
def queues_list() -> None:
    """The product's queues and the Redis they live in (without its credentials) → {"queues", "redis"}."""
    parts = urlsplit(current_app.config["REDIS_URL"])
    _emit({"queues": _queue_names(), "redis": f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"})


@queues_cli.command("info", context_settings={"ignore_unknown_options": True})
@click.argument("rq_args", nargs=-1, type=click.UNPROCESSED)
def queues_info(rq_args: tuple[str, ...]) -> None:
    """`rq info` for the product's queues and workers; further options go to rq (e.g. `--interval 1`)."""
    _run_tool("rq", ["info", *rq_args, *_queue_names()], {"RQ_REDIS_URL": current_app.config["REDIS_URL"]})


@queues_cli.command("dashboard")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9181, show_default=True)
@click.option("--allow-delete", is_flag=True, help="Let the dashboard delete jobs and empty registries.")
def queues_dashboard(bind: str, port: int, allow_delete: bool) -> None:
    """rq-dashboard on this Redis. It shows every team's jobs and can act on them, so it is for operators: it
    listens on loopback unless RQ_DASHBOARD_USERNAME and RQ_DASHBOARD_PASSWORD (HTTP basic auth) are set."""
    try:
        loopback = ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = bind == "localhost"
    if not loopback and not (os.environ.get("RQ_DASHBOARD_USERNAME") and os.environ.get("RQ_DASHBOARD_PASSWORD")):
        _fail("Listening beyond loopback needs RQ_DASHBOARD_USERNAME and RQ_DASHBOARD_PASSWORD set.", 400)
    args = ["--bind", bind, "--port", str(port)] + ([] if allow_delete else ["--disable-delete"])
    _run_tool("rq-dashboard", args, {"RQ_DASHBOARD_REDIS_URL": current_app.config["REDIS_URL"]})


def init_app(app: Flask) -> None:
    """Register the command groups."""
    for group in (users_cli, teams_cli, apikeys_cli, apps_cli, queues_cli):
        app.cli.add_command(group)

    @app.cli.command("seed-demo")
    @_reports_errors
    def seed_demo_command() -> None:
        """Create (or reuse) the demo user, team, app and a fresh API key."""
        _emit(seed_demo())

    @app.cli.command("reseal-secrets")
    @_reports_errors
    def reseal_secrets_command() -> None:
        """Seal every stored app key and webhook secret under the current SECRET_KEY (after a rotation, with the
        old key in SECRET_KEY_FALLBACKS) → {"resealed", "unreadable"}."""
        _emit(reseal_all(current_app.config))

    @app.cli.command("reap")
    @click.option("--timeout", type=float, default=None, help="Heartbeat age in seconds (default HEARTBEAT_TIMEOUT).")
    @click.option("--loop", is_flag=True, help="Keep reaping every REAPER_INTERVAL until stopped.")
    # Each step of a pass has LONG_OPERATION of its own (services.sessions.sweep), and `--loop` runs until stopped.
    @functools.partial(_reports_errors, deadline=None)
    def reap_command(timeout: float | None, loop: bool) -> None:
        """One reaper pass → {"reaped": [...], "expired": [...], "unanswered": [...], "requeued": [...]} (session
        ids): sessions whose worker was lost, sessions ended by a limit, sessions whose create answered an error
        removed, turns queued again. `--loop` keeps going (one line a pass)."""
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        while True:
            _emit(reap_once(app, timeout))
            if not loop:
                return
            time.sleep(float(app.config["REAPER_INTERVAL"]))
