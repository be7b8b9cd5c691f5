"""Tier 2: failures, retries, lifecycle events and the task filter, with a real Celery
worker in a thread of the test process (solo pool, memory:// broker)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, Task
from celery.exceptions import Ignore, Reject
from plugin_support import WAIT, Postruns, in_thread_worker, make_app

import task_scopes
import task_scopes.celery
from task_scopes.testing import CapturedEvents


class CardDeclined(Exception):
    pass


@pytest.fixture(scope="module")
def app() -> Iterator[Celery]:
    app = make_app("failures")

    @app.task(name="failures.fail", shared=False)
    def fail() -> None:
        raise CardDeclined("card declined")

    @app.task(name="failures.fail_filtered", shared=False)
    def fail_filtered() -> None:
        raise CardDeclined("card declined, filtered")

    @app.task(name="failures.succeed", shared=False)
    def succeed() -> str:
        return "ok"

    @app.task(name="failures.who", shared=False)
    def who() -> str | None:
        return task_scopes.get_context_distinct_id()

    @app.task(name="failures.ignore", shared=False)
    def ignore() -> None:
        raise Ignore()

    @app.task(name="failures.reject", shared=False)
    def reject() -> None:
        raise Reject("bad payload", requeue=False)

    @app.task(name="failures.expected", shared=False, throws=(LookupError,))
    def expected() -> None:
        raise KeyError("no such order")

    @app.task(name="failures.retry_once", shared=False, bind=True)
    def retry_once(self: Task) -> str:
        if self.request.retries == 0:
            raise self.retry(exc=ConnectionError("flaky"), countdown=0)
        return "second time lucky"

    @app.task(
        name="failures.autoretry",
        shared=False,
        bind=True,
        autoretry_for=(ConnectionError,),
        max_retries=2,
        retry_backoff=False,
        retry_jitter=False,
        retry_kwargs={"countdown": 0},
    )
    def autoretry(self: Task) -> None:
        raise ConnectionError(f"attempt {self.request.retries}")

    task_scopes.celery.install(app)
    try:
        with in_thread_worker(app):
            yield app
    finally:
        task_scopes.celery.uninstall(app)


@pytest.fixture
def reinstall(app: Celery) -> Iterator[Any]:
    """``reinstall(**overrides)`` for one test; default options again afterwards."""

    def apply(**overrides: Any) -> None:
        task_scopes.celery.install(app, **overrides)

    yield apply
    task_scopes.celery.install(app)


def start(app: Celery, name: str, **options: Any) -> Any:
    """Publish ``name`` from a producer context: user-1, sess-1, plan=pro."""
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.set_context_session("sess-1")
        task_scopes.tag("plan", "pro")
        return app.tasks[name].apply_async(**options)


def finish(result: Any, postruns: Postruns, runs: int = 1) -> list[str]:
    """Wait for the result, then for the plugin's handlers of every run; return states."""
    result.get(timeout=WAIT, interval=0.005, propagate=False)
    return postruns.wait(result.id, runs)


def exceptions(events: CapturedEvents, task_id: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in events.named("$exception")
        if task_id is None or e["properties"].get("celery_task_id") == task_id
    ]


def mechanism(event: dict[str, Any]) -> dict[str, Any]:
    mech = event["properties"]["$exception_list"][0]["mechanism"]
    assert isinstance(mech, dict)
    return mech


# -- what is captured ----------------------------------------------------------------------


