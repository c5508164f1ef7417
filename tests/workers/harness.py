"""Runs turns in-process (mongomock + real Redis) the way a worker does, on sessions started through the services."""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask

from agentcloud_clone.db import get_db
from agentcloud_clone.services import sessions as service
from agentcloud_clone.services.sessions import reap_lost_turns
from agentcloud_clone.vocabulary import CancelSource, OnBusy
from tests.support import run_queued_turn, wait_until

FAST = {
    "CANCEL_POLL_INTERVAL": 0.05,
    "OUTPUT_FLUSH_INTERVAL": 0.05,
    "HEARTBEAT_INTERVAL": 0.05,
    # The fake upstreams listen on loopback (the address policy: tests/workers/test_upstream_addresses.py).
    "UPSTREAM_ALLOW_PRIVATE": True,
}
RUNNER_MODULES = ["agentcloud_clone.examples", "tests.workers.runners"]


class Harness:
    """Starts sessions through the services and runs their turns the way a worker does."""

    def __init__(self, app: Flask, factory: Any) -> None:
        self.app = app
        self.user = factory.user("member")
        self.factory = factory
        self.actor = factory.actor(self.user)

    def start(
        self,
        message: str | None = "hello",
        runner: str = "scripted",
        *,
        limits: dict[str, Any] | None = None,
        **config: Any,
    ) -> dict[str, Any]:
        app_id = self.factory.app_record(self.user.team_id, runner, limits=limits, **config)
        return self.factory.session(self.user, app_id, message)

    def send(self, session: dict[str, Any], text: str, on_busy: str = "reject") -> dict[str, Any]:
        with self.app.app_context():
            return service.send_message(session["teamId"], session["_id"], self.actor, text, OnBusy(on_busy))

    def doc(self, session: dict[str, Any]) -> dict[str, Any]:
        with self.app.app_context():
            return get_db().sessions.find_one({"_id": session["_id"]})

    def events(self, session: dict[str, Any]) -> list[dict[str, Any]]:
        with self.app.app_context():
            return list(get_db().session_events.find({"sessionId": session["_id"]}).sort("seq", 1))

    def closing(self, session: dict[str, Any]) -> dict[str, Any]:
        """The session's closing event, checking it is its one and last `status` event."""
        events = self.events(session)
        statuses = [e for e in events if e["type"] == "status"]
        assert len(statuses) == 1 and events[-1] is statuses[0], [e["type"] for e in events]
        return statuses[0]

    def run(self, session: dict[str, Any]) -> dict[str, Any]:
        return run_queued_turn(self.app, session["_id"])

    def run_turn(self, session: dict[str, Any], turn_id: Any) -> dict[str, Any]:
        """Run a given turn of the session, as a worker that dequeued its job would (queued or not)."""
        from agentcloud_clone.jobs.turns import run_turn

        with self.app.app_context():
            return run_turn(str(session["teamId"]), str(session["_id"]), str(turn_id))

    def run_in_thread(self, session: dict[str, Any]) -> tuple[threading.Thread, list[dict[str, Any]]]:
        result: list[dict[str, Any]] = []
        thread = threading.Thread(target=lambda: result.append(self.run(session)), daemon=True)
        thread.start()
        return thread, result

    def cancel(self, session: dict[str, Any], reason: str | None = None) -> service.CancelOutcome:
        with self.app.app_context():
            return service.cancel_session(session["teamId"], session["_id"], self.actor, CancelSource.API, reason)

    def wait_for(self, predicate: Any, what: str = "the condition") -> Any:
        return wait_until(predicate, 20, what)

    def wait_running(self, session: dict[str, Any]) -> None:
        self.wait_for(lambda: self.doc(session)["status"] == "running", "the turn to start")

    def reap(self, session: dict[str, Any]) -> None:
        """Have the reaper end the session as if its worker were lost (at timeout 0 any heartbeat older than
        now counts; one stamped within the same millisecond does not yet, hence the retry)."""
        with self.app.app_context():
            self.wait_for(lambda: reap_lost_turns(0) == [str(session["_id"])], "the reaper to end the session")

    def finish(self, thread: threading.Thread) -> None:
        thread.join(30)
        assert not thread.is_alive(), "the turn did not end"
