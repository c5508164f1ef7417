"""Configuration from the environment through one object."""

from __future__ import annotations

import pytest

from agentcloud_clone.config import Config, ConfigError


def test_production_without_secret_key_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTCLOUD_ENV", "production")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(ConfigError, match="SECRET_KEY is not set"):
        Config()


def test_development_secret_is_generated_once_and_kept(monkeypatch, tmp_path):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("VAR_DIR", str(tmp_path))
    first, second = Config().values["SECRET_KEY"], Config().values["SECRET_KEY"]
    assert first == second and len(first) == 64
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CANCEL_POLL_INTERVAL", "0.2")
    monkeypatch.setenv("CANCEL_PUBSUB", "false")
    monkeypatch.setenv("CANCEL_RATE_LIMIT", "5 per minute")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6999/1")
    values = Config({"SECRET_KEY": "x"}).values
    assert values["CANCEL_POLL_INTERVAL"] == 0.2 and values["CANCEL_PUBSUB"] is False
    assert values["CANCEL_RATE_LIMIT"] == "5 per minute" and values["REDIS_URL"].endswith(":6999/1")


@pytest.mark.parametrize("value", ["0.01", "6", "soon"])
def test_poll_interval_outside_its_bounds_is_refused(monkeypatch, value):
    monkeypatch.setenv("CANCEL_POLL_INTERVAL", value)
    with pytest.raises(ConfigError, match="CANCEL_POLL_INTERVAL"):
        Config({"SECRET_KEY": "x"})


def test_overrides_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("TURN_QUEUE", "from-env")
    assert Config({"SECRET_KEY": "x", "TURN_QUEUE": "override"}).values["TURN_QUEUE"] == "override"


def test_mongomock_uri_selects_in_process_mongomock():
    import mongomock

    from agentcloud_clone.db import client_for, database_name

    assert isinstance(client_for("mongomock://localhost/abc"), mongomock.MongoClient)
    assert client_for("mongomock://localhost/abc") is client_for("mongomock://localhost/abc")
    assert database_name("mongodb://h:1/named?x=1") == "named" and database_name("mongodb://h:1/") == "agentcloud"