def test_a_failed_task_is_captured_once_with_context_and_task_tags(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    result = start(app, "failures.fail")
    assert finish(result, postruns) == ["FAILURE"]
    [event] = exceptions(captured_events)
    assert event["distinct_id"] == "user-1"
    props = event["properties"]
    assert props["$exception_type"] == "CardDeclined"
    assert props["$exception_message"] == "card declined"
    assert props["$session_id"] == "sess-1"
    assert props["plan"] == "pro"
    assert props["celery_task_id"] == result.id
    assert props["celery_task_name"] == "failures.fail"
    assert props["celery_retry_count"] == 0
    assert props["celery_queue"] == app.conf.task_default_queue
    assert mechanism(event)["type"] == "celery"
    assert mechanism(event)["handled"] is False


def test_the_tasks_own_exception_reaches_the_result_unchanged(
    app: Celery, postruns: Postruns
) -> None:
    result = start(app, "failures.fail")
    finish(result, postruns)
    assert isinstance(result.result, CardDeclined)
    assert str(result.result) == "card declined"
    assert result.state == "FAILURE"


@pytest.mark.parametrize(
    ("name", "state"),
    [
        ("failures.ignore", "IGNORED"),
        ("failures.reject", "REJECTED"),
        ("failures.expected", "FAILURE"),
    ],
    ids=["Ignore", "Reject", "throws"],
)
def test_expected_outcomes_are_not_captured(
    app: Celery,
    postruns: Postruns,
    captured_events: CapturedEvents,
    name: str,
    state: str,
) -> None:
    expected = start(app, name)
    assert postruns.wait(expected.id) == [state]
    control = start(app, "failures.fail")  # captured: proves capturing was working
    finish(control, postruns)
    assert exceptions(captured_events, expected.id) == []
    assert len(exceptions(captured_events)) == 1


def test_retry_then_success_is_not_captured(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    result = start(app, "failures.retry_once")
    assert result.get(timeout=WAIT, interval=0.005) == "second time lucky"
    assert postruns.wait(result.id, 2) == ["RETRY", "SUCCESS"]
    assert exceptions(captured_events) == []


def test_autoretry_exhausted_is_captured_once_at_the_last_attempt(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    result = start(app, "failures.autoretry")
    assert finish(result, postruns, runs=3) == ["RETRY", "RETRY", "FAILURE"]
    [event] = exceptions(captured_events)
    props = event["properties"]
    assert props["$exception_message"] == "attempt 2"
    assert props["celery_retry_count"] == 2
    assert event["distinct_id"] == "user-1"  # the retries carried the context
    assert mechanism(event)["type"] == "celery"


def test_capture_retries_captures_every_attempt(
    app: Celery, reinstall: Any, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    reinstall(capture_retries=True)
    result = start(app, "failures.autoretry")
    finish(result, postruns, runs=3)
    events = exceptions(captured_events, result.id)
    assert [e["properties"]["$exception_message"] for e in events] == [
        "attempt 0",
        "attempt 1",
        "attempt 2",
    ]
    assert [e["properties"]["celery_retry_count"] for e in events] == [0, 1, 2]
    assert all(e["distinct_id"] == "user-1" for e in events)
    assert all(mechanism(e)["handled"] is False for e in events)
    assert mechanism(events[-1])["type"] == "celery"


def test_capture_exceptions_false_captures_no_failure(
    app: Celery, reinstall: Any, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    reinstall(capture_exceptions=False)
    finish(start(app, "failures.fail"), postruns)
    assert exceptions(captured_events) == []


# -- lifecycle events ----------------------------------------------------------------------


def lifecycle(events: CapturedEvents, task_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events.events
        if e["event"].startswith("celery task ")
        and e["properties"].get("celery_task_id") == task_id
    ]


def test_task_events_for_a_successful_task(
    app: Celery, reinstall: Any, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    reinstall(task_events=True)
    result = start(app, "failures.succeed")
    finish(result, postruns)
    events = lifecycle(captured_events, result.id)
    assert [e["event"] for e in events] == ["celery task started", "celery task success"]
    assert all(e["distinct_id"] == "user-1" for e in events)
    assert events[1]["properties"]["celery_state"] == "SUCCESS"
    assert events[1]["properties"]["celery_duration_ms"] >= 0


def test_task_events_for_a_failed_task(
    app: Celery, reinstall: Any, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    reinstall(task_events=True)
    result = start(app, "failures.fail")
    finish(result, postruns)
    events = lifecycle(captured_events, result.id)
    assert [e["event"] for e in events] == ["celery task started", "celery task failure"]
    assert events[1]["properties"]["celery_exception"] == "CardDeclined"
    assert len(exceptions(captured_events, result.id)) == 1


def test_task_events_for_a_retried_task(
    app: Celery, reinstall: Any, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    reinstall(task_events=True)
    result = start(app, "failures.retry_once")
    finish(result, postruns, runs=2)
    assert [e["event"] for e in lifecycle(captured_events, result.id)] == [
        "celery task started",
        "celery task retry",
        "celery task started",
        "celery task success",
    ]


def test_no_task_events_by_default(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    result = start(app, "failures.succeed")
    finish(result, postruns)
    assert lifecycle(captured_events, result.id) == []


# -- task filter ---------------------------------------------------------------------------


def test_task_filter_false_suppresses_capture_for_that_task(
    app: Celery, reinstall: Any, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    reinstall(task_filter=lambda name: name != "failures.fail_filtered", task_events=True)
    skipped = start(app, "failures.fail_filtered")
    kept = start(app, "failures.fail")
    finish(skipped, postruns)
    finish(kept, postruns)
    assert exceptions(captured_events, skipped.id) == []
    assert lifecycle(captured_events, skipped.id) == []
    assert len(exceptions(captured_events, kept.id)) == 1


def test_task_filter_does_not_stop_propagation(
    app: Celery, reinstall: Any, postruns: Postruns
) -> None:
    reinstall(task_filter=lambda name: False)
    result = start(app, "failures.who")
    assert result.get(timeout=WAIT, interval=0.005) == "user-1"


# -- handlers never raise into Celery ------------------------------------------------------


def broken_filter(task_name: str) -> bool:
    raise RuntimeError("filter bug")


@pytest.mark.usefixtures("guard_swallows")
def test_a_raising_task_filter_neither_breaks_the_task_nor_loses_the_failure(
    app: Celery,
    reinstall: Any,
    postruns: Postruns,
    captured_events: CapturedEvents,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reinstall(task_filter=broken_filter, task_events=True)
    with caplog.at_level(logging.ERROR, logger="task_scopes"):
        ok = start(app, "failures.succeed")
        assert ok.get(timeout=WAIT, interval=0.005) == "ok"
        failed = start(app, "failures.fail")
        finish(ok, postruns)
        finish(failed, postruns)
    assert isinstance(failed.result, CardDeclined)
    assert len(exceptions(captured_events, failed.id)) == 1
    assert any("task_filter" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("guard_swallows")
def test_a_tag_that_breaks_encoding_never_stops_the_task(app: Celery, postruns: Postruns) -> None:
    # json.dumps() refuses ints of more than 4,300 digits (CPython's int/str limit): encode()
    # raises inside before_task_publish, and the guard must keep that from the producer.
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.tag("checksum", 10**5000)
        result = app.tasks["failures.succeed"].delay()
    assert result.get(timeout=WAIT, interval=0.005) == "ok"
    finish(result, postruns)


def test_a_tag_holding_an_undecodable_file_name_costs_only_that_tag(app: Celery) -> None:
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.tag("file", Path(os.fsdecode(b"report-\xff.csv")))
        result = app.tasks["failures.who"].delay()
    assert result.get(timeout=WAIT, interval=0.005) == "user-1"
