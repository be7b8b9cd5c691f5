"""Tier 2: eager tasks (``task_always_eager``, ``.apply()``) see the caller's context as a
worker would, leak nothing back to it, and report failures as a worker does, also when
the exception propagates (``task_eager_propagates``)."""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
from celery import Celery, Task
from celery.exceptions import Retry
from plugin_support import Postruns, make_app

import task_scopes
import task_scopes.celery
from task_scopes.testing import CapturedEvents

CELERY_TAGS = {"celery_task_id", "celery_task_name", "celery_retry_count", "celery_hostname"}


def seen() -> dict[str, Any]:
    """The context as a task body sees it."""
    return {
        "distinct_id": task_scopes.get_context_distinct_id(),
        "session_id": task_scopes.get_context_session_id(),
        "tags": task_scopes.get_tags(),
    }


@dataclass
class Tasks:
    app: Celery
    report: Task
    meddle: Task
    outer: Task
    fail: Task


@pytest.fixture
def tasks() -> Iterator[Tasks]:
    app = make_app("eager", task_always_eager=True)

    @app.task(name="eager.report", shared=False)
    def report() -> dict[str, Any]:
        task_scopes.capture("report ran")
        return seen()

    @app.task(name="eager.meddle", shared=False)
    def meddle() -> dict[str, Any]:
        task_scopes.identify_context("someone-else")
        task_scopes.set_context_session("another-session")
        task_scopes.tag("plan", "free")
        task_scopes.tag("meddled", True)
        return seen()

    @app.task(name="eager.outer", shared=False)
    def outer() -> dict[str, Any]:
        task_scopes.tag("step", "outer")
        inner = report.delay().result
        return {"inner": inner, "outer_after": seen()}

    @app.task(name="eager.fail", shared=False)
    def fail() -> None:
        raise KeyError("no such order")

    @app.task(
        name="eager.autoretry",
        shared=False,
        bind=True,
        autoretry_for=(ConnectionError,),
        max_retries=2,
        retry_kwargs={"countdown": 0},
    )
    def autoretry(self: Task) -> None:
        task_scopes.capture("attempt", properties={"attempt": self.request.retries})
        raise ConnectionError(f"attempt {self.request.retries}")

    task_scopes.celery.install(app)
    try:
        yield Tasks(app, report, meddle, outer, fail)
    finally:
        task_scopes.celery.uninstall(app)


@pytest.fixture
def caller() -> Iterator[None]:
    """A caller context: user, session and tags, one a datetime."""
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.set_context_session("sess-1")
        task_scopes.tag("plan", "pro")
        task_scopes.tag("signed_up", datetime(2024, 5, 17, tzinfo=timezone.utc))
        yield


@pytest.mark.usefixtures("caller")
def test_task_sees_the_callers_distinct_id_session_and_tags(tasks: Tasks) -> None:
    got = tasks.report.delay().get()
    assert (got["distinct_id"], got["session_id"]) == ("user-1", "sess-1")
    assert got["tags"]["plan"] == "pro"
    assert "signed_up" in got["tags"]


@pytest.mark.usefixtures("caller")
def test_task_sees_its_own_celery_tags(tasks: Tasks) -> None:
    result = tasks.report.delay()
    tags = result.get()["tags"]
    assert set(tags) >= CELERY_TAGS
    assert tags["celery_task_id"] == result.id
    assert tags["celery_task_name"] == "eager.report"
    assert tags["celery_retry_count"] == 0


@pytest.mark.usefixtures("caller")
def test_apply_forks_the_callers_scope_like_delay(tasks: Tasks) -> None:
    got = tasks.report.apply().get()
    assert got["distinct_id"] == "user-1" and got["tags"]["plan"] == "pro"


@pytest.mark.usefixtures("caller")
def test_events_captured_in_the_task_carry_the_callers_context_and_task_tags(
    tasks: Tasks, captured_events: CapturedEvents
) -> None:
    result = tasks.report.delay()
    [event] = captured_events.named("report ran")
    assert event["distinct_id"] == "user-1"
    props = event["properties"]
    assert props["$session_id"] == "sess-1"
    assert props["plan"] == "pro"
    assert props["signed_up"] == "2024-05-17T00:00:00+00:00"
    assert props["celery_task_id"] == result.id
    assert props["celery_task_name"] == "eager.report"


@pytest.mark.usefixtures("caller")
def test_caller_is_unchanged_after_the_task_tags_and_identifies(tasks: Tasks) -> None:
    before = seen()
    got = tasks.meddle.delay().get()
    assert got["distinct_id"] == "someone-else" and got["tags"]["plan"] == "free"
    assert seen() == before
    assert not CELERY_TAGS & set(task_scopes.get_tags())


