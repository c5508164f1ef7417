"""Every route × every kind of caller × every kind of id, generated from the app's route table.

A route missing from ROUTES fails the test, so nothing is skipped silently. Each entry gives the body that
reaches the route's logic and the exact status an allowed caller gets on its own objects; who may use the
route comes from the permission its view declares (`required_permission`). Objects a request changes
(a session to cancel or delete, an app to delete, a member to remove) are made fresh for each request.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from agentcloud_clone.access import Permission, permissions_for
from agentcloud_clone.services import accounts as accounts_service
from agentcloud_clone.services import bulk, webhooks
from agentcloud_clone.services import sessions as sessions_service
from agentcloud_clone.vocabulary import CancelSource
from tests.support import PASSWORD

ACTORS = ["anonymous", "outsider", "viewer", "member", "admin"]
CASES = ["own", "other-team", "nonexistent", "malformed"]
# Served without signing in (sign-in plumbing, static files, docs and probes).
PUBLIC = {
    "static",
    "account.login",
    "account.login_json",
    "account.logout",
    "pages.index",
    "pages.favicon",
    "docs.openapi_yaml",
    "docs.docs_page",
    "probes.healthz",
    "probes.readyz",
    "probes.metrics_view",
}
ID_PARAMS = {
    "sessionId": "session",
    "appId": "app",
    "keyId": "key",
    "accountId": "member",
    "operationId": "operation",
    "webhookId": "webhook",
    "deliveryId": "delivery",
    "invitationId": "invitation",
}
# Ids that name the caller's own objects: their own case is the caller's, exercised where the caller is known.
CALLERS_OWN = {"key": "tests/api/test_auth.py", "invitation": "tests/api/test_members.py"}


@dataclass(frozen=True)
class Route:
    """What a request to the route carries and what an allowed caller gets on its own objects."""

    ok: int = 200
    body: dict[str, Any] | None = None
    # Which id the body carries instead of the path (for routes that take ids in the body).
    body_id: str | None = None
    # Which fresh object of our team the request acts on (it may change or remove it).
    fresh: str | None = None
    # API keys may not use this route at all (key management needs a browser session).
    browser_only: bool = False
    # The body names the team (`teamId`), which is checked like a team slug.
    team_in_body: bool = False
    # A live SSE stream: only its first line is read.
    stream: bool = False
    # A shared route under /s/<resourceSlug>/: who may use it depends on the app's sharing mode, so
    # tests/api/test_share_matrix.py checks it for every mode, caller and case instead.
    shared: bool = False


ROUTES: dict[str, Route] = {
    "account.sign_out_everywhere": Route(browser_only=True),
    # A wrong current password: the route fuzz sends this body as the cookie caller, who must stay signed in.
    "account.change_password": Route(
        body={"currentPassword": "not the password", "newPassword": "matrix passphrase"}, browser_only=True
    ),
    "account.account_json": Route(),
    "account.api_keys_json": Route(),
    "account.add_api_key": Route(body={"name": "matrix"}, browser_only=True),
    "account.revoke_api_key": Route(browser_only=True),
    "account.accept_invitation": Route(),
    "account.decline_invitation": Route(),
    "apps.list_apps": Route(),
    "apps.app_json": Route(),
    "apps.add_app": Route(body={"name": "matrix app"}),
    "apps.edit_app": Route(body={"name": "renamed"}),
    "apps.delete_app": Route(fresh="app"),
    "apps.delete_app_form": Route(fresh="app"),
    "apps.renew_share_link": Route(fresh="public-app"),
    "sessions.add_session": Route(body={"appId": "{app}", "message": "hi"}, body_id="app"),
    "sessions.list_sessions": Route(),
    "sessions.session_json": Route(),
    "sessions.session_messages": Route(),
    "sessions.send_message": Route(body={"message": "next"}, fresh="idle-session"),
    "sessions.cancel_session": Route(fresh="idle-session"),
    "sessions.edit_session": Route(body={"variables": {"topic": "matrix"}}, fresh="idle-session"),
    "sessions.start_session": Route(fresh="idle-session"),
    "sessions.delete_session": Route(fresh="ended-session"),
    "sessions.delete_session_form": Route(fresh="ended-session"),
    "sessions.bulk_cancel": Route(ok=202, body={"all": True}),
    "streams.session_events": Route(stream=True),
    "sessions.operation_json": Route(),
    "managed_agents.cancel": Route(body={"sessionId": "{session}"}, body_id="session", fresh="idle-session"),
    "managed_agents.create_session": Route(ok=201, body={"appId": "{app}"}, body_id="app"),
    "managed_agents.list_sessions": Route(),
    "managed_agents.get_session": Route(),
    "managed_agents.session_events": Route(),
    "managed_agents.delete_session": Route(fresh="ended-session"),
    "managed_agents.send_message": Route(ok=202, body={"message": "next"}, fresh="idle-session"),
    "managed_agents.bulk_cancel": Route(ok=202, body={"teamId": "{team}", "all": True}, team_in_body=True),
    "managed_agents.get_operation": Route(),
    "managed_agents.session_stream": Route(stream=True),
    "teams.team_json": Route(),
    "teams.edit_team": Route(body={"limits": {"queueTtl": 600}}),
    "teams.list_members": Route(),
    "teams.add_member": Route(body={"email": "{newcomer}", "role": "viewer"}),
    "teams.edit_member": Route(body={"role": "viewer"}, fresh="member"),
    "teams.remove_member": Route(fresh="member"),
    "teams.remove_member_form": Route(fresh="member"),
    "teams.withdraw_invitation": Route(fresh="invitation"),
    "teams.withdraw_invitation_form": Route(fresh="invitation"),
    "webhooks.list_endpoints": Route(),
    "webhooks.add_endpoint": Route(ok=201, body={"url": "http://127.0.0.1:9/hook"}),
    "webhooks.rotate_secret": Route(fresh="webhook"),
    "webhooks.delete_endpoint": Route(fresh="webhook"),
    "webhooks.delete_endpoint_form": Route(fresh="webhook"),
    "webhooks.list_deliveries": Route(),
    "webhooks.redeliver": Route(ok=202),
    "pages.sessions_page": Route(),
    "pages.session_page": Route(),
    "pages.apps_page": Route(),
    "pages.app_edit_page": Route(),
    "pages.members_page": Route(),
    "pages.api_keys_page": Route(),
    "pages.share_link_page": Route(shared=True),
    "pages.shared_session_page": Route(shared=True),
    "share.add_session": Route(shared=True),
    "share.session_json": Route(shared=True),
    "share.session_messages": Route(shared=True),
    "share.edit_session": Route(shared=True),
    "share.start_session": Route(shared=True),
    "share.send_message": Route(shared=True),
    "share.cancel_session": Route(shared=True),
}


class World:
    """Our team (viewer, member, admin), another team whose things carry a secret marker, and an outsider who
    owns a third team."""

    def __init__(self, factory: Any, app: Any) -> None:
        self.factory, self.app = factory, app
        self.secret = f"SECRET-{uuid.uuid4().hex}"
        self.own_team, other_team = factory.team(), factory.team()
        self.team = str(self.own_team["_id"])
        self.users = {role: factory.user(role, self.own_team, api_key=True) for role in ("viewer", "member", "admin")}
        self.users["outsider"] = factory.user("owner", api_key=True)
        self.owner = factory.user("owner", self.own_team)
        stranger = factory.user("owner", other_team)
        self.own_app = factory.app_record(self.team)
        other_app = factory.app_record(str(other_team["_id"]), reply=self.secret)
        own_session = factory.session(self.owner, self.own_app, "hello")
        other_session = factory.session(stranger, other_app, self.secret)
        with app.app_context():
            other_key = accounts_service.create_api_key(stranger.oid, self.secret)[0]
            own_hook = self.webhook(self.own_team["_id"], self.owner)
            other_hook = self.webhook(other_team["_id"], stranger)
            own_operation = bulk.start_bulk_cancel(self.own_team["_id"], factory.actor(self.owner), {"ids": []}, None)
            other_operation = bulk.start_bulk_cancel(other_team["_id"], factory.actor(stranger), {"ids": []}, None)
            other_invitation = self.invitation(other_team["_id"], stranger)
        self.ids = {
            "own": {
                "session": str(own_session["_id"]),
                "app": self.own_app,
                "key": None,
                "member": None,
                "operation": str(own_operation["_id"]),
                "invitation": None,
                "team": self.team,
                **own_hook,
            },
            "other-team": {
                "session": str(other_session["_id"]),
                "app": other_app,
                "key": str(other_key["_id"]),
                "member": stranger.account_id,
                "operation": str(other_operation["_id"]),
                "invitation": other_invitation,
                **other_hook,
            },
            "nonexistent": {
                "session": "0" * 24,
                "app": "1" * 24,
                "key": "2" * 24,
                "member": "3" * 24,
                "operation": "4" * 24,
                "webhook": "5" * 24,
                "delivery": "6" * 24,
                "invitation": "7" * 24,
            },
            "malformed": {
                "session": "not-an-id",
                "app": "ZZZ",
                "key": "12",
                "member": "a" * 23,
                "operation": "x",
                "webhook": "w",
                "delivery": "d",
                "invitation": "i",
            },
        }

    def webhook(self, team_id: Any, user: Any) -> dict[str, str]:
        """An endpoint of the team with one delivery recorded, as ids."""
        endpoint, _ = webhooks.create_endpoint(team_id, "http://127.0.0.1:9/hook", [], self.factory.actor(user))
        webhooks.record_deliveries(team_id, [(f"x:{uuid.uuid4().hex}", {"type": "session.started", "data": {}})])
        delivery = webhooks.repo.list_deliveries(team_id, endpoint["_id"])[0]
        return {"webhook": str(endpoint["_id"]), "delivery": str(delivery["_id"])}

    def invitation(self, team_id: Any, inviter: Any) -> str:
        """The id of an invitation of the team, for an email nobody has."""
        email = f"invited-{uuid.uuid4().hex[:8]}@example.com"
        _, invitation = accounts_service.invite_member(
            team_id, email, "member", granted_by="owner", invited_by=inviter.oid
        )
        return str(invitation["_id"])

    def fresh(self, kind: str | None) -> dict[str, str]:
        """Own ids with a fresh object of `kind` in place, for a request that may change or remove it."""
        ids = dict(self.ids["own"])
        if kind in ("idle-session", "ended-session"):
            session = self.factory.session(self.owner, self.own_app)
            if kind == "ended-session":
                with self.app.app_context():
                    actor = self.factory.actor(self.owner)
                    sessions_service.cancel_session(self.own_team["_id"], session["_id"], actor, CancelSource.API)
            ids["session"] = str(session["_id"])
        elif kind == "app":
            ids["app"] = self.factory.app_record(self.team)
        elif kind == "public-app":
            ids["app"] = self.factory.app_record(self.team, sharing={"mode": "public"})
        elif kind == "member":
            ids["member"] = self.factory.user("member", self.own_team).account_id
        elif kind == "webhook":
            with self.app.app_context():
                ids.update(self.webhook(self.own_team["_id"], self.owner))
        elif kind == "invitation":
            with self.app.app_context():
                ids["invitation"] = self.invitation(self.own_team["_id"], self.owner)
        return ids

    def newcomer(self) -> str:
        """The email of an account on no team yet."""
        email = f"newcomer-{uuid.uuid4().hex[:8]}@example.com"
        with self.app.app_context():
            accounts_service.create_account(email, PASSWORD)
        return email


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {"WEBHOOK_ALLOW_PRIVATE": True, "SSE_HEARTBEAT": 0.2}  # endpoints on loopback for the matrix


def _routes(app: Any) -> list[tuple[str, str, str]]:
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            routes.append((rule.endpoint, method, re.sub(r"<\w+:(\w+)>", r"<\1>", rule.rule)))  # no converters
    return routes


def _expected(app: Any, endpoint: str, rule: str, actor: str, case: str, id_kind: str | None) -> int:
    """Sign-in first; on team routes then membership and role; then the id: malformed 400, not yours 404."""
    route = ROUTES[endpoint]
    if actor == "anonymous":
        return 401
    if route.browser_only:
        return 403
    permission = getattr(app.view_functions[endpoint], "required_permission", None)
    role_allows = permission is None or bool(permissions_for("owner" if actor == "outsider" else actor) & permission)
    if ("<resourceSlug>" in rule or route.team_in_body) and (actor == "outsider" or not role_allows):
        return 403
    if id_kind and case == "malformed":
        return 400
    if id_kind and (case in ("other-team", "nonexistent") or actor == "outsider"):
        return 404
    if not role_allows:
        return 403
    return route.ok


def _fill(value: Any, ids: dict[str, str], newcomer: Callable[[], str]) -> Any:
    if not isinstance(value, str):
        return value
    if value == "{newcomer}":
        return newcomer()
    return value.format(**{"team": "", **{k: v or "" for k, v in ids.items()}})


@pytest.mark.parametrize("actor", ACTORS)
def test_security_matrix(app, factory, actor):
    world = World(factory, app)
    routes = _routes(app)
    missing = sorted({endpoint for endpoint, _, _ in routes} - set(ROUTES))
    assert not missing, f"routes without a security-matrix entry: {missing}"
    failures = []
    for endpoint, method, rule in routes:
        route = ROUTES[endpoint]
        if route.shared:
            continue  # test_share_matrix.py
        id_kind = next((kind for param, kind in ID_PARAMS.items() if f"<{param}>" in rule), None) or route.body_id
        for case in CASES if id_kind else ["own"]:
            if id_kind in CALLERS_OWN and case == "own" and route.fresh is None:
                continue  # the caller's own key or invitation: see CALLERS_OWN
            ids = world.fresh(route.fresh) if case == "own" else world.ids[case]
            path = rule.replace("<resourceSlug>", world.team)
            for param, kind in ID_PARAMS.items():
                path = path.replace(f"<{param}>", str(ids[kind]))
            body = {k: _fill(v, ids, world.newcomer) for k, v in (route.body or {}).items()}
            headers = {"Accept": "application/json"}
            if actor != "anonymous":
                headers["Authorization"] = f"Bearer {world.users[actor].api_key}"
            response = app.test_client().open(
                path, method=method, json=body if method != "GET" else None, headers=headers, buffered=not route.stream
            )
            if route.stream and response.status_code == 200:
                assert response.mimetype == "text/event-stream"
                next(iter(response.response))  # the stream opened; its first line is enough
                response.close()
                continue
            expected = _expected(app, endpoint, rule, actor, case, id_kind)
            text = response.get_data(as_text=True)
            if response.status_code != expected:
                failures.append(f"{method} {rule} on {case}: {response.status_code}, expected {expected}: {text[:160]}")
            if world.secret in text:
                failures.append(f"{method} {rule} on {case} leaked another team's data")
            if response.status_code >= 400:
                body_out = response.get_json(silent=True)
                if not isinstance(body_out, dict) or set(body_out) - {"message", "code", "errors"}:
                    failures.append(f"{method} {rule} on {case}: error body is not {{message, code}}: {text[:120]}")
    assert not failures, "\n".join(failures)


def test_every_team_route_declares_a_permission(app):
    for endpoint, _method, rule in _routes(app):
        view = app.view_functions[endpoint]
        if "<resourceSlug>" in rule or endpoint.startswith("managed_agents."):
            assert isinstance(getattr(view, "required_permission", None), Permission), endpoint


def test_other_teams_session_id_in_our_team_path_is_404(app, factory):
    world = World(factory, app)
    admin = world.users["admin"]
    sid = world.ids["other-team"]["session"]
    headers = {"Authorization": f"Bearer {admin.api_key}"}
    response = app.test_client().get(f"/{world.team}/session/{sid}.json", headers=headers)
    assert response.status_code == 404 and world.secret not in response.get_data(as_text=True)
