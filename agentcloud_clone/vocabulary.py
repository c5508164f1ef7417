"""The product's words, each defined once: session statuses, why sessions end, who cancels, runner names.

Schemas, click choices, templates and queries all read these, so a new status or runner is added here only.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Agentcloud's session statuses, kept as they are for compatibility."""

    STARTED = "started"
    RUNNING = "running"
    WAITING = "waiting"
    WARNING = "warning"
    ERROR = "error"
    TERMINATED = "terminated"


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
# A live session can still do work; an ended one never changes again.
LIVE_STATUSES: tuple[str, ...] = (Status.STARTED, Status.RUNNING, Status.WAITING, Status.WARNING)
ENDED_STATUSES: tuple[str, ...] = (Status.TERMINATED, Status.ERROR)
# Live statuses a queued turn may start from (`running` means a worker already claimed one).
CLAIMABLE_STATUSES: tuple[str, ...] = (Status.STARTED, Status.WAITING, Status.WARNING)


class EndReason(StrEnum):
    """Why a session ended, beside Agentcloud's coarser status."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    TIMED_OUT = "timed_out"
    BUDGET_EXCEEDED = "budget_exceeded"
    WORKER_LOST = "worker_lost"
    ERROR = "error"


END_REASONS: tuple[str, ...] = tuple(r.value for r in EndReason)
# The Agentcloud status each end reason leaves behind: stops asked for (by people or limits) terminate,
# failures are errors.
STATUS_FOR_END: dict[str, Status] = {
    EndReason.COMPLETED: Status.TERMINATED,
    EndReason.CANCELLED: Status.TERMINATED,
    EndReason.EXPIRED: Status.TERMINATED,
    EndReason.BUDGET_EXCEEDED: Status.TERMINATED,
    EndReason.TIMED_OUT: Status.ERROR,
    EndReason.WORKER_LOST: Status.ERROR,
    EndReason.ERROR: Status.ERROR,
}


class CancelSource(StrEnum):
    """Where a cancel came from."""

    UI = "ui"
    API = "api"
    MANAGED_API = "managed-api"
    BULK = "bulk"
    LIMIT = "limit"
    SHARE = "share"  # the shared session routes under /s/<resourceSlug>/


CANCEL_SOURCES: tuple[str, ...] = tuple(s.value for s in CancelSource)


class ActorKind(StrEnum):
    """Who acted: a signed-in account, a program with an API key, or the system itself (limits, reaper)."""

    ACCOUNT = "account"
    API_KEY = "apiKey"
    SYSTEM = "system"
    VISITOR = "visitor"  # someone outside the team using a public app's share link


class EventType(StrEnum):
    """Transcript entries. A session's last event, once it has ended, is its one `status` event."""

    MESSAGE = "message"
    OUTPUT = "output"
    CANCEL = "cancel"
    TURN_END = "turn_end"
    STATUS = "status"


class OnBusy(StrEnum):
    """What a message does when a turn is already in flight."""

    REJECT = "reject"  # 409, as Agentcloud does
    ENQUEUE = "enqueue"  # waits; its turn runs after the current one
    INTERRUPT = "interrupt"  # the current turn is stopped (its output kept, marked interrupted); this one runs next


ON_BUSY: tuple[str, ...] = tuple(b.value for b in OnBusy)
# How many messages may wait behind the turn in flight.
MAX_QUEUED_TURNS = 20


class WebhookEvent(StrEnum):
    """What a webhook endpoint can be told about."""

    SESSION_STARTED = "session.started"
    TURN_COMPLETED = "turn.completed"
    SESSION_ENDED = "session.ended"
    CANCEL_REQUESTED = "session.cancel_requested"


WEBHOOK_EVENTS: tuple[str, ...] = tuple(e.value for e in WebhookEvent)


class OperationStatus(StrEnum):
    """Where a bulk cancel stands."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


OPERATION_STATUSES: tuple[str, ...] = tuple(s.value for s in OperationStatus)


class Runner(StrEnum):
    """The agent runners an app can name."""

    SCRIPTED = "scripted"
    OPENAI = "openai"
    PYTHON = "python"


RUNNER_NAMES: tuple[str, ...] = tuple(r.value for r in Runner)
MAX_CANCEL_REASON = 500


class SharingMode(StrEnum):
    """Who may use an app's sessions (Agentcloud's `sharingConfig.mode`)."""

    TEAM = "team"  # the team's members, by role (the default)
    PUBLIC = "public"  # also anyone holding the app's share link, each visitor only their own sessions
    OWNER = "owner"  # each session only its creator (Agentcloud's "private")
    WHITELIST = "whitelist"  # also the accounts the app names, each only their own sessions


SHARING_MODES: tuple[str, ...] = tuple(m.value for m in SharingMode)
# Modes whose apps have a share link (`/s/<resourceSlug>/app_<64 hex>`).
LINK_MODES: tuple[str, ...] = (SharingMode.PUBLIC, SharingMode.WHITELIST)
