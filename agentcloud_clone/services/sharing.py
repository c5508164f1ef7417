"""Sharing: who outside a team's role rules may use an app's sessions, by the app's `sharingConfig.mode`.

- `team` (the default): the team's members, by role, as on the team routes.
- `owner`: each session only its creator (on the team routes too; see access.may_see).
- `public`: also anyone holding the app's share link (`app_<64 hex>`): starting a session through it gives the
  visitor a token for that one session (and remembers it in their signed cookie). A visitor reaches nothing else:
  not the app's other sessions, not its settings, not the team.
- `whitelist`: also the accounts the app names (ids or emails), signed in, each only their own sessions.

Share links and visitor tokens are random and stored only as hashes. A visitor's access lasts as long as the
share link they came through: regenerating the link, or changing the app's mode, ends it. Whitelisted access
ends when the account leaves the whitelist or the mode changes. Anyone else, whatever they hold, finds nothing
(404), the same whether the session exists or not.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bson import ObjectId

from ..access import Account, Actor, Permission
from ..errors import InvalidInput, NotFound, NotSignedIn, PermissionDenied
from ..repositories import apps as apps_repo
from ..repositories import sessions as sessions_repo
from ..timeutil import utcnow
from ..vocabulary import LINK_MODES, ActorKind, SharingMode
from . import sessions as sessions_service

SHARE_ID = re.compile(r"app_[a-f0-9]{64}")
VISITOR_TOKEN_PREFIX = "sv_"
NOT_SHARED = "No such session here."
VISITOR = Actor(ActorKind.VISITOR)


def _hash(secret: str) -> str:
    # Both secrets carry 256 bits of randomness: a fast hash is enough, and lookups stay cheap.
    return hashlib.sha256(secret.encode()).hexdigest()


def new_share_link() -> tuple[dict[str, Any], str]:
    """A new share link: what the app stores (an id, the hash, when) and the link's id, shown only now."""
    share_id = f"app_{secrets.token_hex(32)}"
    return {"_id": ObjectId(), "hash": _hash(share_id), "createdAt": utcnow()}, share_id


def share_path(team_id: ObjectId, share_id: str) -> str:
    """Where a share link points."""
    return f"/s/{team_id}/{share_id}"


@dataclass(frozen=True)
class Caller:
    """Who calls a shared route: a signed-in account (cookie or API key), and the visitor tokens presented (the
    `X-Visitor-Token` header, else the ones the signed cookie remembers, by session id)."""

    account: Account | None
    header_token: str | None = None
    cookie_tokens: tuple[tuple[str, str], ...] = ()

    @property
    def presents_anything(self) -> bool:
        return self.account is not None or self.header_token is not None or bool(self.cookie_tokens)

    def tokens_for(self, session_id: ObjectId) -> list[str]:
        """The tokens that may name this session. A header token, when sent, is the only one: the cookie is
        ambient, and requests relying on it need a CSRF check, which header requests skip."""
        if self.header_token is not None:
            return [self.header_token]
        return [token for sid, token in self.cookie_tokens if sid == str(session_id)]

    @property
    def actor(self) -> Actor:
        return self.account.actor if self.account is not None else VISITOR


def mode_of(app: dict[str, Any] | None) -> SharingMode:
    """The app's sharing mode (`team` for an app with none, or one that is gone)."""
    return sessions_service.sharing_mode(app)


def whitelisted(app: dict[str, Any], account: Account | None) -> bool:
    """Whether the app's whitelist names the account (by id or email)."""
    if account is None:
        return False
    entries = ((app.get("sharingConfig") or {}).get("whitelist")) or []
    return account.object_id in entries or account.email.lower() in entries


def _current_link_id(app: dict[str, Any]) -> Any:
    return (app.get("shareLink") or {}).get("_id")


def _visitor_may_use(caller: Caller, session: dict[str, Any], app: dict[str, Any]) -> bool:
    """A public app's session, reached with its own visitor token (or by the account that started it), through
    the share link that is still the app's."""
    share = session.get("share") or {}
    if mode_of(app) is not SharingMode.PUBLIC or not share.get("linkId") or share["linkId"] != _current_link_id(app):
        return False
    if caller.account is not None and session.get("createdBy") == caller.account.object_id:
        return True
    stored = share.get("tokenHash") or ""
    return any(hmac.compare_digest(_hash(token), stored) for token in caller.tokens_for(session["_id"]))


