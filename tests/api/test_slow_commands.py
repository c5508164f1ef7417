"""MongoDB commands slower than SLOW_COMMAND_MS are logged with their collection (over a real wire connection:
mongomock sends no commands)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo.errors import OperationFailure

from agentcloud_clone import db


@pytest.fixture
def mongo_uri_template(mongo_server: Any) -> str:
    return mongo_server.url.rstrip("/") + "/{db}"


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {"SLOW_COMMAND_MS": 0.001}  # every command is slower than a microsecond


@pytest.fixture(autouse=True)
def _threshold_restored() -> Iterator[None]:
    before = db.slow_commands.threshold_ms
    yield
    db.slow_commands.threshold_ms = before


def _slow_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow MongoDB command")]


def test_a_command_slower_than_the_threshold_is_logged_with_its_collection(app, caplog):
    name = db.database_name(app.config["MONGO_URI"])
    with app.app_context(), caplog.at_level(logging.WARNING, logger="agentcloud_clone.db"):
        assert db.slow_commands.threshold_ms == 0.001  # the app's setting
        db.get_db().sessions.find_one({"_id": "nothing"})
        (line,) = [line for line in _slow_lines(caplog) if f" on {name}.sessions " in line]
        assert line.startswith("slow MongoDB command: find on ") and " took " in line and line.endswith(" ms")
        caplog.clear()
        with pytest.raises(OperationFailure):
            db.get_db().command({"noSuchCommand": 1})
        assert any("noSuchCommand" in line and "failed" in line for line in _slow_lines(caplog)), caplog.text


def test_nothing_is_logged_under_the_threshold_or_when_it_is_zero(app, caplog):
    with app.app_context(), caplog.at_level(logging.WARNING, logger="agentcloud_clone.db"):
        for threshold in (60_000.0, 0.0):
            db.slow_commands.threshold_ms = threshold
            db.get_db().sessions.find_one({"_id": "nothing"})
    assert _slow_lines(caplog) == []
