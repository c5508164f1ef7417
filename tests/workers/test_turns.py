"""Turns run in-process (mongomock + real Redis): streaming, completion, cancel, errors, races, reaping."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest

from agentcloud_clone.services import sessions as service
from agentcloud_clone.services.sessions import reap_lost_turns
from tests.support import reply_was_cut_off
from tests.workers import runners as test_runners
from tests.workers.harness import RUNNER_MODULES


def test_full_turn_streams_output_and_waits_for_next_message(harness):
    session = harness.start(steps=5, stepDelay=0.02, reply="one two three four five")
    assert harness.run(session)["outcome"] == "completed"
    doc = harness.doc(session)
    assert doc["status"] == "waiting" and doc["activeTurnId"] is None and doc["tokensUsed"] == 5
    events = harness.events(session)
    output = "".join(e["text"] for e in events if e["type"] == "output")
    assert output == "one two three four five"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)) and doc["eventSeq"] == len(events)
    assert events[-1]["type"] == "turn_end"


def test_output_is_batched_not_written_per_piece(harness):
    session = harness.start(steps=40, stepDelay=0.005)
    harness.run(session)
    writes = [e for e in harness.events(session) if e["type"] == "output"]
    assert 1 <= len(writes) < 40


def test_session_can_end_normally_and_cancel_then_reports_already_ended(harness):
    session = harness.start(steps=1, stepDelay=0, endAfterTurns=1)
    assert harness.run(session)["outcome"] == "completed"
    doc = harness.doc(session)
    assert doc["status"] == "terminated" and doc["endReason"] == "completed"
    assert harness.closing(session)["endReason"] == "completed"
    outcome = harness.cancel(session)
    assert outcome.already_ended and "cancelledAt" not in harness.doc(session)


def test_cancel_mid_turn_keeps_partial_output_and_ends_terminated(harness):
    session = harness.start(steps=500, stepDelay=0.02)
    thread, result = harness.run_in_thread(session)
    harness.wait_for(lambda: any(e["type"] == "output" for e in harness.events(session)), "streamed output")
    assert harness.cancel(session, reason="wrong prompt").session["status"] == "running"
    harness.finish(thread)
    assert result[0]["outcome"] == "cancelled"
    doc = harness.doc(session)
    assert doc["status"] == "terminated" and doc["endReason"] == "cancelled" and doc["endedAt"] and doc["cancelledAt"]
    assert doc["cancellation"]["reason"] == "wrong prompt" and doc["cancellation"]["source"] == "api"
    assert doc["cancellation"]["completedAt"] == doc["endedAt"]
    assert doc["cancellation"]["by"] == {"kind": "account", "accountId": harness.user.oid}
    closing = harness.closing(session)
    assert closing["endReason"] == "cancelled" and closing["status"] == "terminated"
    assert reply_was_cut_off(harness.events(session))
    assert 0 < doc["tokensUsed"] < 500


def test_a_running_session_shows_cancelling_until_its_worker_ends_it(harness, app):
    from agentcloud_clone.web.sessions import dump_session

    test_runners.release.clear()
    session = harness.start(runner="python", callable="tests.workers.runners:stubborn")
    thread, _ = harness.run_in_thread(session)
    harness.wait_running(session)
    harness.cancel(session)
    with app.app_context():
        shown = dump_session(harness.doc(session))
    assert shown["cancelling"] is True and shown["status"] == "running"
    test_runners.release.set()
    harness.finish(thread)
    assert harness.doc(session)["status"] == "terminated"


def test_cancel_twice_mid_turn_keeps_first_stamp(harness):
    session = harness.start(steps=500, stepDelay=0.02)
    thread, _ = harness.run_in_thread(session)
    harness.wait_running(session)
    first = harness.cancel(session)
    second = harness.cancel(session)
    harness.finish(thread)
    assert not first.already_cancelled and second.already_cancelled
    assert harness.doc(session)["cancelledAt"] == first.session["cancelledAt"]


def test_cancelling_a_waiting_session_ends_it_at_once(harness):
    session = harness.start(steps=1, stepDelay=0)
    harness.run(session)
    assert harness.doc(session)["status"] == "waiting"
    outcome = harness.cancel(session)
    assert outcome.session["status"] == "terminated" and not outcome.already_cancelled
    assert harness.closing(session)["endReason"] == "cancelled"


def test_queued_turn_of_cancelled_session_does_not_run(harness):
    session = harness.start(steps=3, stepDelay=0)
    assert harness.cancel(session).session["status"] == "terminated"
    with harness.app.app_context():
        turn = str(session["activeTurnId"])
        from agentcloud_clone.jobs.turns import run_turn

        assert run_turn(str(session["teamId"]), str(session["_id"]), turn)["outcome"] == "skipped"
    assert not [e for e in harness.events(session) if e["type"] == "output"]
    assert harness.closing(session)["endReason"] == "cancelled"


def test_claim_racing_cancel_ends_every_session_exactly_once(harness):
    """Run many times: the worker's claim and the cancel race; either may win, the session ends once."""
    from agentcloud_clone.jobs.turns import run_turn

    outcomes = []
    for _ in range(25):
        session = harness.start(steps=2, stepDelay=0)
        barrier = threading.Barrier(2)
        results: list[Any] = []

        def work(session=session, barrier=barrier, results=results) -> None:
            with harness.app.app_context():
                barrier.wait()
                results.append(run_turn(str(session["teamId"]), str(session["_id"]), str(session["activeTurnId"])))

        thread = threading.Thread(target=work)
        thread.start()
        barrier.wait()
        harness.cancel(session)
        harness.finish(thread)
        doc = harness.doc(session)
        assert doc["status"] == "terminated" and doc["endReason"] == "cancelled"
        harness.closing(session)
        outcomes.append(results[0]["outcome"])
    assert set(outcomes) <= {"skipped", "cancelled"}


