"""Every error handler, and the one table from the domain's errors to HTTP status codes."""

from __future__ import annotations

import logging

from flask import Flask, request
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from ..db import is_unavailable, note_failure
from ..errors import (
    Conflict,
    DomainError,
    InvalidInput,
    Mismatch,
    NotFound,
    NotSignedIn,
    PermissionDenied,
    RateLimited,
    TooLarge,
    Unavailable,
)
from .parsing import empty_leading_parameter
from .responses import error_response

log = logging.getLogger(__name__)

STATUS_FOR: dict[type[DomainError], int] = {
    InvalidInput: 400,
    NotSignedIn: 401,
    PermissionDenied: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Mismatch: 422,
    RateLimited: 429,
    Unavailable: 503,
}
HTTP_MESSAGES = {404: "Not found.", 405: "Method not allowed.", 413: "Request body too large."}
DATABASE_DOWN = "The database is unavailable; try again shortly."
QUEUE_DOWN = "The job queue is unavailable; try again shortly."


def status_for(exc: DomainError) -> int:
    """The HTTP status (and CLI error code) of a domain error."""
    for kind in type(exc).__mro__:
        if kind in STATUS_FOR:
            return STATUS_FOR[kind]
    return 400


def init_app(app: Flask) -> None:
    """Route every error, expected or not, through `error_response`."""

    @app.errorhandler(DomainError)
    def _domain_error(exc: DomainError) -> ResponseReturnValue:
        response = app.make_response(error_response(status_for(exc), exc.message, exc.errors))
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(CSRFError)
    def _csrf_error(exc: CSRFError) -> ResponseReturnValue:
        return error_response(403, f"CSRF check failed: {exc.description}")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        code = exc.code or 500
        if code in (404, 405) and (empty := empty_leading_parameter()) is not None:
            return error_response(400, f"The path's `{empty}` is empty: give the id (24 characters of [a-f0-9]).")
        message = HTTP_MESSAGES.get(code) or exc.description or exc.name
        response = app.make_response(error_response(code, message))
        allow = exc.get_response().headers.get("Allow")
        if code == 405 and allow:
            response.headers["Allow"] = allow
        return response

    @app.errorhandler(PyMongoError)
    def _database_error(exc: PyMongoError) -> ResponseReturnValue:
        if is_unavailable(exc):
            # Away, hung, or too slow to answer in time: the same to the caller, who may retry.
            note_failure(exc)
            log.warning("MongoDB unavailable on %s %s: %s", request.method, request.path, exc)
            return error_response(503, DATABASE_DOWN)
        log.exception("database error on %s %s", request.method, request.path)
        return error_response(500, "Internal server error.")

    @app.errorhandler(RedisError)
    def _queue_error(exc: RedisError) -> ResponseReturnValue:
        log.warning("Redis unavailable on %s %s: %s", request.method, request.path, exc)
        return error_response(503, QUEUE_DOWN)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        # Log the detail for operators; the caller learns only that it failed.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "Internal server error.")
