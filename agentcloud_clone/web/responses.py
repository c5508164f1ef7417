"""The one place that shapes responses: JSON or redirect, and the `{message, code}` error body."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flask import current_app, flash, jsonify, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue

from ..sealing import UnsealError, seal, unseal

# Paths only programs call (scrapers, probes, spec readers): always JSON errors, never a login redirect.
PROGRAM_PATHS = frozenset({"/openapi.yaml", "/metrics", "/healthz", "/readyz"})


def wants_json() -> bool:
    """True for programs: JSON bodies, any `Authorization` header, `Accept: application/json`, and the
    `.json`/`/api/` routes."""
    if request.is_json or "Authorization" in request.headers:
        # A JSON body, or credentials of any scheme, valid or malformed: browsers never send this header to an app
        # that never asks for it, so a program gets its 401 as JSON rather than a redirect to the sign-in page.
        return True
    if request.method not in ("GET", "HEAD", "POST"):
        return True  # HTML forms only GET and POST; anything else comes from a program
    if "text/event-stream" in request.headers.get("Accept", ""):
        return True  # an EventSource or SSE client
    if request.path.endswith(".json") or request.path.startswith("/api/") or request.path in PROGRAM_PATHS:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


def safe_next(target: str | None, fallback: str) -> str:
    """`target` when it is a path on this site, else `fallback`: redirects never bounce users elsewhere."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target if not urlsplit(target).netloc else fallback
    return fallback


def redirect_or_json(
    path: str, *, flash_message: str | None = None, reveal: Mapping[str, str] | None = None, **fields: Any
) -> ResponseReturnValue:
    """A 302 to `path` for browsers (with a flash message, and `reveal`'s secrets for the next page to show
    once), or 200 `{redirect, ...fields}` for programs."""
    if wants_json():
        return jsonify({"redirect": path, **fields})
    if flash_message:
        flash(flash_message, "success")
    for name, value in (reveal or {}).items():
        reveal_once(name, value)
    return redirect(path, code=302)


def reveal_once(name: str, value: str) -> None:
    """Keep a secret made just now (an API key, a share link) for the page a browser is redirected to. The
    session cookie is signed, not encrypted: the value rides in it sealed, so neither the cookie nor a log or
    proxy that keeps it gives the secret away."""
    session[f"reveal:{name}"] = seal(value, current_app.config)


def take_revealed(name: str) -> str | None:
    """The secret `reveal_once` kept under `name`, once (None when there is none, or it no longer unseals)."""
    sealed = session.pop(f"reveal:{name}", None)
    if not isinstance(sealed, str):
        return None
    try:
        return unseal(sealed, current_app.config)
    except UnsealError:
        return None


def error_response(code: int, message: str, errors: dict[str, Any] | None = None, **extra: Any) -> ResponseReturnValue:
    """`{message, code}` (plus field `errors` and any `extra`) for programs, a friendly page for browsers;
    browsers that need to sign in go to the login page."""
    if wants_json():
        body: dict[str, Any] = {"message": message, "code": code, **extra}
        if errors:
            body["errors"] = errors
        return jsonify(body), code
    if code == 401:
        return redirect(url_for("account.login", next=request.full_path.rstrip("?")))
    return render_template("error.html", code=code, message=message, errors=errors), code
