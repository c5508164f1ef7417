"""The shared routes (`/s/<resourceSlug>/...`) × every sharing mode × every kind of caller × every kind of id.

Callers: anonymous (presenting nothing), a visitor holding a public app's link (and the token of a session they
started), an outsider signed in, an account the whitelist names, a team member, and the session's creator.
Cases: the caller's own session (for a caller who has none: the creator's), another session of the same app,
a session of another team (through that team's slug, and through ours), and a malformed id. Never a 500; errors
are always `{message, code}`; another team's marker never appears. Objects a request changes are made fresh.

Who may use a shared session: team members by role (an `owner`-mode session only its creator); a visitor only
the public session they started, through the link that is still the app's; a whitelisted account only its own
sessions of a whitelist app. Anyone else finds nothing (404), the same as for a session that does not exist.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from agentcloud_clone.access import Account
from agentcloud_clone.repositories.accounts import find_account, find_team
from agentcloud_clone.services import sessions as sessions_service
from agentcloud_clone.services import sharing
from agentcloud_clone.vocabulary import CancelSource
from tests.api.test_security_matrix import ROUTES

MODES = ["team", "public", "owner", "whitelist"]
CALLERS = ["anonymous", "visitor", "outsider", "whitelisted", "teammate", "creator"]
CASES = ["own", "other-session", "other-team", "other-team-via-our-slug", "malformed"]


@pytest.fixture
def mongo_uri_template() -> str:
    """In-process only: this matrix is wide (the `$or` visibility filter runs on the wire server in test_sharing)."""
    return "mongomock://localhost/{db}"


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {"SHARE_RATE_LIMIT": "100000 per minute", "SHARE_START_RATE_LIMIT": "100000 per minute"}


@dataclass(frozen=True)
class SharedRoute:
    method: str
    path: str  # under /s/<team>/, with {sid}
    ok: int
    body: dict[str, Any] | None = None
    writes: bool = False  # the request changes the session: each request gets a fresh one


SHARED_ROUTES = {
    "share.session_json": SharedRoute("GET", "/session/{sid}.json", 200),
    "share.session_messages": SharedRoute("GET", "/session/{sid}/messages.json", 200),
    "pages.shared_session_page": SharedRoute("GET", "/session/{sid}", 200),
    "share.edit_session": SharedRoute("POST", "/forms/session/{sid}/edit", 200, {"variables": {"k": "v"}}, True),
    "share.start_session": SharedRoute("POST", "/forms/session/{sid}/start", 200, {}, True),
    "share.send_message": SharedRoute("POST", "/session/{sid}/send-message", 200, {"messageText": "hi"}, True),
    "share.cancel_session": SharedRoute("POST", "/forms/session/{sid}/cancel", 200, {}, True),
}
START_ROUTES = {"share.add_session", "pages.share_link_page"}


class World:
    """Our team (creator, teammate) with one app per mode, an outsider, a whitelisted account, and another team
    with a public app whose things carry a secret marker."""

    def __init__(self, app: Any, factory: Any) -> None:
        self.app, self.factory = app, factory
        self.secret = f"SECRET-{uuid.uuid4().hex}"
        team = factory.team()
        self.team = str(team["_id"])
        self.creator = factory.user("member", team, api_key=True)
        self.teammate = factory.user("member", team, api_key=True)
        self.outsider = factory.user("owner", api_key=True)
        self.whitelisted = factory.user("owner", api_key=True)
        self.other_whitelisted = factory.user("owner", api_key=True)
        whitelist = [self.whitelisted.email, self.other_whitelisted.account_id]
        self.apps: dict[str, dict[str, Any]] = {}
        for mode in MODES:
            config = {"mode": mode, "whitelist": whitelist if mode == "whitelist" else []}
            self.apps[mode] = factory.shared_app(self.team, sharing=config, reply=f"config-{self.secret[:4]}x")
        other_owner = factory.user("owner")
        self.other_team = other_owner.team_id
        self.other_app = factory.shared_app(self.other_team, sharing={"mode": "public"}, reply=self.secret)
        self.other_session, self.other_token = self.visit(self.other_app, self.secret)
        self.users = {
            "outsider": self.outsider,
            "whitelisted": self.whitelisted,
            "teammate": self.teammate,
            "creator": self.creator,
        }

    def visit(self, app: dict[str, Any], message: str | None = None) -> tuple[str, str]:
        """A session a visitor started through the public app's link, and their token."""
        with self.app.app_context():
            team = find_team(app["teamId"])
            assert team is not None
            start = sharing.app_to_start(sharing.Caller(None), app["teamId"], app["shareId"], None)
            session, token = sharing.start_shared_session(sharing.Caller(None), team, start, None, message)
        assert token is not None
        return str(session["_id"]), token

    def whitelisted_session(self, user: Any, app: dict[str, Any]) -> str:
        with self.app.app_context():
            doc = find_account(user.oid)
            assert doc is not None
            caller = sharing.Caller(Account(doc))
            start = sharing.app_to_start(caller, app["teamId"], None, app["_id"])
            team = find_team(app["teamId"])
            assert team is not None
            return str(sharing.start_shared_session(caller, team, start, None, None)[0]["_id"])

    def team_session(self, user: Any, mode: str) -> str:
        return str(self.factory.session(user, str(self.apps[mode]["_id"]))["_id"])

    def sessions_for(self, caller: str, mode: str) -> tuple[str, str, str | None]:
        """(own session, another session of the app, the caller's visitor token)."""
        app = self.apps[mode]
        if caller == "visitor":
            if mode == "public":
                own, token = self.visit(app)
                return own, self.visit(app)[0], token
            _, token = self.visit(self.apps["public"])  # a real token, for another app's session
            return self.team_session(self.creator, mode), self.team_session(self.teammate, mode), token
        if caller == "whitelisted" and mode == "whitelist":
            return (
                self.whitelisted_session(self.whitelisted, app),
                self.whitelisted_session(self.other_whitelisted, app),
                None,
            )
        if caller == "teammate":
            return self.team_session(self.teammate, mode), self.team_session(self.creator, mode), None
        return self.team_session(self.creator, mode), self.team_session(self.teammate, mode), None