def test_caller_without_context_is_left_without_one(tasks: Tasks) -> None:
    with task_scopes.new_context(fresh=True):
        got = tasks.meddle.delay().get()
        assert got["distinct_id"] == "someone-else"
        assert task_scopes.get_context_distinct_id() is None
        assert task_scopes.get_tags() == {}


@pytest.mark.usefixtures("caller")
def test_nested_eager_task_sees_the_outer_tasks_context(tasks: Tasks) -> None:
    result = tasks.outer.delay()
    got = result.get()
    inner = got["inner"]
    assert inner["distinct_id"] == "user-1"
    assert inner["tags"]["step"] == "outer"
    assert inner["tags"]["celery_task_name"] == "eager.report"
    assert inner["tags"]["celery_task_id"] != result.id


@pytest.mark.usefixtures("caller")
def test_outer_task_is_restored_after_a_nested_eager_task(tasks: Tasks) -> None:
    result = tasks.outer.delay()
    after = result.get()["outer_after"]
    assert after["tags"]["celery_task_name"] == "eager.outer"
    assert after["tags"]["celery_task_id"] == result.id
    assert after["tags"]["step"] == "outer"


@pytest.mark.usefixtures("caller")
def test_caller_is_unchanged_after_nested_eager_tasks(tasks: Tasks) -> None:
    before = seen()
    tasks.outer.delay().get()
    assert seen() == before


@pytest.mark.usefixtures("caller")
def test_nested_eager_task_reports_no_celery_tag_of_the_outer_task(tasks: Tasks) -> None:
    got = tasks.outer.apply_async(routing_key="orders").get()
    assert "celery_queue" not in got["inner"]["tags"]


@pytest.mark.usefixtures("caller")
def test_eager_failure_is_captured_once_with_the_callers_context(
    tasks: Tasks, captured_events: CapturedEvents
) -> None:
    result = tasks.fail.delay()
    assert isinstance(result.result, KeyError)
    [event] = captured_events.named("$exception")
    assert event["distinct_id"] == "user-1"
    props = event["properties"]
    assert props["$exception_type"] == "KeyError"
    assert props["$exception_list"][0]["mechanism"]["type"] == "celery"
    assert props["$exception_list"][0]["mechanism"]["handled"] is False
    assert props["celery_task_name"] == "eager.fail"
    assert props["celery_task_id"] == result.id
    assert props["plan"] == "pro"


def test_eager_failure_re_raised_through_new_context_is_captured_once(
    tasks: Tasks, captured_events: CapturedEvents
) -> None:
    with pytest.raises(KeyError), task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        tasks.fail.delay().get()
    [event] = captured_events.named("$exception")
    assert event["properties"]["$exception_list"][0]["mechanism"]["type"] == "celery"


@pytest.mark.usefixtures("caller")
def test_eager_failure_leaves_the_caller_unchanged(tasks: Tasks) -> None:
    before = seen()
    tasks.fail.delay()
    assert seen() == before


@pytest.mark.usefixtures("caller")
def test_eager_task_propagating_its_exception_leaves_the_caller_unchanged(tasks: Tasks) -> None:
    before = seen()
    with pytest.raises(KeyError):
        tasks.fail.apply(throw=True)
    assert seen() == before


def test_eager_apply_with_a_context_header_uses_that_context(tasks: Tasks) -> None:
    from task_scopes.celery._header import encode

    header, _ = encode("from-header", "sess-h", {"origin": "api"})
    with task_scopes.new_context(fresh=True):
        got = tasks.report.apply(headers={"task_scopes": header}).get()
    assert (got["distinct_id"], got["session_id"]) == ("from-header", "sess-h")
    assert got["tags"]["origin"] == "api"


def test_the_window_id_of_a_context_header_reaches_the_tasks_events(
    tasks: Tasks, captured_events: CapturedEvents
) -> None:
    from task_scopes.celery._header import encode

    header, _ = encode("from-header", "sess-h", {}, window_id="win-h")
    with task_scopes.new_context(fresh=True):
        tasks.report.apply(headers={"task_scopes": header}).get()
    [event] = captured_events.named("report ran")
    assert event["properties"]["$window_id"] == "win-h"


@pytest.mark.usefixtures("caller")
def test_many_eager_tasks_leave_the_caller_exactly_as_it_was(tasks: Tasks) -> None:
    before = seen()
    isolation = task_scopes.get_isolation_scope()
    for _ in range(200):
        tasks.meddle.delay()
    assert task_scopes.get_isolation_scope() is isolation
    assert seen() == before


@pytest.mark.usefixtures("caller")
def test_eager_autoretry_sees_the_caller_each_attempt_and_is_captured_once(
    tasks: Tasks, captured_events: CapturedEvents
) -> None:
    result = tasks.app.tasks["eager.autoretry"].delay()
    assert isinstance(result.result, ConnectionError)
    attempts = captured_events.named("attempt")
    assert [e["properties"]["attempt"] for e in attempts] == [0, 1, 2]
    assert [e["properties"]["celery_retry_count"] for e in attempts] == [0, 1, 2]
    assert all(e["distinct_id"] == "user-1" for e in attempts)
    [event] = captured_events.named("$exception")
    assert event["properties"]["$exception_message"] == "attempt 2"
    assert event["distinct_id"] == "user-1"


