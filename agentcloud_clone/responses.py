"""The one place that shapes responses: JSON or redirect, and the `{message, code}` error body."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, flash, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from pymongo.errors import ConnectionFailure, ServerSelectionTimeoutError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)
# Paths only programs call (scrapers, probes, spec readers): always JSON errors, never a login redirect.
PROGRAM_PATHS = frozenset({"/openapi.yaml", "/metrics", "/healthz", "/readyz"})


class ApiError(Exception):
    """An expected failure with an HTTP status and a message safe to show the caller."""

    def __init__(self, code: int, message: str, errors: dict[str, Any] | None = None, **headers: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.errors = errors
        self.headers = headers


def wants_json() -> bool:
    """True for programs: JSON bodies, API keys, `Accept: application/json`, and the `.json`/`/api/` routes."""
    if request.is_json or request.headers.get("Authorization", "").lower().startswith("bearer "):
        return True  # a JSON body, or an API key (valid or not): a program, not a browser
    if request.method not in ("GET", "HEAD", "POST"):
        return True  # HTML forms only GET and POST; anything else comes from a program
    if request.path.endswith(".json") or request.path.startswith("/api/") or request.path in PROGRAM_PATHS:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


def safe_next(target: str | None, fallback: str) -> str:
    """`target` when it is a path on this site, else `fallback`: redirects never bounce users elsewhere."""
    local = target and target.startswith("/") and not target.startswith("//") and "\\" not in target
    return target if local and not urlsplit(target).netloc else fallback


def redirect_or_json(path: str, *, flash_message: str | None = None, **fields: Any) -> ResponseReturnValue:
    """A 302 to `path` for browsers (with a flash message), or 200 `{redirect, ...fields}` for programs."""
    if wants_json():
        return jsonify({"redirect": path, **fields})
    if flash_message:
        flash(flash_message, "success")
    return redirect(path, code=302)


def error_response(code: int, message: str, errors: dict[str, Any] | None = None) -> ResponseReturnValue:
    """`{message, code}` for programs, a friendly page for browsers; 401 browsers go to the login page."""
    if wants_json():
        body: dict[str, Any] = {"message": message, "code": code}
        if errors:
            body["errors"] = errors
        return jsonify(body), code
    if code == 401:
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    return render_template("error.html", code=code, message=message, errors=errors), code


def init_app(app: Flask) -> None:
    """Route every error, expected or not, through `error_response`."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> ResponseReturnValue:
        response = app.make_response(error_response(exc.code, exc.message, exc.errors))
        for name, value in exc.headers.items():
            response.headers[name.replace("_", "-")] = value
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        code = exc.code or 500
        messages = {
            404: "Not found.",
            405: "Method not allowed.",
            413: "Request body too large.",
        }
        message = messages.get(code) or exc.description or exc.name
        response = app.make_response(error_response(code, message))
        if code == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        # Log the detail for operators; the caller learns only that it failed.
        log.exception("unhandled error on %s %s", request.method, request.path)
        if isinstance(exc, (ConnectionFailure, ServerSelectionTimeoutError)):
            return error_response(503, "The database is unavailable; try again shortly.")
        if isinstance(exc, RedisError):
            return error_response(503, "The job queue is unavailable; try again shortly.")
        return error_response(500, "Internal server error.")
