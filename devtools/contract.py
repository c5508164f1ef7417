"""`make contract`: schemathesis checks every response against `openapi.yaml`.

    python -m devtools.contract                  # starts its own stack on loopback, seeded
    BASE_URL=http://host:port API_KEY=ak_... python -m devtools.contract   # any running instance

The self-started stack is gunicorn plus a turn worker on a MongoDB-wire server and redis-server (see
`devstack.Stack`), with rate limits raised so the run measures conformance, not the limiter. Path parameters
are pinned to real objects (the caller's team, and two apps and a session with a transcript that the run creates
there) so requests reach the services instead of stopping at the team check; the spec's links drive
create → get → cancel → cancel again → delete on the sessions the run creates. Member routes act on an account
that does not exist, so a run never changes who is on the team. Every schemathesis check runs (`--checks all`),
with `devtools/contract_hooks.py` filling in what the spec states only in words. Exit status 0: no check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
    "DEFAULT_RATE_LIMIT": "100000 per minute",
    "LOGIN_RATE_LIMIT": "100000 per minute",
    "CANCEL_POLL_INTERVAL": "0.1",
    "LOG_LEVEL": "WARNING",
}
# Sessions started during the run use this app: short turns, so cancels and deletes meet every state.
FAST_APP = {"name": "contract: fast scripted agent", "runner": "scripted", "config": {"steps": 3, "stepDelay": 0.05}}
SCRATCH_APP = {"name": "contract: app to edit", "runner": "scripted", "config": {"steps": 1}}
MANAGE_ROLES = ("admin", "owner")
# Long enough for create → get → cancel → cancel again → delete → get within one scenario.
STATEFUL_STEPS = 12
# Member routes act on this account, which exists nowhere: a run must not edit or remove real members (a
# deployment's test team, or the key's own account) through ids it reads or infers from members.json.
NO_ACCOUNT = "0" * 24
# The run's own schemathesis hooks (a module path, imported by `st run` from the project root).
HOOKS = "devtools.contract_hooks"
# Statuses a schema-valid create may also answer, for the state it meets: besides schemathesis's defaults, 422 for an
# `Idempotency-Key` already used with another body (the IETF draft's answer, documented on both operations), which
# drawn keys hit as soon as two examples share one.
IDEMPOTENT_CREATES = ["addSessionApi", "managedCreateSession"]
VALID_REQUEST_STATUSES = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
# Statuses that refuse an invalid request: schemathesis's defaults, and 413 for a body drawn over the size limit.
INVALID_REQUEST_STATUSES = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
# Operations only a browser session may call (an API key is a 403). The run has none, so each of its requests is
# refused before its input is read: a JSON 401, or for a form post the 302 to the sign-in page a browser gets.
BROWSER_ONLY = ["createApiKey", "revokeApiKey", "signOutEverywhere"]
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


@dataclass(frozen=True)
class Targets:
    """The instance under test and the real objects its path parameters are pinned to."""

    base_url: str
    api_key: str
    team_id: str
    app_id: str  # sessions start from this app
    scratch_app_id: str  # app reads and edits act on this one (deletes follow links to apps the run creates)
    session_id: str  # transcript reads act on this one, which has a finished turn


class ContractError(RuntimeError):
    """The harness could not prepare a run (the instance is unreachable or the key is unusable)."""


def _call(base_url: str, api_key: str, method: str, path: str, body: object = None, expect: int = 200) -> Any:
    response = requests.request(
        method, base_url.rstrip("/") + path, json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=15
    )
    if response.status_code != expect:
        raise ContractError(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def prepare_targets(base_url: str, api_key: str) -> Targets:
    """Pick the caller's team (one they manage, if any) and create the run's apps and transcript session there."""
    teams = _call(base_url, api_key, "GET", "/account.json")["teams"]
    if not teams:
        raise ContractError("the API key's account is on no team; nothing would get past the team check")
    team = next((t for t in teams if t["role"] in MANAGE_ROLES), teams[0])
    team_id = team["_id"]
    if team["role"] in MANAGE_ROLES:
        app_id = _call(base_url, api_key, "POST", f"/{team_id}/forms/app/add", FAST_APP)["_id"]
        scratch_id = _call(base_url, api_key, "POST", f"/{team_id}/forms/app/add", SCRATCH_APP)["_id"]
    else:
        apps = _call(base_url, api_key, "GET", f"/{team_id}/apps.json")["apps"]
        if not apps:
            raise ContractError(f"team {team_id} has no app and the key's role ({team['role']}) cannot add one")
        app_id = scratch_id = apps[0]["_id"]
    return Targets(base_url.rstrip("/"), api_key, team_id, app_id, scratch_id, _transcript(base_url, api_key, app_id))


def _transcript(base_url: str, api_key: str, app_id: str, timeout: float = 20) -> str:
    """A session whose first turn has finished, so transcript reads return real events."""
    body = {"appId": app_id, "name": "contract: transcript", "message": "Hello from the contract run."}
    session_id = _call(base_url, api_key, "POST", "/api/managed-agents/sessions", body, expect=201)["session"]["_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        session = _call(base_url, api_key, "GET", f"/api/managed-agents/sessions/{session_id}")["session"]
        if not session["turnInFlight"]:
            return session_id
        time.sleep(0.2)
    raise ContractError(f"session {session_id}'s first turn did not finish within {timeout:g} s; is a worker running?")


def schemathesis_config(targets: Targets) -> str:
    """The run's `schemathesis.toml`: the API key for `bearerAuth`, and path and body ids pinned to real objects."""
    quote = json.dumps  # TOML basic strings accept JSON's escapes

    def pin(operation_ids: list[str], parameter: str, value: str) -> list[str]:
        return [
            "[[operations]]",
            f"include-operation-id = {quote(operation_ids)}",
            f"parameters = {{ {quote(parameter)} = {quote(value)} }}",
            "",
        ]

    return "\n".join(
        [
            f"hooks = {quote(HOOKS)}",
            "",
            "[parameters]",
            f'"path.resourceSlug" = {quote(targets.team_id)}',
            f'"body.appId" = {quote(targets.app_id)}',
            "",
            "[auth.openapi.bearerAuth]",
            f"bearer = {quote(targets.api_key)}",
            "",
            f"[checks.negative_data_rejection]\nexpected-statuses = {quote(INVALID_REQUEST_STATUSES)}",
            "",
            f"[phases.stateful]\nmax-steps = {STATEFUL_STEPS}",
            # Ids seen in responses would otherwise be fed to the delete routes, removing the pinned objects
            # early; the stateful phase still chains real ids through the spec's links.
            *[f"[phases.{phase}.extra-data-sources]\nresponses = false" for phase in PHASES if phase != "stateful"],
            "",
            *pin(["getApp", "editApp"], "path.appId", targets.scratch_app_id),
            *pin(["getSessionMessages", "managedSessionEvents"], "path.sessionId", targets.session_id),
            *pin(["editMember", "removeMember", "removeMemberForm"], "path.accountId", NO_ACCOUNT),
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
            "--checks",
            ",".join(options.checks),
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
        print(f"contract: {targets.base_url} team={targets.team_id} reports in {report_dir}", flush=True)
        return subprocess.run(command, cwd=PROJECT_ROOT, check=False).returncode


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


def run_self_started(options: Options, mongo_url: str | None = None, redis_url: str | None = None) -> int:
    """The contract run against a fresh seeded stack; its exit status."""
    with self_started_stack(mongo_url, redis_url) as (base_url, api_key):
        return run_schemathesis(prepare_targets(base_url, api_key), options)


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
    args = parser.parse_args(argv)
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    return Options(args.max_examples, phases, checks, args.workers, args.seed, args.max_failures, args.report_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `make contract`."""
    options = _parse_args(argv)
    base_url, api_key = os.environ.get("BASE_URL"), os.environ.get("API_KEY")
    try:
        if base_url:
            if not api_key:
                raise ContractError("BASE_URL is set but API_KEY is not: the run needs a key for that instance")
            return run_schemathesis(prepare_targets(base_url, api_key), options)
        return run_self_started(options)
    except (ContractError, requests.RequestException) as exc:
        print(f"contract: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