def allowed(caller: str, mode: str, case: str) -> bool:
    """Whether the caller may use the session of this case."""
    if case != "own" and caller not in ("teammate", "creator"):
        return False
    if case == "own":
        return (
            caller in ("teammate", "creator")
            or (caller == "visitor" and mode == "public")
            or (caller == "whitelisted" and mode == "whitelist")
        )
    if case == "other-session":
        return mode != "owner"
    return False


def expected(caller: str, mode: str, case: str, route: SharedRoute) -> int:
    if caller == "anonymous":
        return 401
    if case == "malformed":
        return 400
    return route.ok if allowed(caller, mode, case) else 404


def _headers(world: World, caller: str, token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if caller == "visitor" and token:
        headers["X-Visitor-Token"] = token
    elif caller in world.users:
        headers["Authorization"] = f"Bearer {world.users[caller].api_key}"
    return headers


def _check(world: World, response: Any, what: str, want: int, failures: list[str]) -> None:
    text = response.get_data(as_text=True)
    if response.status_code != want:
        failures.append(f"{what}: {response.status_code}, expected {want}: {text[:160]}")
    if world.secret in text:
        failures.append(f"{what} leaked another team's data")
    if response.status_code >= 500:
        failures.append(f"{what}: server error")
    if response.status_code >= 400:
        body = response.get_json(silent=True)
        if not isinstance(body, dict) or set(body) - {"message", "code", "errors"} or body.get("code") != want:
            failures.append(f"{what}: error body is not {{message, code}}: {text[:120]}")


def test_every_shared_route_is_in_this_matrix(app):
    shared = {rule.endpoint for rule in app.url_map.iter_rules() if rule.rule.startswith("/s/")}
    assert shared == set(SHARED_ROUTES) | START_ROUTES
    assert shared == {endpoint for endpoint, route in ROUTES.items() if route.shared}


@pytest.mark.parametrize("mode", MODES)
def test_shared_session_routes(app, factory, mode):
    world = World(app, factory)
    failures: list[str] = []
    for caller in CALLERS:
        standing = world.sessions_for(caller, mode)
        for route in SHARED_ROUTES.values():
            for case in CASES:
                own, other, token = world.sessions_for(caller, mode) if route.writes else standing
                team, sid = world.team, {"own": own, "other-session": other, "malformed": "not-an-id"}.get(case)
                if case == "other-team":
                    team, sid = world.other_team, world.other_session
                elif case == "other-team-via-our-slug":
                    sid = world.other_session
                path = f"/s/{team}" + route.path.format(sid=sid)
                response = app.test_client().open(
                    path,
                    method=route.method,
                    json=route.body if route.method == "POST" else None,
                    headers=_headers(world, caller, token),
                )
                want = expected(caller, mode, case, route)
                _check(world, response, f"{mode} {caller} {route.method} {route.path} on {case}", want, failures)
    assert not failures, "\n".join(failures)


def _start_expected(caller: str, mode: str, case: str) -> int:
    """Starting a session: by the app's link (`link`), by its id (`appId`), with another team's link, malformed."""
    account = caller not in ("anonymous", "visitor")
    member = caller in ("teammate", "creator")
    if case == "malformed":
        return 400
    if case == "other-team-link":
        return 404
    if case == "link":
        if mode not in ("public", "whitelist"):
            return 404  # these modes have no link: any link-shaped id finds nothing
        if mode == "public" or member or caller == "whitelisted":
            return 200
        return 403 if account else 401
    # by appId
    if not account:
        return 401
    if member or (caller == "whitelisted" and mode == "whitelist"):
        return 200
    return 404


@pytest.mark.parametrize("mode", MODES)
def test_starting_shared_sessions(app, factory, mode):
    world = World(app, factory)
    app_doc = world.apps[mode]
    link = app_doc.get("shareId") or f"app_{'ab' * 32}"
    failures: list[str] = []
    for caller in CALLERS:
        token = world.visit(world.apps["public"])[1] if caller == "visitor" else None
        bodies = {
            "link": {"shareId": link},
            "appId": {"id": str(app_doc["_id"])},
            "other-team-link": {"shareId": world.other_app["shareId"]},
            "malformed": {"id": "not-an-id"},
        }
        for case, body in bodies.items():
            want = _start_expected(caller, mode, case)
            headers = _headers(world, caller, token)
            response = app.test_client().post(f"/s/{world.team}/forms/session/add", json=body, headers=headers)
            _check(world, response, f"{mode} {caller} add by {case}", want, failures)
            if response.status_code == 200:
                shown = response.get_json()
                outside = caller in ("anonymous", "visitor", "outsider", "whitelisted")
                if ("visitorToken" in shown) != (mode == "public" and case == "link" and outside):
                    failures.append(f"{mode} {caller} add by {case}: visitorToken {'visitorToken' in shown}")
            if case in ("link", "other-team-link"):
                page = app.test_client().get(f"/s/{world.team}/{body['shareId']}", headers=headers)
                _check(world, page, f"{mode} {caller} share link page by {case}", want, failures)
    assert not failures, "\n".join(failures)


def test_owner_mode_sessions_are_hidden_on_every_team_route(app, factory):
    """Generated from the route table: every route outside /s/ that takes a session (in its path or body) finds
    another member's session of an `owner`-mode app nowhere, for members and admins alike; its creator gets the
    route's own answer; and no list shows it to anyone else."""
    team = factory.team()
    tid = str(team["_id"])
    creator = factory.user("member", team, api_key=True)
    others = [factory.user(role, team, api_key=True) for role in ("member", "admin")]
    app_id = factory.app_record(tid, sharing={"mode": "owner"})

    def fresh(kind: str | None) -> str:
        session = factory.session(creator, app_id)
        if kind == "ended-session":
            with app.app_context():
                sessions_service.cancel_session(team["_id"], session["_id"], factory.actor(creator), CancelSource.API)
        return str(session["_id"])

    failures, checked = [], 0
    for rule in app.url_map.iter_rules():
        route = ROUTES.get(rule.endpoint)
        if rule.rule.startswith("/s/") or route is None:
            continue
        template = re.sub(r"<\w+:(\w+)>", r"<\1>", rule.rule)  # converters (`<managed_session:sessionId>`) aside
        if "<sessionId>" not in template and route.body_id != "session":
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for user, want in [*((other, 404) for other in others), (creator, route.ok)]:
                sid = fresh(route.fresh)
                path = template.replace("<resourceSlug>", tid).replace("<sessionId>", sid)
                body = {
                    k: (v.replace("{session}", sid) if isinstance(v, str) else v) for k, v in (route.body or {}).items()
                }
                headers = {"Authorization": f"Bearer {user.api_key}", "Accept": "application/json"}
                response = app.test_client().open(
                    path, method=method, json=body if method != "GET" else None, headers=headers, buffered=False
                )
                # A live stream keeps its request context until closed (Flask's test client would reuse it).
                response.close()
                checked += 1
                if response.status_code != want:
                    failures.append(f"{user.role} {method} {rule.rule}: {response.status_code}, expected {want}")
    assert checked >= 3 * 14, checked
    sid = fresh(None)
    for path in (f"/{tid}/sessions.json", "/api/managed-agents/sessions", f"/{tid}/sessions"):
        for user in (*others, creator):
            text = (
                app.test_client().get(path, headers={"Authorization": f"Bearer {user.api_key}"}).get_data(as_text=True)
            )
            if (sid in text) != (user is creator):
                failures.append(f"{user.role} GET {path}: listed {sid in text}")
    assert not failures, "\n".join(failures)
