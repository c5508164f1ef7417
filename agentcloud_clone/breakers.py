"""Circuit breakers: once a dependency (Redis, MongoDB) stops answering, the calls of this process fail at once
instead of each waiting out its own timeout, until a background probe finds the dependency answering again.

A hung server (stopped, partitioned, overloaded) costs each caller a full timeout; with many callers that is
every request of a web process waiting a second for an answer it will not get. A breaker turns the first
failure into "unavailable" for everyone: the request path checks it (a flag read, no I/O), a single thread per
breaker probes the server on a short timeout, and the first probe that succeeds closes it. Nothing here knows
about Redis or MongoDB: `queueing` and `db` give a breaker its probe and decide what counts as a failure.

Plain threads and `time`: under gunicorn's gevent workers both are patched, so a probe is a greenlet that
yields while it waits on its socket.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
# The first probes come quickly (a blip is over in milliseconds), then back off to two a second.
FIRST_PAUSE, MAX_PAUSE = 0.05, 0.5
# An open breaker nobody has consulted for this long closes again without a probe: its prober thread ends, and
# the next real call finds out for itself (and trips it again if the server is still away).
IDLE_CLOSE = 30.0


class Breaker:
    """One dependency as this process sees it: closed (calls go through) or open (calls fail at once)."""

    def __init__(self, name: str, probe: Callable[[], Any]) -> None:
        self.name = name
        self._probe = probe
        self._lock = threading.Lock()
        self._open = False
        self._opened_at = 0.0
        self._asked_at = 0.0
        self._check: _Check | None = None
        self.trips = 0

    @property
    def is_open(self) -> bool:
        """True while calls should fail at once."""
        return self._open

    def allow(self) -> bool:
        """Whether a call may go to the server now (a flag read; while open, notes that someone still asks)."""
        if not self._open:
            return True
        self._asked_at = time.monotonic()
        return False

    def trip(self, reason: object) -> None:
        """The server failed a call (a timeout, a refused or broken connection): fail fast until a probe passes."""
        with self._lock:
            if self._open:
                return
            self._open = True
            self.trips += 1
            self._opened_at = self._asked_at = time.monotonic()
        log.warning("%s unavailable (%s); failing fast until it answers again", self.name, reason)
        threading.Thread(target=self._probe_until_closed, name=f"breaker-{self.name}", daemon=True).start()

    def trip_unless_alive(self, reason: object, alive: Callable[[], bool], wait: float = 5.0) -> bool:
        """A call timed out, which a busy server's calls do too: trip only when `alive()`, a quick check with a
        deadline of its own, fails as well. One check at a time: callers meanwhile wait (at most `wait`) for its
        answer rather than check again. True when the breaker is open afterwards."""
        with self._lock:
            if self._open:
                return True
            check, mine = self._check, self._check is None
            if check is None:
                check = self._check = _Check()
        if not mine:
            check.done.wait(wait)
            return self._open
        try:
            ok = alive()
        except Exception:
            ok = False
        try:
            if ok:
                log.info("%s was slow (%s) but answers: not failing fast", self.name, reason)
            else:
                self.trip(reason)
        finally:
            with self._lock:
                self._check = None
            check.done.set()
        return not ok

    def close(self) -> None:
        """Let calls through again."""
        with self._lock:
            was_open, self._open = self._open, False
        if was_open:
            log.info("%s answers again after %.1f s", self.name, time.monotonic() - self._opened_at)

    def _probe_until_closed(self) -> None:
        pause = FIRST_PAUSE
        while self._open:
            try:
                self._probe()
            except Exception:
                if time.monotonic() - self._asked_at > IDLE_CLOSE:
                    with self._lock:
                        self._open = False  # nobody is waiting: the next caller tries for itself
                    return
                time.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)
                continue
            self.close()


class _Check:
    """A liveness check in progress, which other callers wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()


_breakers: dict[tuple[int, str], Breaker] = {}
_lock = threading.Lock()


def breaker_for(name: str, probe: Callable[[], Any]) -> Breaker:
    """This process's breaker called `name` (one per dependency and process; `probe` is used when it is new)."""
    key = (os.getpid(), name)
    with _lock:
        found = _breakers.get(key)
        if found is None:
            found = _breakers[key] = Breaker(name, probe)
        return found


def open_breakers() -> list[str]:
    """The names of this process's open breakers (readiness, metrics, tests)."""
    pid = os.getpid()
    with _lock:
        return sorted(b.name for (owner, _), b in _breakers.items() if owner == pid and b.is_open)