def test_runner_that_raises_ends_session_error_with_message(harness):
    session = harness.start(steps=5, stepDelay=0, failAtStep=3)
    assert harness.run(session)["outcome"] == "error"
    doc = harness.doc(session)
    assert doc["status"] == "error" and doc["endReason"] == "error" and doc["endedAt"]
    assert "failed at step 3" in harness.closing(session)["message"]


def test_completion_racing_cancel_never_revives_the_session(harness, monkeypatch):
    """The cancel lands after the last piece but before the completion write: the cancel wins."""
    from agentcloud_clone.jobs import turns

    session = harness.start(steps=2, stepDelay=0)
    original_flush = turns.OutputWriter.flush

    def flush_then_cancel(self, *, interrupted=False):
        original_flush(self, interrupted=interrupted)
        if not interrupted and not self.cancel.is_set():
            harness.cancel(session)

    monkeypatch.setattr(turns.OutputWriter, "flush", flush_then_cancel)
    assert harness.run(session)["outcome"] == "cancelled"
    doc = harness.doc(session)
    assert doc["status"] == "terminated" and doc["cancelledAt"] and doc["endReason"] == "cancelled"
    harness.closing(session)


def test_ended_session_stays_ended_when_a_late_turn_finishes(harness, app):
    session = harness.start(steps=300, stepDelay=0.01)
    thread, _ = harness.run_in_thread(session)
    harness.wait_running(session)
    harness.reap(session)  # the reaper ends the session under the running turn
    harness.finish(thread)
    doc = harness.doc(session)
    assert doc["status"] == "error" and doc["endReason"] == "worker_lost"
    assert harness.closing(session)["endReason"] == "worker_lost"


def test_session_deleted_mid_turn_stops_and_writes_nothing_more(harness, app):
    session = harness.start(steps=500, stepDelay=0.01)
    thread, _ = harness.run_in_thread(session)
    harness.wait_running(session)
    harness.reap(session)
    with app.app_context():
        service.delete_session(session["teamId"], session["_id"])
    harness.finish(thread)
    assert harness.events(session) == []


def test_python_runner_calls_an_allowed_callable(harness):
    session = harness.start(runner="python", callable="agentcloud_clone.examples:echo", options={"times": 2})
    harness.run(session)
    text = "".join(e["text"] for e in harness.events(session) if e["type"] == "output")
    assert text == "hello hello "