def shared_session(
    caller: Caller, team_id: ObjectId, session_id: ObjectId, permission: Permission
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The session (and its app) when the caller may use it on the shared routes; NotFound otherwise, the same
    whether it exists or not. Team members need `permission` (PermissionDenied when they only may look)."""
    session = sessions_repo.find_session(team_id, session_id)
    if session is None:
        raise NotFound(NOT_SHARED)
    app = apps_repo.find_app(team_id, session["appId"])
    mode = mode_of(app)
    account = caller.account
    if account is not None and account.role_in(team_id) is not None:
        own = session.get("createdBy") == account.object_id
        if mode is not SharingMode.OWNER or own:
            if not account.can(team_id, permission):
                raise PermissionDenied(f"Your role ({account.role_in(team_id)}) does not allow this.")
            return session, app
    if app is not None and _visitor_may_use(caller, session, app):
        return session, app
    if (
        app is not None
        and mode is SharingMode.WHITELIST
        and account is not None
        and session.get("createdBy") == account.object_id
        and whitelisted(app, account)
    ):
        return session, app
    raise NotFound(NOT_SHARED)


@dataclass(frozen=True)
class Start:
    """How a caller may start a session of a shared app: as a team member, a whitelisted account, or a visitor
    holding a public app's link."""

    app: dict[str, Any]
    as_visitor: bool


def app_to_start(caller: Caller, team_id: ObjectId, share_id: str | None, app_id: ObjectId | None) -> Start:
    """The app a caller may start a session of, from its share link or its id. A link that is not the app's
    current one, or an app the caller may not use, is not found."""
    account = caller.account
    if share_id is not None:
        if not SHARE_ID.fullmatch(share_id):
            raise InvalidInput("A share link's id is `app_` and 64 characters of [a-f0-9].")
        app = apps_repo.find_app_by_share_link(team_id, _hash(share_id))
        if app is None or mode_of(app) not in LINK_MODES:
            raise NotFound("No such share link (it may have been replaced, or the app is no longer shared).")
        if app_id is not None and app_id != app["_id"]:
            raise InvalidInput("The share link and `appId` name different apps.")
    else:
        if account is None:
            raise NotSignedIn("Sign in, or use the app's share link.")
        app = apps_repo.find_app(team_id, app_id) if app_id is not None else None
        if app is None:
            raise NotFound("No such app here.")
    mode = mode_of(app)
    if account is not None and account.role_in(team_id) is not None:
        if not account.can(team_id, Permission.SESSION_CREATE):
            raise PermissionDenied(f"Your role ({account.role_in(team_id)}) does not allow this.")
        return Start(app, as_visitor=False)
    if mode is SharingMode.PUBLIC and share_id is not None:
        return Start(app, as_visitor=True)
    if mode is SharingMode.WHITELIST and whitelisted(app, account):
        return Start(app, as_visitor=False)
    if share_id is not None and mode is SharingMode.WHITELIST:
        if account is None:
            raise NotSignedIn("This app is shared with named accounts: sign in as one of them.")
        raise PermissionDenied("This app is shared with named accounts, and yours is not one of them.")
    raise NotFound("No such app here.")


def start_shared_session(
    caller: Caller,
    team: dict[str, Any],
    start: Start,
    name: str | None,
    message: str | None,
    *,
    skip_run: bool = False,
    variables: dict[str, str] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Start a session of a shared app; a visitor's comes with its visitor token (shown only now), which is valid
    while the share link it came through is the app's."""
    share, token = None, None
    if start.as_visitor:
        token = f"{VISITOR_TOKEN_PREFIX}{secrets.token_urlsafe(32)}"
        share = {"linkId": _current_link_id(start.app), "tokenHash": _hash(token), "createdAt": utcnow()}
    session = sessions_service.create_session(
        team, caller.actor, start.app, name, message, skip_run=skip_run, variables=variables, share=share
    )
    return session, token


def remembered(tokens: Sequence[Sequence[str]], session_id: ObjectId, token: str, keep: int) -> list[list[str]]:
    """The cookie's list of (session id, visitor token) with this one added, the `keep` most recent."""
    kept = [[sid, value] for sid, value in tokens if sid != str(session_id)]
    return [*kept, [str(session_id), token]][-keep:]
