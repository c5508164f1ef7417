"""Request parsing shared by the blueprints: bodies and query strings through marshmallow."""

from __future__ import annotations

from typing import Any

from flask import request
from flask_wtf.csrf import generate_csrf
from marshmallow import Schema, ValidationError

from ..extensions import api_key_in_use
from ..responses import ApiError
from ..schemas import parse_object_id


def load_body(schema: Schema) -> dict[str, Any]:
    """The request body (JSON object or HTML form) validated by `schema`; 400 with field errors otherwise."""
    if request.is_json:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise ApiError(400, "The body must be a JSON object.")
    else:
        data = request.form.to_dict()
        data.pop("csrf_token", None)
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ApiError(400, "Invalid input.", exc.messages) from None  # type: ignore[arg-type]


def load_args(schema: Schema) -> dict[str, Any]:
    """The query string validated by `schema`; 400 with field errors otherwise."""
    try:
        return schema.load(request.args.to_dict())
    except ValidationError as exc:
        raise ApiError(400, "Invalid query parameters.", exc.messages) from None  # type: ignore[arg-type]


def path_id(value: str, what: str) -> Any:
    """The ObjectId in a path segment; 400 when malformed (never a route-miss 404)."""
    oid = parse_object_id(value)
    if oid is None:
        raise ApiError(400, f"Invalid {what} id: expected 24 hexadecimal characters.")
    return oid


def csrf_field() -> dict[str, str]:
    """`{"csrf": token}` for cookie clients, as Agentcloud's JSON pages carry; nothing for API keys."""
    return {} if api_key_in_use() else {"csrf": generate_csrf()}