def test_python_runner_refuses_callables_outside_the_allowed_modules(harness, app):
    from agentcloud_clone.errors import InvalidInput
    from agentcloud_clone.jobs.runners import RunnerError, TurnGrant, python_callable

    with pytest.raises(InvalidInput):
        harness.start(runner="python", callable="builtins:repr")
    ctx = type("Ctx", (), {"app": {"config": {"callable": "builtins:repr"}}})()
    with pytest.raises(RunnerError, match=r"(?i)not in a module"):
        python_callable(ctx, TurnGrant(allowed_modules=RUNNER_MODULES))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "why"),
    [
        # Names an allowed module merely imports are not its functions (the examples import Iterator and Any).
        ("agentcloud_clone.examples:Iterator", "not a function defined in module"),
        ("agentcloud_clone.examples:Any", "not a function defined in module"),
        ("agentcloud_clone.examples:annotations", "not a function defined in module"),
        ("agentcloud_clone.examples:__loader__", "public function"),
        ("agentcloud_clone.examples:nothing_here", "no function 'nothing_here'"),
    ],
)
def test_python_runner_calls_only_public_functions_defined_in_an_allowed_module(harness, target, why):
    from agentcloud_clone.errors import InvalidInput
    from agentcloud_clone.jobs.runners import RunnerError, TurnGrant, python_callable

    with pytest.raises(InvalidInput) as refused:
        harness.start(runner="python", callable=target)
    assert why in str(refused.value.errors)
    # A setting stored before this check (or written to the database directly) is refused when the turn runs.
    ctx = type("Ctx", (), {"app": {"config": {"callable": target}}})()
    with pytest.raises(RunnerError, match=re.escape(why)):
        python_callable(ctx, TurnGrant(allowed_modules=RUNNER_MODULES))  # type: ignore[arg-type]


def test_reaper_ends_running_session_with_stale_heartbeat_once(harness, app):
    test_runners.release.clear()
    session = harness.start(runner="python", callable="tests.workers.runners:stubborn")
    thread, _ = harness.run_in_thread(session)
    harness.wait_running(session)
    harness.reap(session)
    with app.app_context():
        assert reap_lost_turns(0) == []
    test_runners.release.set()
    harness.finish(thread)
    doc = harness.doc(session)
    assert doc["status"] == "error" and doc["endReason"] == "worker_lost"
    assert "Worker lost" in harness.closing(session)["message"]


def test_reaper_ends_a_cancelled_session_whose_worker_is_gone_as_cancelled(harness, app):
    test_runners.release.clear()
    session = harness.start(runner="python", callable="tests.workers.runners:stubborn")
    thread, _ = harness.run_in_thread(session)
    harness.wait_running(session)
    harness.cancel(session)
    harness.reap(session)
    test_runners.release.set()
    harness.finish(thread)
    doc = harness.doc(session)
    assert doc["status"] == "terminated" and doc["endReason"] == "cancelled"
    assert harness.closing(session)["endReason"] == "cancelled"


def test_reaper_leaves_healthy_sessions_alone(harness, app):
    session = harness.start(steps=50, stepDelay=0.01)
    thread, _ = harness.run_in_thread(session)
    harness.wait_running(session)
    with app.app_context():
        assert reap_lost_turns(30) == []
    harness.finish(thread)
    assert harness.doc(session)["status"] == "waiting"


def test_cancel_to_stop_and_poll_queries_are_counted(harness, app):
    from agentcloud_clone import metrics
    from agentcloud_clone.jobs.watcher import watcher_for

    session = harness.start(steps=500, stepDelay=0.02)
    thread, _ = harness.run_in_thread(session)
    harness.wait_running(session)
    # The cancel itself needs no poll (its notice carries the stamp): the turn's watcher polls on its schedule.
    harness.wait_for(lambda: watcher_for(app).polls >= 1, "a poll of the running turn")
    harness.cancel(session)
    harness.finish(thread)
    store = metrics.store_for(app.config)
    assert store.settle()  # observations are sent in the background
    buckets = store.client.hgetall(store.key("cancel_to_stop_seconds"))
    assert int(buckets[b"{}|+Inf"]) == 1
    assert int(store.client.hget(store.key("cancel_poll_queries_total"), "{}")) >= 1


