"""`make contract`: schemathesis checks every response against `openapi.yaml`.

    python -m devtools.contract                  # starts its own stack on loopback, seeded
    BASE_URL=http://host:port API_KEY=ak_... python -m devtools.contract   # any running instance

The self-started stack is gunicorn plus a turn worker on a MongoDB-wire server and redis-server (see
`devstack.Stack`), with rate limits raised so the run measures conformance, not the limiter. Path parameters are
pinned to real objects the run creates in the caller's team (three apps, a session with a transcript, an ended
session, a bulk operation, a webhook endpoint and one of its deliveries) so requests reach the services instead of
stopping at the team check; the spec's links drive create → get → cancel → cancel again → delete on the sessions
the run creates. Member routes act on an account that does not exist (and invite an address nobody can have), so a
run never changes who is on the team; the team's name and default limits, which the run edits, are put back
afterwards. Every schemathesis check runs (`--checks all`), with `devtools/contract_hooks.py` filling in what the
spec states only in words. Exit status 0: no check failed.

Two kinds of operation need more than a pinned id:

* **Live streams** (`sessionEventStream`, `managedSessionStream`) answer `text/event-stream` until the session
  ends, which a generated request cannot wait for. They are pinned to a session that has already ended, so each
  stream replays what is after its cursor, sends its final `session.ended` frame and closes; and they are left
  out of the stateful phase, whose links would otherwise open them on live sessions the run just created. Their
  frames are checked against the spec's schemas by tests/contract/test_live_contract.py.
* **Webhooks** must never send the run's traffic beyond loopback. The self-started stack allows private
  addresses (`WEBHOOK_ALLOW_PRIVATE`) and every registration the run makes names a receiver the run serves on
  127.0.0.1 (the `url` is pinned, and the hooks point any other http(s) URL drawn at it), so deliveries and the
  registration's own address check stay on this machine. Against a deployment, webhooks are registered only at
  `CONTRACT_WEBHOOK_URL` (a receiver of your own, which the deployment must accept); without it the operations
  that register one are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from agentcloud_clone.config import PROJECT_ROOT

SPEC_PATH = PROJECT_ROOT / "openapi.yaml"
REPORT_ROOT = PROJECT_ROOT / "test-artifacts" / "contract"
# Every schemathesis check: status codes, content types, schemas and headers of responses, valid requests accepted
# and invalid ones refused, auth enforced, `Allow` and 405s, resources gone after a delete.
CHECKS = ("all",)
PHASES = ("examples", "coverage", "fuzzing", "stateful")
# Limits high enough that a bounded run never meets them; 429s are still in the spec for real instances.
STACK_SETTINGS = {
    "CANCEL_RATE_LIMIT": "100000 per minute",
    "BULK_CANCEL_RATE_LIMIT": "100000 per minute",
    "DEFAULT_RATE_LIMIT": "100000 per minute",
    "LOGIN_RATE_LIMIT": "100000 per minute",
    "LOGIN_ADDRESS_RATE_LIMIT": "100000 per minute",
    "SHARE_RATE_LIMIT": "100000 per minute",
    "SHARE_START_RATE_LIMIT": "100000 per minute",
    "CANCEL_POLL_INTERVAL": "0.1",
    # The run checks what the server answers, not how it degrades: on a busy machine the store must not look away
    # (a 1 s deadline missed there opened the breaker, and the run saw 503s).
    "MONGO_TIMEOUT": "10",
    "REDIS_TIMEOUT": "5",
    "LOG_LEVEL": "WARNING",
    # The run's webhook receiver listens on loopback; nothing the run registers points anywhere else.
    "WEBHOOK_ALLOW_PRIVATE": "true",
    "WEBHOOK_REQUIRE_HTTPS": "false",
    # Nor is a drawn app's baseUrl host looked up when the app is saved (only a turn would connect to it).
    "UPSTREAM_ALLOW_PRIVATE": "true",
}
# Sessions started during the run use this app: short turns, so cancels and deletes meet every state.
FAST_APP = {"name": "contract: fast scripted agent", "runner": "scripted", "config": {"steps": 3, "stepDelay": 0.05}}
SCRATCH_APP = {"name": "contract: app to edit", "runner": "scripted", "config": {"steps": 1}}
# Shared by link, so replacing its share link succeeds.
SHARED_APP = {
    "name": "contract: shared app",
    "runner": "scripted",
    "config": {"steps": 1},
    "sharingConfig": {"mode": "public"},
}
# Against a deployment: where the run may register webhooks (a receiver of yours the deployment accepts).
WEBHOOK_URL_VARIABLE = "CONTRACT_WEBHOOK_URL"
# The operations that register a webhook, skipped against a deployment without CONTRACT_WEBHOOK_URL.
WEBHOOK_REGISTRATION = ["addWebhook"]
# Live SSE streams: pinned to an ended session (so each one closes) and kept out of the stateful phase.
STREAMS = ["sessionEventStream", "managedSessionStream"]
# The shared routes (/s/<team>/...). A visitor token is a capability for one session, not an identity: one that fits
# no session is answered like a session that is not there (404, whether it exists or not), never 401, by design
# (README, Sharing). schemathesis's ignored_auth check wants 401 or 403 for it, so it is off for these operations;
# tests/contract/test_live_contract.py checks instead that each answers 401 to a request presenting nothing and 404
# to an unknown visitor token.
SHARED = [
    "addSharedSession",
    "sharedSessionJson",
    "sharedSessionMessages",
    "editSharedSession",
    "startSharedSession",
    "sendSharedMessage",
    "cancelSharedSession",
]
# Reads of a transcript, pinned to a session that has one.
TRANSCRIPT_READS = ["getSessionMessages", "managedSessionEvents", "sharedSessionJson", "sharedSessionMessages"]
MANAGE_ROLES = ("admin", "owner")
# Long enough for create → get → cancel → cancel again → delete → get within one scenario.
STATEFUL_STEPS = 12
# Member routes act on this account, which exists nowhere: a run must not edit or remove real members (a
# deployment's test team, or the key's own account) through ids it reads or infers from members.json.
NO_ACCOUNT = "0" * 24
# The address member invitations of a run go to (a reserved domain: no account can have it). Each is withdrawn
# again at once outside the stateful phase (devtools.contract_hooks), whose links withdraw their own.
INVITED_EMAIL = "contract-run@example.invalid"
# The run's own schemathesis hooks (a module path, imported by `st run` from the project root), and what they are
# told through the environment: the URL every webhook the run registers must name, and the run's own app.
HOOKS = "devtools.contract_hooks"
HOOK_WEBHOOK_URL = "CONTRACT_HOOK_WEBHOOK_URL"
HOOK_APP_ID = "CONTRACT_HOOK_APP_ID"
# Statuses a schema-valid request with an `Idempotency-Key` may also answer, for the state it meets: besides
# schemathesis's defaults, 422 for a key already used with another body (the IETF draft's answer, documented on each
# of these operations), which drawn keys hit as soon as two examples share one.
IDEMPOTENT_CREATES = ["addSessionApi", "managedCreateSession", "bulkCancelSessions", "managedBulkCancel"]
VALID_REQUEST_STATUSES = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
# Statuses that refuse an invalid request: schemathesis's defaults, and 413 for a body drawn over the size limit.
INVALID_REQUEST_STATUSES = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
# Operations only a browser session may call (an API key is a 403). The run has none, so each of its requests is
# refused before its input is read: a JSON 401, or for a form post the 302 to the sign-in page a browser gets.
BROWSER_ONLY = ["createApiKey", "revokeApiKey", "signOutEverywhere", "changePassword"]
MISSING_HEADER_STATUSES = ["400", "401", "403", "406", "415", "422"]  # a missing X-CSRFToken, say


@dataclass(frozen=True)
class Options:
    """How much to generate: bounded so a full run takes a few minutes at most."""

    max_examples: int = 60
    phases: tuple[str, ...] = PHASES
    checks: tuple[str, ...] = CHECKS
    workers: int = 4
    seed: int | None = None
    max_failures: int | None = None
    report_dir: Path | None = None
    operation_ids: tuple[str, ...] = ()  # only these operations (all when empty)


@dataclass(frozen=True)
class Targets:
    """The instance under test and the real objects its path parameters are pinned to."""

    base_url: str
    api_key: str
    team_id: str
    app_id: str  # sessions start from this app
    scratch_app_id: str  # app reads and edits act on this one (deletes follow links to apps the run creates)
    session_id: str  # transcript reads act on this one, which has a finished turn
    ended_session_id: str = NO_ACCOUNT  # live streams read this one, which has ended (so they close)
    shared_app_id: str = NO_ACCOUNT  # a public app, whose share link the run replaces
    operation_id: str = NO_ACCOUNT  # a bulk cancel's operation
    webhook_url: str | None = None  # every webhook the run registers points here (None: it registers none)
    webhook_id: str = NO_ACCOUNT  # an endpoint at webhook_url
    delivery_id: str = NO_ACCOUNT  # one of its deliveries
    team_settings: dict[str, Any] | None = None  # the team's name and limits before the run, put back after it


class ContractError(RuntimeError):
    """The harness could not prepare a run (the instance is unreachable or the key is unusable)."""


def _call(base_url: str, api_key: str, method: str, path: str, body: object = None, expect: int = 200) -> Any:
    response = requests.request(
        method, base_url.rstrip("/") + path, json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=15
    )
    if response.status_code != expect:
        raise ContractError(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def prepare_targets(base_url: str, api_key: str, webhook_url: str | None = None) -> Targets:
    """Pick the caller's team (one they manage, if any) and create there what the run's ids are pinned to: its
    apps, a session with a transcript and an ended one, a bulk operation, and (given `webhook_url`) a webhook
    endpoint with a delivery. A team the caller does not manage gets reads only."""
    teams = _call(base_url, api_key, "GET", "/account.json")["teams"]
    if not teams:
        raise ContractError("the API key's account is on no team; nothing would get past the team check")
    team = next((t for t in teams if t["role"] in MANAGE_ROLES), teams[0])
    team_id = team["_id"]
    manages = team["role"] in MANAGE_ROLES
    if not manages:
        apps = _call(base_url, api_key, "GET", f"/{team_id}/apps.json")["apps"]
        if not apps:
            raise ContractError(f"team {team_id} has no app and the key's role ({team['role']}) cannot add one")
        app_id = apps[0]["_id"]
        session_id = _finished_session(base_url, api_key, app_id, "contract: transcript")
        return Targets(base_url.rstrip("/"), api_key, team_id, app_id, app_id, session_id)
    settings = _call(base_url, api_key, "GET", f"/{team_id}/team.json")["team"]
    add_app = f"/{team_id}/forms/app/add"
    app_id = _call(base_url, api_key, "POST", add_app, FAST_APP)["_id"]
    scratch_id = _call(base_url, api_key, "POST", add_app, SCRATCH_APP)["_id"]
    shared_id = _call(base_url, api_key, "POST", add_app, SHARED_APP)["_id"]
    webhook_id = None
    if webhook_url is not None:
        hook = {"url": webhook_url, "eventTypes": []}
        webhook_id = _call(base_url, api_key, "POST", f"/{team_id}/forms/webhook/add", hook, expect=201)["_id"]
    session_id = _finished_session(base_url, api_key, app_id, "contract: transcript")
    ended_id = _finished_session(base_url, api_key, app_id, "contract: ended")
    _call(base_url, api_key, "POST", f"/{team_id}/forms/session/{ended_id}/cancel", {"reason": "contract run"})
    bulk = {"ids": [ended_id], "reason": "contract run"}
    operation_id = _call(base_url, api_key, "POST", f"/{team_id}/forms/session/bulk-cancel", bulk, expect=202)[
        "operationId"
    ]
    delivery_id = NO_ACCOUNT
    if webhook_id is not None:
        delivery_id = _first_delivery(base_url, api_key, team_id, webhook_id)
    return Targets(
        base_url.rstrip("/"),
        api_key,
        team_id,
        app_id,
        scratch_id,
        session_id,
        ended_session_id=ended_id,
        shared_app_id=shared_id,
        operation_id=operation_id,
        webhook_url=webhook_url,
        webhook_id=webhook_id or NO_ACCOUNT,
        delivery_id=delivery_id,
        team_settings={"name": settings["name"], "limits": settings.get("limits") or {}},
    )


def _finished_session(base_url: str, api_key: str, app_id: str, name: str, timeout: float = 20) -> str:
    """A session whose first turn has finished, so transcript reads return real events."""
    body = {"appId": app_id, "name": name, "message": "Hello from the contract run."}
    session_id = _call(base_url, api_key, "POST", "/api/managed-agents/sessions", body, expect=201)["session"]["_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        session = _call(base_url, api_key, "GET", f"/api/managed-agents/sessions/{session_id}")["session"]
        if not session["turnInFlight"]:
            return session_id
        time.sleep(0.2)
    raise ContractError(f"session {session_id}'s first turn did not finish within {timeout:g} s; is a worker running?")


def _first_delivery(base_url: str, api_key: str, team_id: str, webhook_id: str, timeout: float = 20) -> str:
    """A delivery of the endpoint (the sessions made above announce themselves), once it is recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliveries = _call(base_url, api_key, "GET", f"/{team_id}/webhook/{webhook_id}/deliveries.json")["deliveries"]
        if deliveries:
            return str(deliveries[-1]["_id"])
        time.sleep(0.2)
    raise ContractError(f"webhook endpoint {webhook_id} recorded no delivery within {timeout:g} s")


