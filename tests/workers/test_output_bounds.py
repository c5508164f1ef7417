"""Output is bounded: every transcript event holds at most MAX_EVENT_CHARS, a turn at most TURN_MAX_OUTPUT_CHARS,
and a turn past that limit ends the session `error` with a clear message instead of sitting `running`."""

from __future__ import annotations

import pytest

from agentcloud_clone.jobs.turns import MAX_EVENT_CHARS

DEFAULT_MAX_OUTPUT = 2_000_000


def _outputs(harness, session):
    return [e for e in harness.events(session) if e["type"] == "output"]


def test_a_turn_past_its_output_limit_ends_error_with_bounded_events(harness, app):
    assert app.config["TURN_MAX_OUTPUT_CHARS"] == DEFAULT_MAX_OUTPUT
    # 3,000 steps of a 10,000-character word: 30 million characters if nothing stopped it.
    session = harness.start(steps=3000, stepDelay=0, reply="x" * 10_000)
    assert harness.run(session)["outcome"] == "error"
    doc = harness.doc(session)
    assert (doc["status"], doc["endReason"]) == ("error", "error") and doc.get("endedAt")
    assert not doc.get("activeTurnId")
    closing = harness.closing(session)
    assert f"passed the limit of {DEFAULT_MAX_OUTPUT} characters" in closing["message"]
    outputs = _outputs(harness, session)
    assert outputs and all(len(e["text"]) <= MAX_EVENT_CHARS == 64 * 1024 for e in outputs)
    # What came before the limit is kept, marked cut off, and no more than the limit.
    assert sum(len(e["text"]) for e in outputs) == DEFAULT_MAX_OUTPUT
    assert outputs[-1].get("interrupted") is True


# On a real MongoDB-wire server too: a write that recorded the whole piece on the session at once would pass
# MongoDB's 16 MB document limit (mongomock has none).
@pytest.mark.parametrize("mongo_uri_template", ["mongomock", "mongo-wire"], indirect=True)
def test_one_huge_piece_is_split_into_bounded_events(harness, app):
    app.config["TURN_MAX_OUTPUT_CHARS"] = 100_000_000
    session = harness.start(runner="python", callable="tests.workers.runners:one_huge_piece")
    assert harness.run(session)["outcome"] == "completed"
    assert harness.doc(session)["status"] == "waiting"
    outputs = _outputs(harness, session)
    assert all(len(e["text"]) <= MAX_EVENT_CHARS for e in outputs)
    assert len(outputs) == -(-30_000_000 // MAX_EVENT_CHARS)
    assert sum(len(e["text"]) for e in outputs) == 30_000_000
    assert [e["seq"] for e in outputs] == list(range(outputs[0]["seq"], outputs[0]["seq"] + len(outputs)))


def test_one_huge_piece_past_the_limit_ends_error_keeping_the_limit(harness):
    session = harness.start(runner="python", callable="tests.workers.runners:one_huge_piece")
    assert harness.run(session)["outcome"] == "error"
    assert harness.doc(session)["status"] == "error"
    outputs = _outputs(harness, session)
    assert all(len(e["text"]) <= MAX_EVENT_CHARS for e in outputs)
    assert sum(len(e["text"]) for e in outputs) == DEFAULT_MAX_OUTPUT


def test_an_output_write_mongodb_refuses_ends_the_turn_error_saying_why(harness, monkeypatch):
    from pymongo.errors import WriteError

    from agentcloud_clone.services import sessions as sessions_service

    session = harness.start(steps=3, stepDelay=0)

    def refused(*_: object, **__: object) -> None:
        raise WriteError("document too large", code=10334)

    monkeypatch.setattr(sessions_service, "record_output", refused)
    assert harness.run(session)["outcome"] == "error"
    doc = harness.doc(session)
    assert (doc["status"], doc["endReason"]) == ("error", "error") and not doc.get("activeTurnId")
    closing = harness.closing(session)
    assert "The transcript could not be written: WriteError" in closing["message"]


def test_a_store_or_queue_that_cannot_be_reached_is_named_by_its_kind_not_its_hosts(harness, monkeypatch):
    """The team (and visitors of a shared session) read the closing message: a connection error's text names the
    operator's hosts and ports, which stay in the worker's log."""
    import redis
    from pymongo.errors import AutoReconnect

    from agentcloud_clone.jobs import runners
    from agentcloud_clone.services import sessions as sessions_service

    internal = "mongo-0.internal.example:27017: [Errno 111] Connection refused"
    monkeypatch.setitem(harness.app.config, "HEARTBEAT_TIMEOUT", 0.5)  # how long a turn tries its writes again
    writes = harness.start(steps=3, stepDelay=0)
    with monkeypatch.context() as patch:

        def unreachable(*_: object, **__: object) -> None:
            raise AutoReconnect(internal)

        patch.setattr(sessions_service, "record_output", unreachable)
        assert harness.run(writes)["outcome"] == "error"
    assert harness.closing(writes)["message"] == (
        "The transcript could not be written: AutoReconnect (the details are in the worker's log)."
    )

    def agent_meets_redis(ctx: object, grant: object) -> object:
        yield "partial "
        raise redis.ConnectionError("Error 111 connecting to redis-0.internal.example:6379. Connection refused.")

    monkeypatch.setitem(runners.RUNNERS, "scripted", agent_meets_redis)
    failing = harness.start()
    assert harness.run(failing)["outcome"] == "error"
    message = harness.closing(failing)["message"]
    assert message == "The agent failed: ConnectionError (the details are in the worker's log)."


def test_an_apps_own_errors_are_shown_in_full(harness, monkeypatch):
    """Only failures to reach the installation's parts are cut to their kind: an app's own code's errors (a
    missing file of its own, say) say what happened."""
    from agentcloud_clone.jobs import runners

    def agent_without_its_file(ctx: object, grant: object) -> object:
        yield "partial "
        raise FileNotFoundError(2, "No such file or directory", "prompts/system.txt")

    monkeypatch.setitem(runners.RUNNERS, "scripted", agent_without_its_file)
    session = harness.start()
    assert harness.run(session)["outcome"] == "error"
    assert "prompts/system.txt" in harness.closing(session)["message"]
