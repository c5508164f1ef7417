"""Schemathesis hooks for `make contract`: what `openapi.yaml` says in words but a generator cannot know, and what
keeps the run's side effects where they belong.

Loaded by the `st run` that `devtools.contract` starts (its `hooks` setting), never by the product. The run tells
them, through the environment, where its webhooks must go and which app is its own.
"""

from __future__ import annotations

import os
import re
from typing import Any

import requests
import schemathesis
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.meta import TestPhase

OBJECT_ID = re.compile(r"[a-f0-9]{24}")
# An http(s) URL up to its host (and port): what a webhook registration resolves and later connects to.
HTTP_AUTHORITY = re.compile(r"^(?P<scheme>[Hh][Tt][Tt][Pp][Ss]?://)(?P<userinfo>[^/?#@]*@)?(?P<host>[^/?#]*)")
WEBHOOK_REGISTRATION = frozenset({"addWebhook"})
MEMBER_INVITATION = frozenset({"addMember"})
SESSION_STARTS = frozenset({"addSessionApi", "addSharedSession"})
BULK_CANCELS = frozenset({"bulkCancelSessions", "managedBulkCancel"})
TRANSCRIPT_PAGES = frozenset({"getSessionMessages", "sharedSessionMessages"})


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """Fill in, just before each request, what the spec requires in words."""
    operation_id = case.operation.definition.raw.get("operationId")
    if operation_id in WEBHOOK_REGISTRATION:
        _keep_webhooks_on_loopback(case)  # whatever was drawn: no request of the run may leave loopback
    if operation_id in TRANSCRIPT_PAGES:
        _one_cursor(case)
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.BODY):
        return  # a body drawn to be invalid is sent as drawn
    _echo_path_ids(case)
    if operation_id in BULK_CANCELS:
        _only_the_runs_sessions(case)
    elif operation_id in SESSION_STARTS:
        _one_app(case)


def _echo_path_ids(case: schemathesis.Case) -> None:
    """A body field that repeats a path parameter by name (Agentcloud's cancel, edit and start bodies repeat
    `sessionId` and `resourceSlug`) carries the path's value, as a real client sends it: the spec requires the two
    to match, which a schema cannot say. A drawn value that is not a well-formed id is left alone, so it is still
    refused as one."""
    body, path = case.body, case.path_parameters or {}
    if not isinstance(body, dict):
        return
    for name, value in path.items():
        if isinstance(body.get(name), str) and OBJECT_ID.fullmatch(body[name]):
            body[name] = value


def _keep_webhooks_on_loopback(case: schemathesis.Case) -> None:
    """Every http(s) URL a registration names points at the run's receiver: the host (and port) drawn is replaced,
    the rest (scheme, credentials, path) kept, so what makes a URL acceptable or not stays as drawn while the
    registration's address check and every delivery stay on loopback, and no drawn host is ever looked up."""
    receiver = os.environ.get("CONTRACT_HOOK_WEBHOOK_URL", "")
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        return
    own = HTTP_AUTHORITY.match(receiver)
    drawn = HTTP_AUTHORITY.match(body["url"])
    if drawn is None:
        return  # not an http(s) URL: refused before any lookup
    if own is None:
        raise RuntimeError("the contract run registers webhooks only at its own receiver; none was given")
    rest = body["url"][drawn.end() :]
    body["url"] = drawn.group("scheme") + (drawn.group("userinfo") or "") + own.group("host") + rest


def _only_the_runs_sessions(case: schemathesis.Case) -> None:
    """A bulk cancel cancels only sessions of the run's own app: against a deployment, `all: true` would otherwise
    end every live session of the team. A drawn `appId` that is not a well-formed id is left alone, so it is still
    refused as one."""
    app_id = os.environ.get("CONTRACT_HOOK_APP_ID")
    body = case.body
    if not app_id or not isinstance(body, dict):
        return
    if "appId" not in body or (isinstance(body["appId"], str) and OBJECT_ID.fullmatch(body["appId"])):
        body["appId"] = app_id


def _one_app(case: schemathesis.Case) -> None:
    """Agentcloud's `id` and our `appId` name the same app when both are sent (a schema cannot say two fields must
    be equal): `id` carries `appId`'s value. A drawn value that is not a well-formed id is left alone."""
    body = case.body
    if not isinstance(body, dict):
        return
    ids = [body.get("appId"), body.get("id")]
    if all(isinstance(value, str) and OBJECT_ID.fullmatch(value) for value in ids):
        body["id"] = body["appId"]


def _one_cursor(case: schemathesis.Case) -> None:
    """`after` and `messageId` are two ways to give the same cursor, and both at once is a `400`, which parameter
    schemas cannot say: a valid query keeps `after` only. A query drawn to be invalid is sent as drawn."""
    query = case.query
    if not isinstance(query, dict) or "after" not in query or "messageId" not in query:
        return
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.QUERY):
        return
    del query["messageId"]


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: Any) -> None:
    """A webhook registered outside the stateful phase is removed again at once: a team keeps at most 20 endpoints,
    and the generated phases would otherwise fill them, leaving the stateful phase's add → rotate → deliveries →
    delete chains only `409`s to follow (and every session event of the run delivered 20 times). A member
    invitation is withdrawn again likewise, so a run leaves none behind."""
    operation_id = case.operation.definition.raw.get("operationId")
    if case.meta is not None and case.meta.phase.name == TestPhase.STATEFUL:
        return
    request = response.request
    headers = {name: value for name, value in request.headers.items() if name.lower() == "authorization"}
    if operation_id in WEBHOOK_REGISTRATION and response.status_code == 201:
        url = str(request.url).split("?", 1)[0].removesuffix("/add") + f"/{response.json()['_id']}"
        requests.delete(url, headers=headers, timeout=10)
    elif operation_id in MEMBER_INVITATION and response.status_code == 200 and _json(response).get("invited"):
        team_url = str(request.url).split("?", 1)[0].removesuffix("/member/add")
        requests.delete(f"{team_url}/invitation/{response.json()['_id']}", headers=headers, timeout=10)


def _json(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
