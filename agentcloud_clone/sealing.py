"""Secrets the product must read back (an app's upstream key, a webhook endpoint's signing secret) are stored
sealed: Fernet (AES-128-CBC with HMAC-SHA256) under a key derived from SECRET_KEY, so a copy of the database
or of its backups alone does not give them away.

Rotating SECRET_KEY: set the new one, list the old one in SECRET_KEY_FALLBACKS (which also keeps sign-in
cookies valid), then run `flask --app app reseal-secrets` to seal every stored secret under the new key. Values
stored before sealing existed are read as they are and sealed by the same command (or their next save).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "sealed:v1:"
_INFO = b"agentcloud_clone stored secrets"


class UnsealError(Exception):
    """A sealed value none of the configured keys opens (SECRET_KEY changed without a fallback)."""


def _fernet_key(secret_key: str) -> bytes:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret_key.encode())
    return base64.urlsafe_b64encode(derived)


@lru_cache(maxsize=8)
def _box(secret_keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(_fernet_key(key)) for key in secret_keys])


def _keys(settings: Mapping[str, Any]) -> tuple[str, ...]:
    fallbacks: Sequence[str] = settings.get("SECRET_KEY_FALLBACKS") or ()
    return (str(settings["SECRET_KEY"]), *(str(key) for key in fallbacks))


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def seal(plaintext: str, settings: Mapping[str, Any]) -> str:
    """`plaintext` sealed under the current SECRET_KEY."""
    return PREFIX + _box(_keys(settings)).encrypt(plaintext.encode()).decode()


def unseal(stored: str, settings: Mapping[str, Any]) -> str:
    """The secret a stored value holds; a value stored before sealing is returned as it is."""
    if not is_sealed(stored):
        return stored
    try:
        return _box(_keys(settings)).decrypt(stored[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        raise UnsealError("A stored secret cannot be read with SECRET_KEY (or SECRET_KEY_FALLBACKS).") from None


def reseal_all(settings: Mapping[str, Any]) -> dict[str, int]:
    """Seal every stored secret under the current SECRET_KEY → counts of `resealed` and `unreadable` secrets
    (sealed under a key no longer configured: those apps need their key entered again, those endpoints a new
    secret)."""
    from .repositories import apps as apps_repo
    from .repositories import webhooks as webhooks_repo

    counts = {"resealed": 0, "unreadable": 0}
    stores = (
        (apps_repo.stored_api_keys(), apps_repo.replace_api_key),
        (webhooks_repo.stored_secrets(), webhooks_repo.replace_secret),
    )
    for found, replace in stores:
        for team_id, item_id, stored in found:
            try:
                fresh = reseal(stored, settings)
            except UnsealError:
                counts["unreadable"] += 1
                continue
            if fresh != stored and replace(team_id, item_id, stored, fresh):
                counts["resealed"] += 1
    return counts


def reseal(stored: str, settings: Mapping[str, Any]) -> str:
    """The stored value sealed under the current SECRET_KEY (from a fallback key, or from plain text)."""
    if not is_sealed(stored):
        return seal(stored, settings)
    token = stored[len(PREFIX) :].encode()
    keys = _keys(settings)
    try:
        _box(keys[:1]).decrypt(token)
        return stored  # sealed under the current key already
    except InvalidToken:
        pass
    try:
        return PREFIX + _box(keys).rotate(token).decode()
    except InvalidToken:
        raise UnsealError("A stored secret cannot be read with SECRET_KEY (or SECRET_KEY_FALLBACKS).") from None
