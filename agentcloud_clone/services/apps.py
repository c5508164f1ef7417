"""Apps: the agent configurations sessions start from. Runner settings are validated when saved, and an app's
upstream key goes only where the app said it goes when the key was entered."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from bson import ObjectId
from flask import current_app
from marshmallow import ValidationError

from .. import destinations
from ..errors import Conflict, InvalidInput, NotFound
from ..repositories import apps as repo
from ..repositories import sessions as sessions_repo
from ..schemas import MASKED_SECRET, validate_runner_config
from ..sealing import is_sealed, seal, unseal
from ..vocabulary import LINK_MODES, RUNNER_NAMES, Runner, SharingMode
from . import sharing


def _checked_config(runner: str, config: dict[str, Any]) -> dict[str, Any]:
    try:
        checked = validate_runner_config(runner, config)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"config": exc.messages}
        raise InvalidInput("Invalid runner settings.", messages) from None
    if runner == Runner.PYTHON:
        try:
            load_runner_callable(checked["callable"], allowed_runner_modules())
        except UnusableCallableError as exc:
            raise InvalidInput("Invalid runner settings.", {"config": {"callable": [str(exc)]}}) from None
    if runner == Runner.OPENAI and checked.get("baseUrl"):
        try:
            upstream_addresses(checked["baseUrl"], current_app.config)
        except destinations.UnresolvableHost:
            pass  # perhaps not from here, or not yet: every turn checks it again
        except InvalidInput as exc:
            raise InvalidInput("Invalid runner settings.", {"config": {"baseUrl": [exc.message]}}) from None
    return checked


def _sealed(config: dict[str, Any]) -> dict[str, Any]:
    """The settings as stored: an upstream key entered now is sealed (see sealing.py)."""
    key = config.get("apiKey")
    if key and key != MASKED_SECRET and not is_sealed(key):
        return {**config, "apiKey": seal(key, current_app.config)}
    return config


def _fits(runner: str, config: dict[str, Any]) -> bool:
    try:
        _checked_config(runner, config)
    except InvalidInput:
        return False
    return True


def module_allowed(target: str, allowed_modules: Sequence[str]) -> bool:
    """Whether `module:function` lies in one of the allowed modules (or their submodules)."""
    module_name = target.partition(":")[0]
    return any(module_name == m or module_name.startswith(f"{m}.") for m in allowed_modules)


class UnusableCallableError(Exception):
    """A `python` runner's `module:function` that this installation will not call (the message says why)."""


def load_runner_callable(target: str, allowed_modules: Sequence[str]) -> Callable[..., Any]:
    """The function `module:function` names: public, defined in that module (not merely imported there, which
    would reach any name an allowed module happens to import), and the module in the operator's allow-list."""
    if not module_allowed(target, allowed_modules):
        raise UnusableCallableError("Not in a module this installation allows (PYTHON_RUNNER_MODULES).")
    module_name, _, function_name = target.partition(":")
    if function_name.startswith("_"):
        raise UnusableCallableError("Name a public function: one whose name does not start with an underscore.")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError):
        raise UnusableCallableError(f"There is no function {function_name!r} in module {module_name!r}.") from None
    if not inspect.isfunction(function) or function.__module__ != module_name:
        raise UnusableCallableError(f"{target!r} is not a function defined in module {module_name!r}.")
    return function


def allowed_runner_modules() -> list[str]:
    """The modules `python` runner callables may come from (the operator's PYTHON_RUNNER_MODULES)."""
    return list(current_app.config["PYTHON_RUNNER_MODULES"])


def create_app_record(
    team: dict[str, Any],
    name: str,
    runner: str,
    config: dict[str, Any],
    created_by: ObjectId | None,
    limits: dict[str, Any] | None = None,
    *,
    sharing_config: dict[str, Any] | None = None,
    required_variables: list[str] | None = None,
) -> dict[str, Any]:
    """Store an app whose runner settings passed validation (limits, sharing and variables are validated by the
    caller's schema). An app shared by link (public, whitelist) gets one: the returned app carries its
    `shareId` this once; only its hash is stored."""
    sharing_config = sharing_config or {"mode": SharingMode.TEAM, "whitelist": []}
    fields: dict[str, Any] = {
        "name": name,
        "runner": runner,
        "config": _sealed(_checked_config(runner, config)),
        "limits": limits or {},
        "createdBy": created_by,
        "sharingConfig": sharing_config,
        "requiredVariables": list(required_variables or []),
    }
    share_id = None
    if sharing_config["mode"] in LINK_MODES:
        fields["shareLink"], share_id = sharing.new_share_link()
    app = repo.insert_app(team, fields)
    return {**app, "shareId": share_id} if share_id else app


def get_app(team_id: ObjectId, app_id: ObjectId) -> dict[str, Any]:
    """The team's app; NotFound when it is not in the team."""
    app = repo.find_app(team_id, app_id)
    if app is None:
        raise NotFound("No such app in this team.")
    return app


