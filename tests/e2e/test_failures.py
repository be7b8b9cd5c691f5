"""Failures: retries keep the context, only final failures are captured, and once.

Absence of an ``$exception`` is checked after a warm stop of the worker: every process has
flushed by then, so an unwanted event would have arrived.
"""

from __future__ import annotations

import pytest

from task_scopes.testing import CaptureServer

from .harness import (
    Broker,
    Event,
    MakeProducer,
    StartWorker,
    exception_type,
    exceptions,
    labelled,
    producer_context,
    props,
    wait_events,
)
from .worker_app import USER_HEADER

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def _user_header(event: Event) -> object:
    p = props(event)
    return p.get("user_header_attr") or p.get("user_header_headers")


def test_retry_twice_then_success_keeps_context_and_user_header_and_captures_nothing(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker)
    app = make_producer(broker)
    label, user = f"{run_id}-retry", f"retry-{run_id}"

    with producer_context(user, "retry-session", {"flow": "retry"}):
        result = app.tasks["e2e.retry_twice"].apply_async((label,), headers={USER_HEADER: "keep"})

    attempts = wait_events(capture_server, labelled(label), 3, worker=worker, what="attempts")
    [done] = wait_events(capture_server, labelled(label, "e2e.done"), 1, worker=worker)
    assert worker.stop() == 0

    assert sorted(props(e)["celery_retry_count"] for e in attempts) == [0, 1, 2]
    for event in [*attempts, done]:
        p = props(event)
        assert event["distinct_id"] == user
        assert (p["$session_id"], p["flow"]) == ("retry-session", "retry")
        assert p["celery_task_id"] == result.id
        assert p["celery_retry_count"] == p["attempt"]
    assert props(done)["celery_retry_count"] == 2
    assert [_user_header(e) for e in sorted(attempts, key=lambda e: props(e)["attempt"])] == [
        "keep",
        "keep",
        "keep",
    ]
    assert _user_header(done) == "keep"
    assert [e for e in capture_server.events if exceptions("e2e.retry_twice")(e)] == []


def test_autoretry_exhausted_captures_exactly_one_exception_with_the_context(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker)
    app = make_producer(broker)
    label, user = f"{run_id}-autoretry", f"autoretry-{run_id}"

    with producer_context(user, "autoretry-session", {"flow": "autoretry"}):
        result = app.tasks["e2e.autoretry_fail"].apply_async(
            (label,), headers={USER_HEADER: "keep"}
        )

    attempts = wait_events(capture_server, labelled(label), 3, worker=worker, what="attempts")
    wait_events(capture_server, exceptions(task_id=result.id), 1, worker=worker)
    assert worker.stop() == 0

    assert sorted(props(e)["celery_retry_count"] for e in attempts) == [0, 1, 2]
    for event in attempts:
        assert event["distinct_id"] == user
        assert props(event)["flow"] == "autoretry"
    last = max(attempts, key=lambda e: props(e)["attempt"])
    assert _user_header(last) == "keep"

    captured = [e for e in capture_server.events if exceptions(task_id=result.id)(e)]
    assert len(captured) == 1, [props(e).get("celery_retry_count") for e in captured]
    [failure] = captured
    p = props(failure)
    assert failure["distinct_id"] == user
    assert p["$session_id"] == "autoretry-session"
    assert p["flow"] == "autoretry"
    assert exception_type(failure) == "ValueError"
    assert p["celery_task_name"] == "e2e.autoretry_fail"
    assert p["celery_retry_count"] == 2
    assert p["$exception_list"][0]["mechanism"]["handled"] is False


def test_retry_ignore_reject_and_throws_capture_no_exception(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker)
    app = make_producer(broker)
    t = app.tasks

    def lbl(name: str) -> str:
        return f"{run_id}-{name}"

    with producer_context(f"expected-{run_id}"):
        retried = t["e2e.retry_once"].delay(lbl("retry"))
        for name in ("ignore_capture", "reject", "throws"):
            t[f"e2e.{name}"].delay(lbl(name))
        # A real failure in the same run: proves failures are captured and flushed here.
        control = t["e2e.fail"].delay(lbl("control"))

    wait_events(capture_server, labelled(lbl("retry"), "e2e.done"), 1, worker=worker)
    for name in ("ignore_capture", "reject", "throws", "control"):
        wait_events(
            capture_server, labelled(lbl(name), "e2e.before_raise"), 1, worker=worker, what=name
        )
    wait_events(capture_server, exceptions(task_id=control.id), 1, worker=worker)
    assert worker.stop() == 0

    captured = [
        (props(e).get("celery_task_name"), exception_type(e))
        for e in capture_server.events
        if e["event"] == "$exception"
    ]
    assert captured == [("e2e.fail", "ValueError")]
    assert retried.id != control.id


def test_hard_time_limit_lost_child_and_soft_time_limit_are_captured_once_each(
    redis_broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(redis_broker)
    app = make_producer(redis_broker)
    sleep, kill_self = app.tasks["e2e.sleep"], app.tasks["e2e.kill_self"]

    with producer_context(f"hard-{run_id}", tags={"flow": "hard"}):
        hard = sleep.apply_async((f"{run_id}-hard", 30), time_limit=1)
    with producer_context(f"soft-{run_id}", tags={"flow": "soft"}):
        soft = sleep.apply_async((f"{run_id}-soft", 20), soft_time_limit=1, time_limit=30)
    for name, result in (("hard", hard), ("soft", soft)):
        wait_events(capture_server, exceptions(task_id=result.id), 1, worker=worker, what=name)
    # Only now: SIGKILL also destroys what that child still held unsent, and the child that
    # raised the soft limit may be the one to run this task.
    with producer_context(f"kill-{run_id}", tags={"flow": "kill"}):
        killed = kill_self.delay(f"{run_id}-kill")
    wait_events(capture_server, exceptions(task_id=killed.id), 1, worker=worker, what="kill")

    cases = {
        "hard": (hard.id, "e2e.sleep", "TimeLimitExceeded"),
        "soft": (soft.id, "e2e.sleep", "SoftTimeLimitExceeded"),
        "kill": (killed.id, "e2e.kill_self", "WorkerLostError"),
    }
    # The main process reports the hard limit twice (Celery 5.7): give a duplicate every
    # chance to be flushed before counting.
    assert worker.stop() == 0

    for name, (task_id, task_name, type_name) in cases.items():
        captured = [e for e in capture_server.events if exceptions(task_id=task_id)(e)]
        assert len(captured) == 1, (name, len(captured))
        [failure] = captured
        p = props(failure)
        assert exception_type(failure) == type_name, name
        assert failure["distinct_id"] == f"{name}-{run_id}", name
        assert p["flow"] == name
        assert p["celery_task_name"] == task_name, name
        # Also where the main process captures it: dated by the child's acceptance.
        assert isinstance(p["celery_queue_latency_ms"], int), name
        assert p["celery_queue_latency_ms"] >= 0, name

    # The soft limit is raised inside the task, in the child: its stack is the task's own.
    [soft_failure] = [e for e in capture_server.events if exceptions(task_id=soft.id)(e)]
    frames = soft_failure["properties"]["$exception_list"][0]["stacktrace"]["frames"]
    assert "_sleep_until" in {frame["function"] for frame in frames}