def restore_team(targets: Targets) -> None:
    """Put back the team's name and default limits, which the run's team edits change."""
    if targets.team_settings is None:
        return
    try:
        _call(targets.base_url, targets.api_key, "POST", f"/{targets.team_id}/forms/team/edit", targets.team_settings)
    except (ContractError, requests.RequestException) as exc:
        print(f"contract: could not put back team {targets.team_id}'s name and limits: {exc}", file=sys.stderr)


def schemathesis_config(targets: Targets) -> str:
    """The run's `schemathesis.toml`: the API key for `bearerAuth`, and path and body ids pinned to real objects."""
    quote = json.dumps  # TOML basic strings accept JSON's escapes

    def pin(operation_ids: list[str], parameters: dict[str, str], *settings: str) -> list[str]:
        # One entry per operation and option: where two entries name the same option, the first one wins.
        pinned = ", ".join(f"{quote(name)} = {quote(value)}" for name, value in parameters.items())
        return [
            "[[operations]]",
            f"include-operation-id = {quote(operation_ids)}",
            f"parameters = {{ {pinned} }}",
            *settings,
            "",
        ]

    webhooks: list[str] = []
    if targets.webhook_url is None:
        webhooks = ["[[operations]]", f"include-operation-id = {quote(WEBHOOK_REGISTRATION)}", "enabled = false", ""]
    else:
        webhooks = pin(WEBHOOK_REGISTRATION, {"body.url": targets.webhook_url})
    webhook = {"path.webhookId": targets.webhook_id}
    return "\n".join(
        [
            f"hooks = {quote(HOOKS)}",
            # A body the spec leaves free (`CsrfOnly`'s JSON: anything, ignored) can draw examples over Hypothesis's
            # size limit for some seeds, which aborts the operation without sending a request: a generator limit,
            # not a finding about the API.
            'suppress-health-check = ["data_too_large"]',
            "",
            "[parameters]",
            f'"path.resourceSlug" = {quote(targets.team_id)}',
            f'"body.appId" = {quote(targets.app_id)}',
            # Agentcloud's alias of appId: a different app beside the pinned appId would be a 400.
            f'"body.id" = {quote(targets.app_id)}',
            f'"body.teamId" = {quote(targets.team_id)}',
            "",
            "[auth.openapi.bearerAuth]",
            f"bearer = {quote(targets.api_key)}",
            "",
            f"[checks.negative_data_rejection]\nexpected-statuses = {quote(INVALID_REQUEST_STATUSES)}",
            "",
            f"[phases.stateful]\nmax-steps = {STATEFUL_STEPS}",
            # Error feedback reads the server's 400s (marshmallow's messages) to reshape what the fuzzing phase
            # draws, and then judges drawn values against the reshaped schema: it sent `ids` of arbitrary strings and
            # a form's garbage `resourceSlug` as valid requests, the spec's ObjectId pattern lost on the way.
            "[phases.fuzzing.error-feedback]\nenabled = false",
            # Ids seen in responses would otherwise be fed to the delete routes, removing the pinned objects
            # early; the stateful phase still chains real ids through the spec's links.
            *[f"[phases.{phase}.extra-data-sources]\nresponses = false" for phase in PHASES if phase != "stateful"],
            "",
            *pin(["getApp", "editApp"], {"path.appId": targets.scratch_app_id}),
            *pin(["renewShareLink"], {"path.appId": targets.shared_app_id}),
            *pin(TRANSCRIPT_READS, {"path.sessionId": targets.session_id}),
            "[[operations]]",
            f"include-operation-id = {quote(SHARED)}",
            "checks.ignored_auth.enabled = false",
            "",
            # No HTTP server refuses a header it does not know: a stream's only header parameter, Last-Event-ID, is
            # checked with drawn values, not with extra headers beside it.
            *pin(
                STREAMS,
                {"path.sessionId": targets.ended_session_id},
                "phases.stateful.enabled = false",
                "generation.allow-extra-parameters = false",
            ),
            *pin(["operationJson", "managedGetOperation"], {"path.operationId": targets.operation_id}),
            *pin(["rotateWebhookSecret", "listWebhookDeliveries"], webhook),
            *pin(["redeliverWebhook"], {**webhook, "path.deliveryId": targets.delivery_id}),
            *webhooks,
            *pin(["editMember", "removeMember", "removeMemberForm"], {"path.accountId": NO_ACCOUNT}),
            # Invitations go to an address nobody can have, and are answered only for an invitation that is not there.
            *pin(["addMember"], {"body.email": INVITED_EMAIL}),
            *pin(["acceptInvitation", "declineInvitation"], {"path.invitationId": NO_ACCOUNT}),
            "[[operations]]",
            f"include-operation-id = {quote(IDEMPOTENT_CREATES)}",
            f"checks.positive_data_acceptance.expected-statuses = {quote(VALID_REQUEST_STATUSES)}",
            "",
            "[[operations]]",
            f"include-operation-id = {quote(BROWSER_ONLY)}",
            f"checks.negative_data_rejection.expected-statuses = {quote(['302', *INVALID_REQUEST_STATUSES])}",
            f"checks.missing_required_header.expected-statuses = {quote(['302', *MISSING_HEADER_STATUSES])}",
            "",
        ]
    )


