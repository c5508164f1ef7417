"""Request parsing shared by the blueprints: JSON bodies, forms and query strings through marshmallow."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import request
from flask.json.provider import DefaultJSONProvider
from flask_wtf.csrf import generate_csrf
from marshmallow import Schema, ValidationError
from werkzeug.routing import BaseConverter, Map

from ..errors import InvalidInput
from ..schemas import FormInput
from .identity import api_key_in_use

# JSON bodies nest at most this deep: far more than any request needs, far less than what would exhaust
# the parser's recursion or MongoDB's nesting limit (100).
MAX_JSON_DEPTH = 32


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests containers more than `limit` deep (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing bodies nested deeper than MAX_JSON_DEPTH as malformed (400, never a 500)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            value = json.loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        if _depth_exceeds(value, MAX_JSON_DEPTH):
            raise ValueError("JSON nested too deeply")
        return value


class ItemIdConverter(BaseConverter):
    """`<item:...>`: a path segment naming one item of a collection, so anything but the names of the collection's
    own routes beside it (`add`, its create route). `DELETE /<team>/forms/app/<appId>` would otherwise also match
    `/<team>/forms/app/add`, whose `Allow` would then advertise a DELETE that can only fail. Malformed ids still
    reach the view, which answers 400."""

    siblings: tuple[str, ...] = ("add",)

    def __init__(self, url_map: Map, *args: Any, **kwargs: Any) -> None:
        super().__init__(url_map, *args, **kwargs)
        names = "|".join(re.escape(name) for name in self.siblings)
        self.regex = rf"(?!(?:{names})$)[^/]+"


class SessionItemConverter(ItemIdConverter):
    """`<session_item:...>`: a session under `/<team>/forms/session/`, beside its `add` and `bulk-cancel` routes."""

    siblings = ("add", "bulk-cancel")


class ManagedSessionItemConverter(ItemIdConverter):
    """`<managed_session:...>`: a session under `/api/managed-agents/sessions/`, beside its `bulk-cancel` route."""

    siblings = ("bulk-cancel",)


CONVERTERS: dict[str, type[BaseConverter]] = {
    "item": ItemIdConverter,
    "session_item": SessionItemConverter,
    "managed_session": ManagedSessionItemConverter,
}


def load_body(schema: Schema) -> dict[str, Any]:
    """The request body (JSON object or HTML form) validated by `schema`; InvalidInput with field errors."""
    if request.is_json:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise InvalidInput(f"The body must be a JSON object (nested at most {MAX_JSON_DEPTH} levels).")
    else:
        data = request.form.to_dict()
        data.pop("csrf_token", None)
    try:
        with FormInput(not request.is_json):
            loaded: dict[str, Any] = schema.load(data)
    except ValidationError as exc:
        raise InvalidInput("Invalid input.", _messages(exc)) from None
    return loaded


def load_args(schema: Schema) -> dict[str, Any]:
    """The query string validated by `schema`; InvalidInput with field errors."""
    try:
        loaded: dict[str, Any] = schema.load(request.args.to_dict())
    except ValidationError as exc:
        raise InvalidInput("Invalid query parameters.", _messages(exc)) from None
    return loaded


def _messages(exc: ValidationError) -> dict[str, Any]:
    """marshmallow's field messages, keyed by field."""
    return exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}


def csrf_field() -> dict[str, str]:
    """`{"csrf": token}` for cookie clients, as Agentcloud's JSON pages carry; nothing for API keys."""
    return {} if api_key_in_use() else {"csrf": generate_csrf()}
