"""What authentication read, kept per process and trusted only while no credential has changed since.

Every request authenticates before it does anything: a cookie's account (its sign-ins, its teams and roles), or
an API key and its account, one or two MongoDB reads. Those documents change rarely, so each process keeps what
it read, tagged with the credentials' version: a random token in Redis that every write to an account or an API
key replaces (repositories/accounts.py) before the write's caller returns. A request reads the token once (one
Redis GET) before any lookup, and trusts a kept document only if it was read under that same token and less
than AUTH_CACHE_SECONDS ago; so a revoked key, a sign-out, a password change or a role taken away holds for
every process from the next request on.

When Redis does not answer, nothing kept is trusted and the process drops what it kept: every lookup goes to
MongoDB, as with no cache. (A write whose token change is lost to a Redis outage is the one case the token
cannot cover; AUTH_CACHE_SECONDS bounds it.) AUTH_CACHE_SECONDS = 0 turns the cache off.
"""

from __future__ import annotations

import copy
import logging
import threading
import uuid
from collections.abc import Callable
from time import monotonic
from typing import Any

import redis
from flask import current_app, g

from .queueing import redis_for

log = logging.getLogger(__name__)
EXTENSION = "agentcloud_clone.credentials"
# Documents a process keeps at most; past it the oldest half is dropped (a key spray cannot grow it: only
# documents that exist are kept).
MAX_KEPT = 10_000
_NO_TOKEN = object()  # g's marker: this request found no usable token


class Kept:
    """One process's kept documents: (kind, key) → (token, read at, document)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[tuple[str, str], tuple[str, float, dict[str, Any]]] = {}

    def get(self, kind: str, key: str, token: str, max_age: float) -> dict[str, Any] | None:
        with self.lock:
            entry = self.entries.get((kind, key))
        if entry is None or entry[0] != token or monotonic() - entry[1] >= max_age:
            return None
        return copy.deepcopy(entry[2])

    def put(self, kind: str, key: str, token: str, doc: dict[str, Any]) -> None:
        with self.lock:
            if len(self.entries) >= MAX_KEPT:
                for old in list(self.entries)[: MAX_KEPT // 2]:
                    del self.entries[old]
            self.entries[(kind, key)] = (token, monotonic(), copy.deepcopy(doc))

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


def _kept() -> Kept:
    """This app's kept documents (one set per app, so two apps in one process never share them)."""
    kept = current_app.extensions.get(EXTENSION)
    return kept if kept is not None else current_app.extensions.setdefault(EXTENSION, Kept())  # type: ignore[no-any-return]


def _version_key() -> str:
    return f"{current_app.config['REDIS_PREFIX']}:credentials-version"


def _max_age() -> float:
    return float(current_app.config.get("AUTH_CACHE_SECONDS", 0))


def _token() -> str | None:
    """The credentials' version for this request (read once per request), or None: trust nothing kept."""
    if _max_age() <= 0:
        return None
    found = g.get("credentials_token", None)
    if found is not None:
        return None if found is _NO_TOKEN else str(found)
    token: str | None = None
    try:
        client = redis_for(current_app.config["REDIS_URL"])
        raw = client.get(_version_key())
        if raw is None:
            # No version yet (a new Redis, or one that lost its data): start one; this request keeps nothing,
            # since what was kept before may predate any change the lost version recorded.
            client.set(_version_key(), uuid.uuid4().hex, nx=True)
            _kept().clear()
        else:
            token = raw.decode() if isinstance(raw, bytes) else str(raw)
    except redis.RedisError:
        _kept().clear()
    g.credentials_token = token if token is not None else _NO_TOKEN
    return token


def lookup(kind: str, key: str, load: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """The `kind` document for `key`: the kept copy while it is current, else `load()` (kept when found)."""
    token = _token()
    if token is None:
        return load()
    kept = _kept()
    doc = kept.get(kind, key, token, _max_age())
    if doc is None:
        doc = load()
        if doc is not None:
            kept.put(kind, key, token, doc)
    return doc


def remember(kind: str, key: str, doc: dict[str, Any]) -> None:
    """Keep `doc` as this request's current `kind` document for `key` (after a write that no lookup depends on,
    such as an API key's last use)."""
    token = _token()
    if token is not None:
        _kept().put(kind, key, token, doc)


def credentials_changed() -> None:
    """Mark every process's kept documents out of date: called after every write to an account or an API key."""
    _kept().clear()
    g.pop("credentials_token", None)
    try:
        redis_for(current_app.config["REDIS_URL"]).set(_version_key(), uuid.uuid4().hex)
    except redis.RedisError as exc:
        # The other processes notice the outage on their next request and trust nothing meanwhile; a process that
        # sees none of it keeps its documents for at most AUTH_CACHE_SECONDS.
        log.warning("credentials version not updated (Redis: %s); kept lookups expire within %ss", exc, _max_age())
