"""Request parsing shared by the blueprints: bounded bodies, JSON, forms and query strings through marshmallow."""

from __future__ import annotations

import io
import json
import re
from typing import Any, TypedDict

from flask import Flask, current_app, request
from flask.json.provider import DefaultJSONProvider
from flask_wtf.csrf import generate_csrf
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter, Map

from ..errors import InvalidInput
from ..schemas import MAX_JSON_DEPTH, FormInput, json_problem
from .identity import api_key_in_use


class BoundedBody:
    """WSGI middleware: a chunked body (no Content-Length) is read here, up to MAX_CONTENT_LENGTH + 1 bytes, and
    handed on as the same bytes with a Content-Length, so the app answers it exactly as it would have (413 when
    over the limit, as soon as the body is read).

    Werkzeug on its own stops reading a chunked body at MAX_CONTENT_LENGTH and hands on the bytes so far as if
    they were all of it: a 4 MB JSON body becomes a 400, a 4 MB form its first MiB of fields, silently accepted.
    Only bodies the server marks as terminated (`wsgi.input_terminated`: gunicorn, Werkzeug's server) are read;
    for others Werkzeug reads nothing at all, which is safe."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.wsgi_app = app.wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        limit = self.app.config.get("MAX_CONTENT_LENGTH")
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked and limit is not None and environ.get("wsgi.input_terminated"):
            body = _read_at_most(environ["wsgi.input"], int(limit) + 1)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            del environ["HTTP_TRANSFER_ENCODING"]
        return self.wsgi_app(environ, start_response)


def _read_at_most(stream: Any, size: int) -> bytes:
    parts, left = [], size
    while left > 0:
        part = stream.read(min(left, 64 * 1024))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing as malformed (400, never a 500) bodies nested deeper than MAX_JSON_DEPTH and text
    that is not Unicode (lone surrogates, which no UTF-8 store or log line can hold)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            value = json.loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        problem = json_problem(value, MAX_JSON_DEPTH)
        if problem is not None:
            raise ValueError(f"JSON {problem}")
        return value


class PathSegmentConverter(BaseConverter):
    """The default `<...>`: one path segment, which may be empty. `POST /<team>/forms/session//cancel` then
    reaches the cancel view, whose id check answers 400 (as for any malformed id, after the sign-in and team
    checks), instead of routing's 404 or 405 saying nothing of the missing id."""

    regex = r"[^/]*"


class ItemIdConverter(BaseConverter):
    """`<item:...>`: a path segment naming one item of a collection, so anything but the names of the collection's
    own routes beside it (`add`, its create route). `DELETE /<team>/forms/app/<appId>` would otherwise also match
    `/<team>/forms/app/add`, whose `Allow` would then advertise a DELETE that can only fail. Malformed (and empty)
    ids still reach the view, which answers 400."""

    siblings: tuple[str, ...] = ("add",)

    def __init__(self, url_map: Map, *args: Any, **kwargs: Any) -> None:
        super().__init__(url_map, *args, **kwargs)
        names = "|".join(re.escape(name) for name in self.siblings)
        self.regex = rf"(?!(?:{names})$)[^/]*"


class SessionItemConverter(ItemIdConverter):
    """`<session_item:...>`: a session under `/<team>/forms/session/`, beside its `add` and `bulk-cancel` routes."""

    siblings = ("add", "bulk-cancel")


class ManagedSessionItemConverter(ItemIdConverter):
    """`<managed_session:...>`: a session under `/api/managed-agents/sessions/`, beside its `bulk-cancel` route."""

    siblings = ("bulk-cancel",)


CONVERTERS: dict[str, type[BaseConverter]] = {
    "default": PathSegmentConverter,
    "item": ItemIdConverter,
    "session_item": SessionItemConverter,
    "managed_session": ManagedSessionItemConverter,
}
_STAND_IN = "0" * 24


def empty_leading_parameter() -> str | None:
    """The route parameter a path leaves empty in its first segment (`//sessions.json`), if any: werkzeug strips
    a path's leading slashes before routing, so that one empty segment never reaches a converter."""
    # `request.path` has the leading slashes folded already; the WSGI path (latin-1 text of the bytes) has not.
    path = request.environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
    if not path.startswith("//"):
        return None
    adapter = current_app.url_map.bind_to_environ(request.environ)
    try:
        _, values = adapter.match(f"/{_STAND_IN}{path[1:]}", method=request.method)
    except HTTPException:
        return None
    return next((name for name, value in values.items() if value == _STAND_IN), None)


def use_path_converters(url_map: Map) -> None:
    """Path segments that may be empty, and no merging of `//` (which would turn an empty id into another
    route); before any rule is added."""
    url_map.converters.update(CONVERTERS)
    url_map.merge_slashes = False


def load_body(schema: Schema) -> dict[str, Any]:
    """The request body (JSON object or HTML form) validated by `schema`; InvalidInput with field errors."""
    if request.is_json:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise InvalidInput(
                f"The body must be a JSON object of Unicode text, nested at most {MAX_JSON_DEPTH} levels."
            )
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


class CsrfField(TypedDict, total=False):
    csrf: str


def csrf_field() -> CsrfField:
    """`{"csrf": token}` for cookie clients, as Agentcloud's JSON pages carry; nothing for API keys."""
    return {} if api_key_in_use() else {"csrf": generate_csrf()}
