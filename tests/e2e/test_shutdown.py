"""Nothing captured in a worker is lost on a warm shutdown or a child's recycling.

Each task captures one event and then increments a Redis counter, so the test knows when
every task has run before it sends SIGTERM. The flush interval and batch size are far
beyond the run, so only the exit flushes can deliver the events.
"""

from __future__ import annotations

import pytest
import redis

from task_scopes.testing import CaptureServer

from .harness import (
    Broker,
    Event,
    MakeProducer,
    StartWorker,
    producer_context,
    props,
    wait_events,
    wait_for_value,
)

pytestmark = [pytest.mark.slow, pytest.mark.broker]

HOLD_EVERYTHING = {
    "task_scopes_flush_interval": 300.0,
    "task_scopes_flush_at": 10_000,
    "task_scopes_max_queue_size": 20_000,
}


def _run_count_tasks(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
    *,
    tasks: int,
    extra_args: tuple[str, ...] = (),
) -> tuple[int, list[Event]]:
    """Run ``tasks`` counting tasks, SIGTERM the worker once all ran.

    Returns (events received before SIGTERM, our events received after the worker exited).
    """
    worker = start_worker(broker, settings=HOLD_EVERYTHING, extra_args=extra_args)
    app = make_producer(broker)
    key = f"e2e:count:{run_id}"
    count = app.tasks["e2e.count"]
    with producer_context(f"flush-{run_id}"):
        for i in range(tasks):
            count.delay(f"{run_id}-{i}", key)

    def ours(e: Event) -> bool:
        return e["event"] == "e2e.count" and str(props(e).get("label", "")).startswith(run_id)

    with redis.Redis.from_url(broker.redis_url) as client:
        wait_for_value(
            lambda: int(client.get(key) or 0), tasks, timeout=240, worker=worker, what="tasks run"
        )
    before = sum(1 for e in capture_server.events if ours(e))
    assert worker.stop() == 0, worker.log_tail()
    assert not worker.killed
    # The exit flushes happened before the processes exited; allow the collector a moment.
    return before, wait_events(
        capture_server, ours, tasks, timeout=30, worker=None, what="events after shutdown"
    )


def test_sigterm_delivers_all_2000_events_held_by_a_long_flush_interval(
    redis_broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    before, events = _run_count_tasks(
        redis_broker, capture_server, start_worker, make_producer, run_id, tasks=2000
    )
    # Otherwise the test would prove nothing about the exit flush.
    assert before < 2000
    labels = {props(e)["label"] for e in events}
    assert labels == {f"{run_id}-{i}" for i in range(2000)}
    assert {e["distinct_id"] for e in events} == {f"flush-{run_id}"}


def test_max_tasks_per_child_1_delivers_all_200_events(
    redis_broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    _, events = _run_count_tasks(
        redis_broker,
        capture_server,
        start_worker,
        make_producer,
        run_id,
        tasks=200,
        extra_args=("--max-tasks-per-child=1",),
    )
    labels = {props(e)["label"] for e in events}
    assert labels == {f"{run_id}-{i}" for i in range(200)}
    # Every task ran in a process of its own, so each event came from a recycled child.
    assert len({props(e)["pid"] for e in events}) == 200