def test_openai_runner_streams_from_a_compatible_server(harness):
    from tests.fakes.openai_server import FakeOpenAI

    fake = FakeOpenAI(chunks=5, interval=0.001).start()
    try:
        session = harness.start(runner="openai", model="fake-model", baseUrl=fake.base_url, apiKey="sk-test")
        assert harness.run(session)["outcome"] == "completed"
    finally:
        fake.stop()
    text = "".join(e["text"] for e in harness.events(session) if e["type"] == "output")
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert fake.streams[0]["request"]["messages"][-1] == {"role": "user", "content": "hello"}
    assert fake.authorizations == ["Bearer sk-test"]


def test_openai_runner_cancel_closes_the_upstream_stream(harness):
    from tests.fakes.openai_server import FakeOpenAI

    fake = FakeOpenAI(chunks=5000, interval=0.01).start()
    try:
        session = harness.start(runner="openai", model="fake-model", baseUrl=fake.base_url, apiKey="sk-test")
        thread, result = harness.run_in_thread(session)
        harness.wait_for(lambda: fake.streams and fake.streams[0]["sent"] > 5, "the upstream stream")
        harness.cancel(session)
        harness.finish(thread)
        harness.wait_for(lambda: fake.streams[0]["closed_by_client"], "the worker to close the stream")
    finally:
        fake.stop()
    assert result[0]["outcome"] == "cancelled"
    assert not fake.streams[0]["done"]
    assert harness.doc(session)["status"] == "terminated"


def test_cancel_interrupts_the_openai_retry_back_off(harness):
    """Two overloaded answers put the runner in its second back-off (1 s); a cancel then ends it before a third
    request is ever made."""
    from tests.fakes.openai_server import FakeOpenAI

    fake = FakeOpenAI(chunks=5, interval=0.001, fail_first=10).start()
    try:
        session = harness.start(runner="openai", model="m", baseUrl=fake.base_url, apiKey="sk-test")
        thread, result = harness.run_in_thread(session)
        harness.wait_for(lambda: fake.requests == 2, "the second upstream attempt")
        harness.cancel(session)
        harness.finish(thread)
    finally:
        fake.stop()
    assert fake.requests == 2
    assert result[0]["outcome"] == "cancelled" and harness.doc(session)["status"] == "terminated"


def test_unreachable_model_ends_the_session_error_with_a_clear_message(harness):
    from devtools.servers import free_port

    session = harness.start(runner="openai", model="m", baseUrl=f"http://127.0.0.1:{free_port()}/v1", apiKey="k")
    assert harness.run(session)["outcome"] == "error"
    assert "upstream model unavailable" in harness.closing(session)["message"]


def test_turn_over_the_job_timeout_ends_the_session_error(harness, monkeypatch):
    """RQ raises JobTimeoutException inside the job when TURN_TIMEOUT passes; the session ends `timed_out`."""
    from rq.timeouts import JobTimeoutException

    from agentcloud_clone.jobs import runners

    def too_slow(ctx, grant):
        yield "partial "
        raise JobTimeoutException("Task exceeded maximum timeout value")

    monkeypatch.setitem(runners.RUNNERS, "scripted", too_slow)
    session = harness.start()
    assert harness.run(session)["outcome"] == "timed_out"
    doc = harness.doc(session)
    assert doc["status"] == "error" and doc["endReason"] == "timed_out"
    assert "timed out" in harness.closing(session)["message"]
    assert "".join(e["text"] for e in harness.events(session) if e["type"] == "output") == "partial "


