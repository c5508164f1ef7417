"""A turn's output writes space themselves by the store's round trip: on a quick store they come every
OUTPUT_FLUSH_INTERVAL; on a slow one each write carries more, so a saturated store gets fewer writes to do.
Time here is a fake clock that each piece and each write moves on, so the counts do not depend on the machine."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from bson import ObjectId

from agentcloud_clone.jobs import turns
from agentcloud_clone.jobs.watcher import CancelHandle

PIECE_EVERY = 0.05  # a word every 50 ms, as a streaming model sends them
SECONDS = 10.0


def _stream(monkeypatch: pytest.MonkeyPatch, write_takes: float) -> list[list[str]]:
    """Stream SECONDS of words through an OutputWriter (interval 0.25 s) whose every write takes `write_takes`;
    the texts of each write."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(turns, "time", SimpleNamespace(monotonic=lambda: clock.now))
    writes: list[list[str]] = []

    def record_output(team_id: Any, session_id: Any, turn_id: Any, texts: list[str], tokens: int, **_: Any) -> Any:
        clock.now += write_takes
        writes.append(list(texts))
        return [{"text": text} for text in texts]

    monkeypatch.setattr(turns.sessions, "record_output", record_output)
    session = {"_id": ObjectId(), "teamId": ObjectId()}
    writer = turns.OutputWriter(session, ObjectId(), 0.25, 10**9, CancelHandle(session["_id"]))
    words = 0
    while clock.now < SECONDS:
        writer.add(f"w{words} ")
        words += 1
        clock.now += PIECE_EVERY
    writer.flush()
    assert "".join(text for texts in writes for text in texts) == "".join(f"w{n} " for n in range(words))
    return writes


def test_on_a_quick_store_output_is_written_every_flush_interval(app, monkeypatch):
    with app.app_context():
        writes = _stream(monkeypatch, write_takes=0.002)
    assert len(writes) >= SECONDS / 0.3  # every 0.25 s, give or take a piece


def test_on_a_slow_store_each_write_carries_more_and_there_are_fewer(app, monkeypatch):
    with app.app_context():
        writes = _stream(monkeypatch, write_takes=0.1)  # a store queueing every command for 100 ms
    # Spaced by WRITE_SPACING round trips (1 s) rather than 0.25 s: about a quarter as many writes.
    assert len(writes) <= SECONDS / (turns.WRITE_SPACING * 0.1) + 1