def run_schemathesis(targets: Targets, options: Options) -> int:
    """Run `st run` on the spec against the instance; its exit status (0: every check passed)."""
    report_dir = options.report_dir or REPORT_ROOT / time.strftime("%Y%m%d-%H%M%S")
    report_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="contract-") as tmp:
        config = Path(tmp, "schemathesis.toml")
        config.write_text(schemathesis_config(targets))
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            str(SPEC_PATH),
            "--url",
            targets.base_url,
            "--phases",
            ",".join(options.phases),
            "--max-examples",
            str(options.max_examples),
            "--workers",
            str(options.workers),
            "--request-timeout",
            "20",
            "--generation-database",
            "none",
            "--report",
            "junit,ndjson",
            "--report-dir",
            str(report_dir),
            "--no-color",
        ]
        if options.seed is not None:
            command += ["--seed", str(options.seed)]
        if options.max_failures is not None:
            command += ["--max-failures", str(options.max_failures)]
        # Every check is schemathesis's default: naming them (`--checks all`) would also override the few operations
        # that turn one off below, so only a narrower choice is passed on.
        if tuple(options.checks) != CHECKS:
            command += ["--checks", ",".join(options.checks)]
        for operation_id in options.operation_ids:
            command += ["--include-operation-id", operation_id]
        # The hooks point drawn webhook URLs at the run's receiver and keep bulk cancels to the run's own app.
        env = {**os.environ, HOOK_WEBHOOK_URL: targets.webhook_url or "", HOOK_APP_ID: targets.app_id}
        print(f"contract: {targets.base_url} team={targets.team_id} reports in {report_dir}", flush=True)
        try:
            return subprocess.run(command, cwd=PROJECT_ROOT, env=env, check=False).returncode
        finally:
            restore_team(targets)