def test_the_reaper_loop_runs_one_pass_per_interval_across_processes(app, harness):
    """Two loops (as in two processes) share the deployment's lock: the stuck session is ended once, by one."""
    from agentcloud_clone.jobs.reaper import ReaperLoop

    test_runners.release.clear()
    session = harness.start(runner="python", callable="tests.workers.runners:stubborn")
    thread, _ = harness.run_in_thread(session)
    harness.wait_running(session)
    app.config.update(HEARTBEAT_TIMEOUT=0.5, REAPER_INTERVAL=0.2)
    with app.app_context():
        from agentcloud_clone.db import get_db

        # The worker is gone: its heartbeats stop.
        from agentcloud_clone.jobs.watcher import stop_watchers

        stop_watchers()
    loops = [ReaperLoop(app).start(), ReaperLoop(app).start()]
    try:
        harness.wait_for(lambda: harness.doc(session)["status"] == "error", "the reaper loop to end the session")
    finally:
        for loop in loops:
            loop.stop()
        test_runners.release.set()
        harness.finish(thread)
    assert harness.doc(session)["endReason"] == "worker_lost"
    harness.closing(session)
    with app.app_context():
        assert get_db().sessions.count_documents({"_id": session["_id"]}) == 1


def test_the_watcher_sends_one_query_per_interval_for_five_turns_in_one_process(harness, app, monkeypatch):
    """Five turns in one process share its watcher: each poll interval costs one MongoDB query, not five."""
    import mongomock

    from agentcloud_clone.jobs.watcher import watcher_for

    queries: list[str] = []
    original = mongomock.collection.Collection.find

    def counting(self, *args, **kwargs):
        if threading.current_thread().name.startswith("cancel-watcher"):
            queries.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(mongomock.collection.Collection, "find", counting)
    sessions = [harness.start(steps=1000, stepDelay=0.02) for _ in range(5)]
    threads = [harness.run_in_thread(session)[0] for session in sessions]
    for session in sessions:
        harness.wait_running(session)
    watcher = watcher_for(app)
    polls_before, queries_before = watcher.polls, len(queries)
    harness.wait_for(lambda: watcher.polls >= polls_before + 5, "a few poll intervals")
    polls, sent = watcher.polls - polls_before, len(queries) - queries_before
    for session in sessions:
        harness.cancel(session)
    for thread in threads:
        harness.finish(thread)
    # One query a poll (give or take the poll in flight while counting); one per turn would be five a poll.
    assert polls >= 5 and abs(sent - polls) <= 1, (polls, sent)
    assert set(queries) == {"sessions"}


def test_a_turn_handed_back_after_a_shutdown_shows_a_note_and_its_rerun_as_a_reply_of_its_own():
    from agentcloud_clone.web.pages import transcript

    turn = "t1"
    items = transcript(
        [
            {"type": "message", "text": "go", "turnId": turn},
            {"type": "output", "text": "part", "turnId": turn},
            {"type": "turn_end", "turnId": turn, "retry": 1, "interrupted": True, "message": "will run again"},
            {"type": "output", "text": "whole", "turnId": turn},
            {"type": "turn_end", "turnId": turn},
        ]
    )
    assert [(i["kind"], i["text"]) for i in items] == [
        ("user", "go"),
        ("agent", "part"),
        ("note", "will run again"),
        ("agent", "whole"),
    ]
    assert items[1]["interrupted"] and not items[3]["interrupted"]


def test_a_heartbeat_held_up_by_the_store_does_not_hold_up_a_cancel(harness, app, monkeypatch):
    """The heartbeat (an update of every running session of the process) has a thread of its own: on a loaded
    store it takes seconds, and the poll a cancel needs must not wait behind it."""
    from agentcloud_clone.jobs import watcher as watcher_module

    entered, release = threading.Event(), threading.Event()
    original = watcher_module.sessions_repo.heartbeat

    def stuck(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(watcher_module.sessions_repo, "heartbeat", stuck)
    session = harness.start(steps=2000, stepDelay=0.02)
    thread, _ = harness.run_in_thread(session)
    try:
        harness.wait_running(session)
        harness.wait_for(entered.is_set, "a heartbeat in flight")
        harness.cancel(session)
        harness.finish(thread)  # ended while the heartbeat is still stuck
        assert harness.doc(session)["status"] == "terminated"
        assert not release.is_set()
    finally:
        release.set()