# -- task_eager_propagates: the exception escapes apply(), task_failure is never sent --------


@pytest.fixture
def propagating(tasks: Tasks) -> Iterator[Tasks]:
    tasks.app.conf.task_eager_propagates = True
    try:
        yield tasks
    finally:
        tasks.app.conf.task_eager_propagates = False


@pytest.mark.usefixtures("caller")
def test_eager_propagates_captures_one_exception_with_the_task_tags_and_the_caller(
    propagating: Tasks, captured_events: CapturedEvents
) -> None:
    with pytest.raises(KeyError) as raised:
        propagating.fail.delay()
    assert raised.value.args == ("no such order",)
    [event] = captured_events.named("$exception")
    props = event["properties"]
    assert event["distinct_id"] == "user-1"
    assert (props["$session_id"], props["plan"]) == ("sess-1", "pro")
    assert props["celery_task_name"] == "eager.fail"
    assert props["$exception_list"][0]["mechanism"] == {
        "type": "celery",
        "handled": False,
        "synthetic": False,
    }


def test_eager_propagates_inside_new_context_is_captured_once_by_the_task(
    propagating: Tasks, captured_events: CapturedEvents
) -> None:
    with pytest.raises(KeyError), task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        propagating.fail.delay()
    [event] = captured_events.named("$exception")
    assert event["properties"]["$exception_list"][0]["mechanism"]["type"] == "celery"
    assert event["properties"]["celery_task_name"] == "eager.fail"


@pytest.mark.usefixtures("caller")
def test_apply_throw_true_is_captured_like_eager_propagates(
    tasks: Tasks, captured_events: CapturedEvents
) -> None:
    with pytest.raises(KeyError):
        tasks.fail.apply(throw=True)
    [event] = captured_events.named("$exception")
    assert event["properties"]["celery_task_name"] == "eager.fail"
    assert event["distinct_id"] == "user-1"


@pytest.mark.usefixtures("caller")
def test_eager_propagates_closes_the_tasks_scope_in_task_postrun(
    propagating: Tasks, postruns: Postruns
) -> None:
    before, isolation = seen(), task_scopes.get_isolation_scope()
    with pytest.raises(KeyError):
        result_id = "propagating-1"
        propagating.fail.apply_async(task_id=result_id)
    # Celery sends task_postrun (with no state) before the exception leaves apply().
    assert postruns.wait(result_id) == ["None"]
    assert task_scopes.get_isolation_scope() is isolation
    assert seen() == before


@pytest.mark.usefixtures("caller")
def test_eager_propagates_a_nested_failure_is_captured_once_for_the_inner_task(
    propagating: Tasks, captured_events: CapturedEvents
) -> None:
    @propagating.app.task(name="eager.fail_inside", shared=False)
    def fail_inside() -> None:
        task_scopes.tag("step", "outer")
        propagating.fail.delay()

    with pytest.raises(KeyError):
        fail_inside.delay()
    [event] = captured_events.named("$exception")
    assert event["properties"]["celery_task_name"] == "eager.fail"
    assert event["properties"]["step"] == "outer"


@pytest.mark.usefixtures("caller")
def test_eager_propagates_a_retry_escapes_as_celery_raises_it_and_is_not_captured(
    propagating: Tasks, captured_events: CapturedEvents
) -> None:
    # Celery raises Retry out of apply() in this mode instead of running the next attempt.
    with pytest.raises(Retry):
        propagating.app.tasks["eager.autoretry"].delay()
    assert [e["properties"]["attempt"] for e in captured_events.named("attempt")] == [0]
    assert captured_events.named("$exception") == []


# -- threads inside a task (the README's rule) -----------------------------------------------


@pytest.mark.usefixtures("caller")
def test_a_thread_inside_a_task_needs_a_copied_context(
    tasks: Tasks, captured_events: CapturedEvents
) -> None:
    def in_thread() -> None:
        task_scopes.tag("written_in_thread", True)
        task_scopes.capture("from thread")

    @tasks.app.task(name="eager.threads", shared=False)
    def threads() -> dict[str, Any]:
        for target in (in_thread, functools.partial(contextvars.copy_context().run, in_thread)):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
        return seen()

    after = threads.delay().get()
    plain, copied = captured_events.named("from thread")
    assert plain["properties"]["$process_person_profile"] is False  # Python copies nothing
    assert copied["distinct_id"] == "user-1"
    assert copied["properties"]["celery_task_name"] == "eager.threads"
    assert "written_in_thread" not in after["tags"]  # the copy's writes stay in the copy
