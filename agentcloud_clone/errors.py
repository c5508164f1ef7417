"""The domain's own errors. Services raise these; the web layer (web/errors.py) and the CLI map them to
status codes in one place, so no rule below the web layer knows about HTTP."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """An expected failure with a message that is safe to show whoever asked."""

    def __init__(self, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors


class InvalidInput(DomainError):
    """The request cannot be understood: a malformed id, a field out of bounds, a wrong type."""


class NotSignedIn(DomainError):
    """Nobody is signed in, or the credential presented is not valid."""


class PermissionDenied(DomainError):
    """The caller is known but may not do this (not a member of the team, or a role without the permission)."""


class NotFound(DomainError):
    """No such thing where the caller may look (the same whether it exists elsewhere or nowhere)."""


class Conflict(DomainError):
    """The thing is in a state that does not allow this now (a live session cannot be deleted, say)."""


class Mismatch(DomainError):
    """A replayed request does not match the first one (an Idempotency-Key reused with another body)."""


class TooLarge(DomainError):
    """The input is over a size limit."""


class Unavailable(DomainError):
    """A dependency (MongoDB, Redis) cannot be reached; trying again later may work."""


class RateLimited(DomainError):
    """Too many attempts; `retry_after` says how many seconds to wait."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