def edit_app(team_id: ObjectId, app_id: ObjectId, changes: dict[str, Any]) -> dict[str, Any]:
    """Apply validated changes; the settings are checked against the (possibly new) runner.

    A form shows an upstream key as a mask. Sent back unchanged it keeps the stored key, but only while the
    key still goes to the same address: a new `baseUrl` needs the key entered again, so an admin cannot
    redirect a key they never saw to a server of their choice."""
    current = get_app(team_id, app_id)
    runner = changes.get("runner", current["runner"])
    if "config" in changes or "runner" in changes:
        stored = current.get("config") or {}
        config = dict(changes.get("config", stored))
        if "config" not in changes and runner != current["runner"]:
            config = {}
        moved = config.get("baseUrl") != stored.get("baseUrl") or runner != current["runner"]
        if config.get("apiKey") == MASKED_SECRET and moved:
            raise InvalidInput(
                "Enter the API key again: it would be sent to a different address than the one it was saved for.",
                {"config": {"apiKey": ["Re-enter the key when changing baseUrl."]}},
            )
        try:
            changes["config"] = _checked_config(runner, config)
        except InvalidInput:
            # Well-formed, but not for the app as it stands (the same request succeeds on an app in another state):
            # a switch to a runner that has no defaults, or settings that fit another runner than the app's.
            if "config" not in changes:
                raise Conflict(f"Switching this app to the {runner} runner needs that runner's settings.") from None
            if "runner" not in changes and any(_fits(other, config) for other in RUNNER_NAMES if other != runner):
                raise Conflict(f"These settings are not for this app's runner ({runner}); name the runner.") from None
            raise
        if changes["config"].get("apiKey") == MASKED_SECRET:
            changes["config"]["apiKey"] = stored.get("apiKey")  # kept as stored (sealed)
        changes["config"] = _sealed(changes["config"])
    share_id = None
    old_mode, new_mode = sharing.mode_of(current), sharing.mode_of({"sharingConfig": changes.get("sharingConfig")})
    mode_changed = "sharingConfig" in changes and new_mode is not old_mode
    if mode_changed:
        # A new mode ends every use of the old link (and the visitor access it gave); link modes get a new one.
        changes["shareLink"] = None
        if new_mode in LINK_MODES:
            changes["shareLink"], share_id = sharing.new_share_link()
    updated = repo.update_app(team_id, app_id, changes)
    if updated is None:
        raise NotFound("No such app in this team.")
    if mode_changed:
        sessions_repo.set_sharing_mode(team_id, app_id, new_mode)
    return {**updated, "shareId": share_id} if share_id else updated


def renew_share_link(team_id: ObjectId, app_id: ObjectId) -> tuple[dict[str, Any], str]:
    """Replace the app's share link: the old one stops working at once, and so does the access of the visitors
    who came through it. Conflict for an app that is not shared by link."""
    current = get_app(team_id, app_id)
    if sharing.mode_of(current) not in LINK_MODES:
        raise Conflict("Only public and whitelist apps have a share link; set the app's sharingConfig.mode first.")
    link, share_id = sharing.new_share_link()
    updated = repo.update_app(team_id, app_id, {"shareLink": link})
    if updated is None:
        raise NotFound("No such app in this team.")
    return updated, share_id


def delete_app(team_id: ObjectId, app_id: ObjectId) -> None:
    """Remove the app; Conflict while live sessions still run from it."""
    get_app(team_id, app_id)
    if sessions_repo.count_live_sessions_for_app(team_id, app_id):
        raise Conflict("Sessions started from this app are still live; cancel them first.")
    if not repo.delete_app(team_id, app_id):
        raise NotFound("No such app in this team.")


def without_secrets(app: dict[str, Any]) -> dict[str, Any]:
    """The app as a turn's context holds it: an upstream key shows only as the mask (the key itself travels in
    the turn's grant, to the runner that sends it)."""
    config = dict(app.get("config") or {})
    if config.get("apiKey"):
        config["apiKey"] = MASKED_SECRET
    return {**app, "config": config}


def _same_endpoint(a: str | None, b: str | None) -> bool:
    return (a or "").rstrip("/") == (b or "").rstrip("/")


def upstream_addresses(base_url: str | None, settings: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The addresses a turn's upstream requests connect to when a team chose them (`base_url`, an app's own):
    those its host resolves to now, every one of them public (destinations.py), so a team admin cannot point the
    workers at the operator's network. None when there is nothing to check: no URL (the SDK's public default),
    the operator's own OPENAI_BASE_URL, or UPSTREAM_ALLOW_PRIVATE. InvalidInput when the host does not resolve or
    resolves to an address that is not public."""
    if not base_url or settings.get("UPSTREAM_ALLOW_PRIVATE"):
        return None
    if _same_endpoint(base_url, settings.get("OPENAI_BASE_URL")):
        return None
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput("The URL's port is not a number from 0 to 65535.") from None
    addresses = destinations.resolve(host, port)
    destinations.refuse_non_public(host, addresses, "an app's upstream requests", "UPSTREAM_ALLOW_PRIVATE")
    return tuple(addresses)


def upstream_for(app: dict[str, Any], settings: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The base URL an `openai` app's turns connect to and the key they send.

    The app's own key (entered by a team admin for it) goes to the app's address. With no key of its own,
    the operator's OPENAI_API_KEY is sent only to the operator's OPENAI_BASE_URL, never to an address a team
    chose. Nothing is ever read from the process environment on a team's behalf. UnsealError when the stored
    key cannot be read with this installation's SECRET_KEY."""
    config = app.get("config") or {}
    operator_url = settings.get("OPENAI_BASE_URL")
    base_url = config.get("baseUrl") or operator_url
    if config.get("apiKey"):
        return base_url, unseal(config["apiKey"], settings)
    if _same_endpoint(base_url, operator_url):
        return base_url, settings.get("OPENAI_API_KEY")
    return base_url, None
