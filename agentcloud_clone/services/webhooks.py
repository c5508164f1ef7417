"""Signed webhooks: team admins register endpoints; sessions starting, turns completing, cancels being asked for
and sessions ending are delivered to them, signed per Standard Webhooks, by RQ jobs with back-off.

Nothing here holds up a request or a turn: the session service hands what it wrote to a background thread,
which records the deliveries and queues their jobs; the reaper sweeps what a crashed process may have left
(deliveries are unique per endpoint and event, so both paths together deliver once). Payloads are thin:
ids, type, status, end reason, timestamps.

Where a delivery may go is checked when the endpoint is saved and again at every attempt, against the
addresses the name resolves to then, and the connection is made to the address that was checked: https
only in production, and never loopback, private or link-local addresses unless WEBHOOK_ALLOW_PRIVATE.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import certifi
import redis
import urllib3
from bson import ObjectId
from flask import Flask, current_app, has_app_context
from standardwebhooks import Webhook

from .. import destinations, queueing
from ..access import Actor
from ..background import BackgroundQueue
from ..errors import Conflict, InvalidInput, NotFound
from ..repositories import webhooks as repo
from ..sealing import UnsealError, seal, unseal
from ..timeutil import utcnow
from ..vocabulary import WEBHOOK_EVENTS, EventType, Status, WebhookEvent

log = logging.getLogger(__name__)
MAX_ENDPOINTS = 20
TIMEOUT = urllib3.Timeout(connect=3.0, read=5.0)
# How old a process's list of the teams with endpoints may get when Redis cannot say whether it changed.
TEAMS_REFRESH = 5.0
# How long a process trusts what it read about endpoints (that list, the endpoints themselves) while their version
# in Redis stays the same: a change whose move of the version was lost to a Redis outage is seen within this.
ENDPOINTS_TRUSTED_FOR = 60.0
KEEP_DELIVERIES = timedelta(days=7)
# Which transcript event announces which webhook event.
EVENT_FOR: dict[str, WebhookEvent] = {
    EventType.CANCEL: WebhookEvent.CANCEL_REQUESTED,
    EventType.TURN_END: WebhookEvent.TURN_COMPLETED,
    EventType.STATUS: WebhookEvent.SESSION_ENDED,
}


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# --- where deliveries may go -----------------------------------------------------------------------------------


def check_destination(url: str, settings: Mapping[str, Any]) -> tuple[str, str, int, str, list[str]]:
    """The scheme, host, port, path and the resolved addresses a delivery to `url` may use now; InvalidInput
    when the URL is malformed, not https where https is required, or resolves to an address not allowed."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced `[` or `]` in the host
        raise InvalidInput("The URL is malformed.") from None
    schemes = {"https"} if settings["WEBHOOK_REQUIRE_HTTPS"] else {"https", "http"}
    if parts.scheme not in schemes or not parts.hostname or parts.username or parts.password:
        raise InvalidInput(f"The URL must be {' or '.join(sorted(schemes))}://host/path, without credentials.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput("The URL's port is not a number from 0 to 65535.") from None
    addresses = destinations.resolve(parts.hostname, port)
    if not settings["WEBHOOK_ALLOW_PRIVATE"]:
        destinations.refuse_non_public(parts.hostname, addresses, "webhooks", "WEBHOOK_ALLOW_PRIVATE")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port, path, addresses


# --- endpoints -------------------------------------------------------------------------------------------------


def create_endpoint(team_id: ObjectId, url: str, event_types: list[str], actor: Actor) -> tuple[dict[str, Any], str]:
    """Register an endpoint; returns it (without its secret) and the secret, shown only now."""
    check_destination(url, current_app.config)
    if len(repo.list_endpoints(team_id)) >= MAX_ENDPOINTS:
        raise Conflict(f"A team has at most {MAX_ENDPOINTS} webhook endpoints.")
    secret = new_secret()
    now = utcnow()
    doc = repo.insert_endpoint(
        {
            "teamId": team_id,
            "url": url,
            "eventTypes": event_types or list(WEBHOOK_EVENTS),
            "secret": seal(secret, current_app.config),
            "disabled": False,
            "createdAt": now,
            "updatedAt": now,
            "createdBy": actor.as_doc(),
        }
    )
    _forget_teams()
    return {k: v for k, v in doc.items() if k != "secret"}, secret


def list_endpoints(team_id: ObjectId) -> list[dict[str, Any]]:
    """The team's endpoints, newest first, without their secrets."""
    return repo.list_endpoints(team_id)


def get_endpoint(team_id: ObjectId, endpoint_id: ObjectId) -> dict[str, Any]:
    """The team's endpoint (without its secret); NotFound otherwise."""
    endpoint = repo.find_endpoint(team_id, endpoint_id)
    if endpoint is None:
        raise NotFound("No such webhook endpoint in this team.")
    return endpoint


def rotate_secret(team_id: ObjectId, endpoint_id: ObjectId) -> tuple[dict[str, Any], str]:
    """Give the endpoint a new signing secret (shown only now); deliveries from now on are signed with it."""
    secret = new_secret()
    endpoint = repo.update_endpoint(team_id, endpoint_id, {"secret": seal(secret, current_app.config)})
    if endpoint is None:
        raise NotFound("No such webhook endpoint in this team.")
    _forget_teams()
    return endpoint, secret


def delete_endpoint(team_id: ObjectId, endpoint_id: ObjectId) -> None:
    """Remove the endpoint and its deliveries."""
    if not repo.delete_endpoint(team_id, endpoint_id):
        raise NotFound("No such webhook endpoint in this team.")
    _forget_teams()


def list_deliveries(team_id: ObjectId, endpoint_id: ObjectId) -> list[dict[str, Any]]:
    """The endpoint's recent deliveries, newest first."""
    get_endpoint(team_id, endpoint_id)
    return repo.list_deliveries(team_id, endpoint_id)


def redeliver(team_id: ObjectId, endpoint_id: ObjectId, delivery_id: ObjectId) -> dict[str, Any]:
    """Send a delivery again now (with a fresh signature, the same `webhook-id`)."""
    delivery = repo.find_team_delivery(team_id, endpoint_id, delivery_id)
    if delivery is None:
        raise NotFound("No such delivery for this endpoint.")
    # One more attempt than it has had, whatever the schedule says; queued now, or by the reaper when the queue
    # is away.
    changes = {"attemptsAllowed": int(delivery.get("attemptCount", 0)) + 1}
    repo.set_delivery(delivery_id, {**changes, "status": "queued", "nextAttemptAt": _lease_end()})
    status = "queued" if _queue(delivery_id) else "pending"
    return {**delivery, **changes, "status": status}


def _lease_end() -> datetime:
    """Until when a queued delivery is left to its job: past that, the job is taken for lost (Redis lost it, or its
    worker died mid-attempt) and the reaper queues the delivery again."""
    return utcnow() + timedelta(seconds=float(current_app.config["WEBHOOK_LEASE"]))


def _queue(delivery_id: ObjectId, first: dict[str, Any] | None = None) -> bool:
    """Queue the delivery's job (with `first`, the claimed first attempt it makes: see `record_deliveries`); when
    the queue is away, leave the delivery `pending` and due, so the reaper's next pass queues it (False)."""
    try:
        queueing.enqueue_webhook_delivery(str(delivery_id), first)
        return True
    except redis.RedisError as exc:
        log.warning("webhook delivery %s not queued (%s); the reaper queues it", delivery_id, exc)
        # A first attempt recorded as claimed was never made: the reaper's job claims (and counts) it again.
        uncounted = {"attemptCount": 0} if first is not None else {}
        repo.set_delivery(delivery_id, {"status": "pending", "nextAttemptAt": utcnow(), **uncounted})
        return False


# --- what gets delivered ----------------------------------------------------------------------------------------


def _payload(kind: WebhookEvent, team_id: ObjectId, session_id: ObjectId, at: datetime, **data: Any) -> dict[str, Any]:
    body = {"sessionId": str(session_id), "teamId": str(team_id), **{k: v for k, v in data.items() if v is not None}}
    return {"type": str(kind), "timestamp": at.isoformat(), "data": body}


def _items_for_events(events: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(event key, payload) of each transcript event that webhooks announce."""
    items = []
    for event in events:
        kind = EVENT_FOR.get(event["type"])
        if kind is None or (kind is WebhookEvent.TURN_COMPLETED and event.get("retry")):
            continue  # a turn handed back by a worker's shutdown has not completed: it runs again
        data: dict[str, Any] = {"seq": event["seq"], "turnId": event.get("turnId")}
        if kind is WebhookEvent.SESSION_ENDED:
            data.update(status=str(event.get("status")), endReason=str(event.get("endReason")))
        elif kind is WebhookEvent.TURN_COMPLETED:
            data.update(interrupted=bool(event.get("interrupted")) or None)
        elif kind is WebhookEvent.CANCEL_REQUESTED:
            data.update(source=event.get("source"), reason=event.get("reason"))
        key = f"{event['sessionId']}:{event['seq']}"
        items.append((key, _payload(kind, event["teamId"], event["sessionId"], event["createdAt"], **data)))
    return items


def _started_item(session: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    payload = _payload(
        WebhookEvent.SESSION_STARTED, session["teamId"], session["_id"], session["startDate"], status=Status.STARTED
    )
    return f"{session['_id']}:started", payload


# Announcements the emitter records together (what piled up while it recorded the last ones).
ANNOUNCEMENTS_PER_BATCH = 200


class _Emitter:
    """Turns announcements into deliveries and queued jobs, on a background thread of each process."""

    def __init__(self) -> None:
        self.inbox: BackgroundQueue[tuple[Flask, ObjectId, list[tuple[str, dict[str, Any]]]]] = BackgroundQueue(
            "webhook-emitter", self._record, size=10_000, batch=ANNOUNCEMENTS_PER_BATCH
        )
        # When the list was read, the endpoints' version it was read at, and the teams with endpoints.
        self.teams: tuple[float, int | None, set[ObjectId]] = (float("-inf"), None, set())

    def put(self, app: Flask, team_id: ObjectId, items: list[tuple[str, dict[str, Any]]]) -> None:
        if not self.inbox.put((app, team_id, items)):
            log.warning("webhook announcements dropped (backlog full); the reaper's sweep delivers them")

    def forget_teams(self) -> None:
        self.teams = (float("-inf"), None, set())

    def teams_with_endpoints(self) -> set[ObjectId]:
        """The teams with endpoints: as read under the endpoints' current version, at most ENDPOINTS_TRUSTED_FOR
        ago (a fork-mode horse inherits it, and a turn's end finds it still good); when Redis cannot say, at most
        TEAMS_REFRESH ago."""
        fetched_at, known, teams = self.teams
        version = _endpoints_version()
        trusted_for = TEAMS_REFRESH if version is None else ENDPOINTS_TRUSTED_FOR
        if (version is not None and version != known) or time.monotonic() - fetched_at > trusted_for:
            teams = set(repo.teams_with_endpoints())
            self.teams = (time.monotonic(), version, teams)
        return teams

    def _record(self, announcements: list[tuple[Flask, ObjectId, list[tuple[str, dict[str, Any]]]]]) -> None:
        # What waited while the last batch was recorded goes together: one endpoints read and one write a team,
        # however many sessions ended at once (a cancel of all of them, say).
        by_team: dict[tuple[int, ObjectId], tuple[Flask, ObjectId, list[tuple[str, dict[str, Any]]]]] = {}
        for app, team_id, items in announcements:
            by_team.setdefault((id(app), team_id), (app, team_id, []))[2].extend(items)
        for app, team_id, items in by_team.values():
            try:
                with app.app_context():
                    if team_id in self.teams_with_endpoints():
                        record_deliveries(team_id, items)
            except Exception:
                log.exception("webhook deliveries not recorded; the reaper's sweep retries them")


_emitter = _Emitter()


def know_teams() -> None:
    """Bring this process's list of the teams that have endpoints up to date (a fork-mode worker, before each job:
    its work horse starts with the list and need not read it again). Best effort: unread, the horse reads it."""
    if not has_app_context():
        return
    try:
        _emitter.teams_with_endpoints()
    except Exception as exc:  # called from RQ's loop, which quits on an error: the horse reads the list itself
        log.debug("teams with webhook endpoints not read (%s); the work horse reads them", exc)


def settle(timeout: float = 10.0) -> bool:
    """Wait until this process's webhook announcements so far are recorded and queued (shutdown, tests)."""
    return _emitter.inbox.settle(timeout)


def _endpoints_key() -> str:
    return f"{current_app.config['REDIS_PREFIX']}:webhook-endpoints:version"


def _endpoints_version() -> int | None:
    """A counter every change of endpoints moves, so each process's emitter sees a team's first endpoint at its
    next announcement; None when Redis cannot say (the emitter then reads the list every TEAMS_REFRESH, and each
    delivery its endpoint)."""
    try:
        return int(queueing.get_redis().get(_endpoints_key()) or 0)
    except (redis.RedisError, ValueError):
        return None


class _EndpointCopies:
    """This process's copies of the endpoints it recorded or made deliveries for, as of one value of the
    endpoints' version: every change of an endpoint moves the version, and with it every copy is dropped (as
    they all are ENDPOINTS_TRUSTED_FOR after the version was first seen). The version is read before MongoDB is,
    so a copy is never kept under a version older than itself; when Redis cannot say, MongoDB is read every
    time."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.since = float("-inf")  # when this process first saw `version`
        self.by_id: dict[tuple[ObjectId, ObjectId], dict[str, Any]] = {}
        self.by_team: dict[ObjectId, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()

    def _current(self) -> int | None:
        version = _endpoints_version()
        now = time.monotonic()
        with self.lock:
            if version is None or version != self.version or now - self.since > ENDPOINTS_TRUSTED_FOR:
                self.version, self.since, self.by_id, self.by_team = version, now, {}, {}
        return version

    def _keep(self, version: int | None, store: dict[Any, Any], key: Any, value: Any) -> None:
        with self.lock:
            if value is not None and version is not None and self.version == version:
                store[key] = value

    def get(self, team_id: ObjectId, endpoint_id: ObjectId) -> dict[str, Any] | None:
        """The team's endpoint with its secret, for a delivery."""
        version = self._current()
        key = (team_id, endpoint_id)
        with self.lock:
            found = self.by_id.get(key)
        if found is None:
            found = repo.find_endpoint(team_id, endpoint_id, with_secret=True)
            self._keep(version, self.by_id, key, found)
        return found

    def of_team(self, team_id: ObjectId) -> list[dict[str, Any]]:
        """The team's enabled endpoints with their secrets, for recording deliveries."""
        version = self._current()
        with self.lock:
            found = self.by_team.get(team_id)
        if found is None:
            found = repo.endpoints_with_secrets(team_id)
            self._keep(version, self.by_team, team_id, found)
        return found


_endpoint_copies = _EndpointCopies()


def _forget_teams() -> None:
    """A team's endpoints changed (one added, removed, or given a new secret): every process looks again on its
    next announcement and its next delivery."""
    _emitter.forget_teams()
    try:
        queueing.get_redis().incr(_endpoints_key())
    except redis.RedisError:
        log.info(
            "endpoint change not announced (Redis away); other processes see it within %.0f s", ENDPOINTS_TRUSTED_FOR
        )


def on_transcript(events: list[dict[str, Any]]) -> None:
    """The session service wrote these events (of one session): announce those webhooks care about (without
    waiting)."""
    items = _items_for_events(events)
    if items:
        _emitter.put(current_app._get_current_object(), events[0]["teamId"], items)  # type: ignore[attr-defined]


def on_session_started(session: dict[str, Any]) -> None:
    """A session was created: announce it (without waiting)."""
    _emitter.put(current_app._get_current_object(), session["teamId"], [_started_item(session)])  # type: ignore[attr-defined]


def record_deliveries(team_id: ObjectId, items: list[tuple[str, dict[str, Any]]]) -> int:
    """One delivery per endpoint subscribed to each item's type (once: keyed by endpoint and event), queued."""
    deliveries = []
    for endpoint in _endpoint_copies.of_team(team_id):
        for key, payload in items:
            if payload["type"] not in endpoint.get("eventTypes", WEBHOOK_EVENTS):
                continue
            deliveries.append(
                {
                    "teamId": team_id,
                    "endpointId": endpoint["_id"],
                    "eventKey": key,
                    "type": payload["type"],
                    "payload": payload,
                    # Stored with its first attempt claimed (counted, and leased to the job queued next), so that
                    # attempt goes out without a claim of its own: one store command less between an end and
                    # its webhook, in the burst of writes a cancel of many sessions makes. If this process dies
                    # before the job is queued, or the job dies, the lease runs out and the reaper queues it.
                    "status": "queued",
                    "attempts": [],
                    "attemptCount": 1,
                    "attemptsAllowed": len(retry_intervals()) + 1,
                    "createdAt": utcnow(),
                    "nextAttemptAt": _lease_end(),
                }
            )
    stored = repo.insert_deliveries(deliveries) if deliveries else []
    for delivery in stored:
        _queue(delivery["_id"], _first_attempt(delivery))
    return len(stored)


def _first_attempt(delivery: dict[str, Any]) -> dict[str, Any]:
    """What the job of a delivery recorded with its first attempt claimed needs to make it, without reading the
    delivery (JSON-safe: RQ keeps it with the job)."""
    return {
        "teamId": str(delivery["teamId"]),
        "endpointId": str(delivery["endpointId"]),
        "payload": delivery["payload"],
        "attemptsAllowed": delivery["attemptsAllowed"],
    }


def sweep_missed(window: timedelta = timedelta(minutes=10)) -> int:
    """The reaper's part: queue the deliveries that are due (retries whose back-off is over, deliveries whose job
    could not be queued, and those whose job was lost or died mid-attempt: its lease ran out), and record
    deliveries a crashed process never recorded (events and sessions since the last sweep, at most `window` back,
    of teams that have endpoints). Deliveries already made are not made again. Returns how many were queued."""
    teams = repo.teams_with_endpoints()
    if not teams:
        return 0
    due = repo.due_deliveries(utcnow(), _lease_end())
    recorded = sum(_queue(delivery_id) for delivery_id in due)
    floor = ObjectId.from_datetime(utcnow() - window)
    events_after = max(repo.watermark("webhook-events") or floor, floor)
    events = repo.events_since(events_after, list(EVENT_FOR), teams, 1000)
    for team_id in {e["teamId"] for e in events}:
        recorded += record_deliveries(team_id, _items_for_events([e for e in events if e["teamId"] == team_id]))
    if events:
        repo.set_watermark("webhook-events", events[-1]["_id"])
    sessions_after = max(repo.watermark("webhook-sessions") or floor, floor)
    started = repo.sessions_since(sessions_after, teams, 1000)
    for session in started:
        recorded += record_deliveries(session["teamId"], [_started_item(session)])
    if started:
        repo.set_watermark("webhook-sessions", started[-1]["_id"])
    repo.prune_deliveries(utcnow() - KEEP_DELIVERIES)
    return recorded


# --- sending ---------------------------------------------------------------------------------------------------


def retry_intervals() -> list[float]:
    """Seconds to wait before each further attempt (WEBHOOK_RETRY_INTERVALS): at least a day in all by default."""
    return [float(v) for v in current_app.config["WEBHOOK_RETRY_INTERVALS"]]


def deliver(delivery_id: ObjectId, first: dict[str, Any] | None = None) -> dict[str, Any]:
    """Attempt one delivery: sign, send to the checked address, record the answer, and schedule the next attempt
    (with back-off) or give up when the schedule is spent. Returns the attempt.

    The attempt is counted before it is made: one whose job dies (its worker is killed, MongoDB fails it) counts,
    and the reaper queues the delivery again when its lease runs out. The first attempt was claimed when the
    delivery was recorded (`first` says what it is); every later one claims itself here."""
    intervals = retry_intervals()
    delivery: dict[str, Any] | None
    if first is not None:
        team_id, endpoint_id = ObjectId(first["teamId"]), ObjectId(first["endpointId"])
        delivery = {**first, "teamId": team_id, "endpointId": endpoint_id, "attemptCount": 1}
    else:
        delivery = repo.start_attempt(delivery_id, _lease_end())
    if delivery is None:
        return {"skipped": True}
    made = int(delivery["attemptCount"])
    allowed = int(delivery.get("attemptsAllowed") or len(intervals) + 1)
    if made > allowed:  # the last attempts allowed died without an answer
        repo.set_delivery(delivery_id, {"status": "failed", "nextAttemptAt": None})
        return {"skipped": True}
    endpoint = _endpoint_copies.get(delivery["teamId"], delivery["endpointId"])
    if endpoint is None or endpoint.get("disabled"):
        repo.set_delivery(delivery_id, {"status": "failed", "error": "The endpoint was removed or disabled."})
        return {"skipped": True}
    body = json.dumps(delivery["payload"], separators=(",", ":"))
    started = time.monotonic()
    attempt: dict[str, Any] = {"at": utcnow()}
    try:
        scheme, host, port, path, addresses = check_destination(endpoint["url"], current_app.config)
        # Signed afresh on every attempt (receivers refuse old timestamps), with the same webhook-id.
        signed_at = datetime.now(UTC).replace(microsecond=0)
        headers = {
            "content-type": "application/json",
            "user-agent": "agentcloud-clone-webhooks",
            "webhook-id": str(delivery_id),
            "webhook-timestamp": str(int(signed_at.timestamp())),
            "webhook-signature": Webhook(unseal(endpoint["secret"], current_app.config)).sign(
                str(delivery_id), signed_at, body
            ),
        }
        attempt["statusCode"] = _post(scheme, host, port, path, addresses[0], headers, body)
    except InvalidInput as exc:
        attempt["error"] = exc.message
    except UnsealError as exc:
        attempt["error"] = f"{exc} Rotate the endpoint's secret."
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        attempt["error"] = f"{exc.__class__.__name__}: {exc}"[:500]
    attempt["durationMs"] = round((time.monotonic() - started) * 1000, 1)
    ok = 200 <= int(attempt.get("statusCode") or 0) < 300
    if ok:
        repo.record_attempt(
            delivery_id, attempt, {"status": "delivered", "deliveredAt": utcnow(), "nextAttemptAt": None}
        )
    elif made < allowed:
        # The reaper's sweep queues it again once this back-off is over.
        due = utcnow() + timedelta(seconds=intervals[min(made, len(intervals)) - 1])
        repo.record_attempt(delivery_id, attempt, {"status": "retrying", "nextAttemptAt": due})
    else:
        repo.record_attempt(delivery_id, attempt, {"status": "failed", "nextAttemptAt": None})
    return attempt


def _post(scheme: str, host: str, port: int, path: str, address: str, headers: dict[str, str], body: str) -> int:
    """POST to the checked address (not to whatever the name resolves to by now), with TLS verified for `host`."""
    host_header = host if port in (80, 443) else f"{host}:{port}"
    pool: urllib3.HTTPConnectionPool
    if scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            address,
            port,
            server_hostname=host,
            assert_hostname=host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
            timeout=TIMEOUT,
            retries=False,
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=TIMEOUT, retries=False)
    with pool:
        response = pool.urlopen(
            "POST", path, body=body.encode(), headers={**headers, "host": host_header}, redirect=False
        )
        return int(response.status)