@contextlib.contextmanager
def self_started_stack(mongo_url: str | None = None, redis_url: str | None = None) -> Iterator[tuple[str, str]]:
    """A seeded stack on loopback, on the given servers or on ones started here; yields (base URL, API key)."""
    from .servers import start_mongo, start_redis
    from .stack import Stack

    with contextlib.ExitStack() as cleanup:
        if redis_url is None:
            redis_url = cleanup.enter_context(start_redis()).url
        if mongo_url is None:
            mongo_url = cleanup.enter_context(start_mongo()).url
        stack = Stack(mongo_url, redis_url, **STACK_SETTINGS)
        cleanup.callback(stack.stop)
        stack.start(webs=1, workers=1)
        yield stack.url, stack.demo["apiKey"]


class WebhookReceiver:
    """Where the run's webhooks go: a server on 127.0.0.1 that answers every delivery `204` and keeps nothing."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/contract-webhooks"

    def __enter__(self) -> WebhookReceiver:
        threading.Thread(target=self.server.serve_forever, name="contract-webhooks", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_self_started(options: Options, mongo_url: str | None = None, redis_url: str | None = None) -> int:
    """The contract run against a fresh seeded stack, its webhooks sent to a receiver on loopback; its exit status."""
    with self_started_stack(mongo_url, redis_url) as (base_url, api_key), WebhookReceiver() as receiver:
        return run_schemathesis(prepare_targets(base_url, api_key, receiver.url), options)


def _parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.contract",
        description="Check every response against openapi.yaml (schemathesis). Set BASE_URL and API_KEY to "
        "test a running instance; otherwise a seeded stack is started on loopback.",
    )
    default_examples = int(os.environ.get("CONTRACT_MAX_EXAMPLES", Options.max_examples))
    parser.add_argument("--max-examples", type=int, default=default_examples, help="per operation and phase")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated: " + ", ".join(PHASES))
    parser.add_argument(
        "--checks", default=",".join(CHECKS), help="comma-separated schemathesis checks, or 'all' (the default)"
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-failures", type=int, default=None)
    parser.add_argument("--report-dir", type=Path, default=None)
    parser.add_argument(
        "--operation-id", action="append", default=[], help="run only this operation (repeatable; all by default)"
    )
    args = parser.parse_args(argv)
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    return Options(
        args.max_examples,
        phases,
        checks,
        args.workers,
        args.seed,
        args.max_failures,
        args.report_dir,
        tuple(args.operation_id),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `make contract`."""
    options = _parse_args(argv)
    base_url, api_key = os.environ.get("BASE_URL"), os.environ.get("API_KEY")
    try:
        if base_url:
            if not api_key:
                raise ContractError("BASE_URL is set but API_KEY is not: the run needs a key for that instance")
            return run_schemathesis(prepare_targets(base_url, api_key, os.environ.get(WEBHOOK_URL_VARIABLE)), options)
        return run_self_started(options)
    except (ContractError, requests.RequestException) as exc:
        print(f"contract: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
