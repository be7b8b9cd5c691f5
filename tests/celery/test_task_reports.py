"""Tier 2: what task events report, with a real Celery worker in a thread of the test
process (solo pool, memory:// broker): exception messages and retry reasons, the original
exception behind Celery's picklable stand-ins, and the time in queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, Task
from celery.utils.serialization import UnpickleableExceptionWrapper
from plugin_support import WAIT, Postruns, in_thread_worker, make_app

import task_scopes
import task_scopes.celery
from task_scopes.celery._failure import original_exception
from task_scopes.celery._header import encode
from task_scopes.testing import CapturedEvents

LONG = "declined " + "x" * 3000 + "\x00\x1b"


class HoldsALock(Exception):
    """No class in its MRO pickles with these arguments: Celery wraps it in an
    ``UnpickleableExceptionWrapper``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, threading.Lock())
        self.message = message

    def __str__(self) -> str:
        return self.message


class TwoArguments(Exception):
    """Pickles, but does not unpickle (``__init__`` needs two arguments): Celery sends an
    ``Exception`` built from the same arguments instead."""

    def __init__(self, order: str, reason: str) -> None:
        super().__init__(f"order {order}: {reason}")


@pytest.fixture(scope="module")
def app() -> Iterator[Celery]:
    app = make_app("reports")

    @app.task(name="reports.fail_long", shared=False)
    def fail_long() -> None:
        raise ValueError(LONG)

    @app.task(name="reports.retry", shared=False, bind=True)
    def retry(self: Task, with_reason: bool) -> str:
        if self.request.retries == 0:
            exc = ConnectionError("upstream down") if with_reason else None
            raise self.retry(exc=exc, countdown=0)
        return "done"

    @app.task(name="reports.holds_a_lock", shared=False)
    def holds_a_lock() -> None:
        raise HoldsALock("lock held by order 7")

    @app.task(name="reports.two_arguments", shared=False)
    def two_arguments() -> None:
        raise TwoArguments("7", "card declined")

    @app.task(name="reports.report", shared=False)
    def report() -> None:
        task_scopes.capture("report ran")

    task_scopes.celery.install(app, task_events=True)
    try:
        with in_thread_worker(app):
            yield app
    finally:
        task_scopes.celery.uninstall(app)


def run(app: Celery, postruns: Postruns, name: str, runs: int = 1, **options: Any) -> str:
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        result = app.tasks[name].apply_async(**options)
    result.get(timeout=WAIT, interval=0.005, propagate=False)
    postruns.wait(result.id, runs)
    return str(result.id)


def of_task(events: CapturedEvents, task_id: str) -> list[dict[str, Any]]:
    return [e for e in events.events if e["properties"].get("celery_task_id") == task_id]


# -- messages and reasons -----------------------------------------------------------------


def test_the_failure_event_has_the_exception_message_capped_and_cleaned(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    task_id = run(app, postruns, "reports.fail_long")
    [failure] = [
        e for e in of_task(captured_events, task_id) if e["event"] == "celery task failure"
    ]
    props = failure["properties"]
    assert props["celery_exception"] == "ValueError"
    assert props["celery_exception_message"] == LONG[:1000]
    assert len(props["celery_exception_message"]) == 1000


def test_the_retry_event_has_the_exception_given_to_retry(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    task_id = run(app, postruns, "reports.retry", runs=2, args=(True,))
    [retry] = [e for e in of_task(captured_events, task_id) if e["event"] == "celery task retry"]
    assert retry["properties"]["celery_exception"] == "ConnectionError"
    assert retry["properties"]["celery_exception_message"] == "upstream down"


def test_a_retry_without_an_exception_has_no_reason(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    task_id = run(app, postruns, "reports.retry", runs=2, args=(False,))
    [retry] = [e for e in of_task(captured_events, task_id) if e["event"] == "celery task retry"]
    assert "celery_exception" not in retry["properties"]
    assert "celery_exception_message" not in retry["properties"]


# -- the original exception behind Celery's stand-ins ---------------------------------------


@pytest.mark.parametrize(
    ("name", "type_name", "message"),
    [
        ("reports.holds_a_lock", "HoldsALock", "lock held by order 7"),
        ("reports.two_arguments", "TwoArguments", "order 7: card declined"),
    ],
)
def test_an_unpicklable_exception_is_reported_under_its_own_type(
    app: Celery,
    postruns: Postruns,
    captured_events: CapturedEvents,
    name: str,
    type_name: str,
    message: str,
) -> None:
    task_id = run(app, postruns, name)
    events = of_task(captured_events, task_id)
    [exception] = [e for e in events if e["event"] == "$exception"]
    props = exception["properties"]
    [entry] = props["$exception_list"]
    assert (entry["type"], entry["module"], entry["value"]) == (type_name, __name__, message)
    assert props["$exception_type"] == type_name
    assert props["$exception_message"] == message
    assert name.split(".")[1] in {frame["function"] for frame in entry["stacktrace"]["frames"]}
    [failure] = [e for e in events if e["event"] == "celery task failure"]
    assert failure["properties"]["celery_exception"] == type_name


def test_a_wrapper_seen_outside_the_failure_is_restored_to_the_original_class() -> None:
    try:
        raise HoldsALock("lock held")
    except HoldsALock as exc:
        wrapper = UnpickleableExceptionWrapper.from_exception(exc)
    restored = original_exception(wrapper)  # no exception being handled here
    assert (type(restored).__name__, type(restored).__module__) == ("HoldsALock", __name__)
    assert restored.__traceback__ is wrapper.__traceback__
    assert str(restored).startswith("('lock held', ")


# -- time in queue ---------------------------------------------------------------------------


def test_every_event_of_a_run_carries_the_time_in_queue_countdown_included(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    task_id = run(app, postruns, "reports.report", countdown=0.3)
    events = of_task(captured_events, task_id)
    assert [e["event"] for e in events] == [
        "celery task started",
        "report ran",
        "celery task success",
    ]
    latencies = {e["properties"]["celery_queue_latency_ms"] for e in events}
    assert len(latencies) == 1
    # Celery computes the ETA (now + 0.3 s) a moment before the publish time is written,
    # and the worker's timer may fire a few ms early: the countdown shows, less that.
    assert latencies.pop() >= 250


def test_a_publish_time_in_the_future_gives_zero_not_a_negative_latency(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    future = time.time_ns() // 1_000_000 + 3_600_000  # the producer's clock 1 h ahead
    header, _ = encode("user-1", None, {}, published_ms=future)
    with task_scopes.new_context(fresh=True):  # empty: the header given here stands
        result = app.tasks["reports.report"].apply_async(headers={"task_scopes": header})
    result.get(timeout=WAIT, interval=0.005)
    postruns.wait(result.id)
    [event] = [e for e in of_task(captured_events, result.id) if e["event"] == "report ran"]
    assert event["distinct_id"] == "user-1"
    assert event["properties"]["celery_queue_latency_ms"] == 0


def test_a_header_without_a_publish_time_gives_no_latency(
    app: Celery, postruns: Postruns, captured_events: CapturedEvents
) -> None:
    header, _ = encode("user-1", None, {})  # an older producer: no "p"
    with task_scopes.new_context(fresh=True):
        result = app.tasks["reports.report"].apply_async(headers={"task_scopes": header})
    result.get(timeout=WAIT, interval=0.005)
    postruns.wait(result.id)
    [event] = [e for e in of_task(captured_events, result.id) if e["event"] == "report ran"]
    assert event["distinct_id"] == "user-1"
    assert "celery_queue_latency_ms" not in event["properties"]
