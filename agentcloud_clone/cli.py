"""Admin commands; each prints JSON on stdout so scripts can use it."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import click
import pymongo
import redis
from flask import Flask, current_app
from flask.cli import AppGroup
from pymongo.errors import ConnectionFailure

from .permissions import ROLES
from .repositories import accounts as accounts_repo
from .responses import ApiError
from .schemas import parse_object_id
from .services import accounts as accounts_service
from .services import apps as apps_service

users_cli = AppGroup("users", help="Manage user accounts.")
teams_cli = AppGroup("teams", help="Manage teams and their members.")
apikeys_cli = AppGroup("apikeys", help="Manage API keys.")
apps_cli = AppGroup("apps", help="Manage apps (agent configurations).")

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password"
DEMO_TEAM = "Demo team"


def _emit(payload: dict[str, Any]) -> None:
    click.echo(json.dumps(payload, default=str))


def _unreachable(server: str, variable: str) -> ApiError:
    """A 503 naming the server a command could not reach and the variable that says where it is."""
    where = re.sub(r"//[^/@]*@", "//", str(current_app.config[variable]))  # no credentials in the message
    return ApiError(503, f"{server} is unreachable at {where}: start `make run`, or set {variable}.")


# How long a command waits for MongoDB before saying it is unreachable (the app itself waits 3 s per query).
CLI_SERVER_TIMEOUT_MS = 1500


def _ping_mongo() -> None:
    """Raise ConnectionFailure soon when MongoDB does not answer, before a command starts its work."""
    uri = current_app.config["MONGO_URI"]
    if uri.startswith("mongomock://"):
        return
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=CLI_SERVER_TIMEOUT_MS, connectTimeoutMS=CLI_SERVER_TIMEOUT_MS
    )
    try:
        client.admin.command("ping")
    finally:
        client.close()


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a service's ApiError, or a MongoDB or Redis that does not answer (503), into one JSON line on
    stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _ping_mongo()
            return command(*args, **kwargs)
        except ApiError as exc:
            error = exc
        except ConnectionFailure:
            error = _unreachable("MongoDB", "MONGO_URI")
        except (redis.ConnectionError, redis.TimeoutError):
            error = _unreachable("Redis", "REDIS_URL")
        click.echo(json.dumps({"message": error.message, "code": error.code, "errors": error.errors}), err=True)
        sys.exit(1)

    return wrapper


def _team_id(value: str) -> Any:
    oid = parse_object_id(value)
    if oid is None:
        raise ApiError(400, "TEAM_ID must be 24 hexadecimal characters.")
    return oid


def create_user(email: str, password: str, name: str | None, team_name: str | None, role: str) -> dict[str, str]:
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
    """Give an existing account a role on a team."""
    account = accounts_service.add_member(_team_id(team_id), email, role)
    _emit({"accountId": str(account["_id"]), "teamId": team_id, "role": role})


@apikeys_cli.command("create")
@click.argument("email")
@click.option("--name", default="CLI key")
@_reports_errors
def apikeys_create(email: str, name: str) -> None:
    """Create an API key for an account → {"id", "key"} (the key is shown only now)."""
    account = accounts_repo.find_account_by_email(email)
    if account is None:
        raise ApiError(404, f"No account with email {email}.")
    record, key = accounts_service.create_api_key(account["_id"], name)
    _emit({"id": str(record["_id"]), "key": key})


@apps_cli.command("create")
@click.argument("team_id")
@click.option("--name", required=True)
@click.option("--runner", type=click.Choice(["scripted", "openai", "python"]), default="scripted", show_default=True)
@click.option("--config", "config_json", default="{}", help="Runner settings as a JSON object.")
@_reports_errors
def apps_create(team_id: str, name: str, runner: str, config_json: str) -> None:
    """Create an app in a team → {"appId"}."""
    team = accounts_repo.find_team(_team_id(team_id))
    if team is None:
        raise ApiError(404, "No such team.")
    try:
        config = json.loads(config_json)
    except ValueError:
        raise ApiError(400, "--config must be a JSON object.") from None
    if not isinstance(config, dict):
        raise ApiError(400, "--config must be a JSON object.")
    app = apps_service.create_app_record(team, name, runner, config, None)
    _emit({"appId": str(app["_id"])})


def seed_demo() -> dict[str, str]:
    """The demo user, team, scripted app and API key; reuses them when they exist."""
    account = accounts_repo.find_account_by_email(DEMO_EMAIL)
    if account is None:
        ids = create_user(DEMO_EMAIL, DEMO_PASSWORD, "Demo user", DEMO_TEAM, "owner")
    else:
        team = accounts_service.ensure_team(DEMO_TEAM)
        accounts_service.add_member(team["_id"], DEMO_EMAIL, "owner")
        ids = {"accountId": str(account["_id"]), "orgId": str(team["orgId"]), "teamId": str(team["_id"])}
    team = accounts_repo.find_team(parse_object_id(ids["teamId"]))
    assert team is not None
    from .repositories import apps as apps_repo

    existing = [a for a in apps_repo.list_apps(team["_id"]) if a["name"] == "Scripted demo agent"]
    app = (
        existing[0]
        if existing
        else apps_service.create_app_record(
            team, "Scripted demo agent", "scripted", {"steps": 20, "stepDelay": 0.3}, None
        )
    )
    record, key = accounts_service.create_api_key(parse_object_id(ids["accountId"]), "demo key")
    return {
        **ids,
        "appId": str(app["_id"]),
        "email": DEMO_EMAIL,
        "password": DEMO_PASSWORD,
        "apiKeyId": str(record["_id"]),
        "apiKey": key,
    }


def init_app(app: Flask) -> None:
    """Register the command groups."""
    for group in (users_cli, teams_cli, apikeys_cli, apps_cli):
        app.cli.add_command(group)

    @app.cli.command("seed-demo")
    @_reports_errors
    def seed_demo_command() -> None:
        """Create (or reuse) the demo user, team, app and a fresh API key."""
        _emit(seed_demo())

    @app.cli.command("reap")
    @click.option("--timeout", type=float, default=None, help="Heartbeat age in seconds (default HEARTBEAT_TIMEOUT).")
    @_reports_errors
    def reap_command(timeout: float | None) -> None:
        """End sessions whose worker was lost → {"reaped": [sessionId, ...]}."""
        from .jobs.turns import reap_lost_turns

        _emit({"reaped": reap_lost_turns(timeout)})
