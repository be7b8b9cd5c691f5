"""A thousand ``Ignore``d tasks on one solo worker leave no context and no scope behind.

PostHog's integration opens its context in ``task_prerun`` and closes it on success,
failure or retry only, so every ``Ignore`` leaks one; task_scopes closes in
``task_postrun``. The probe task reports what the previous task left in the worker's base
context (recorded by a ``task_prerun`` receiver connected before the plugin's) and how
many scope objects are alive.
"""

from __future__ import annotations

import pytest

from task_scopes.testing import CaptureServer

from .harness import (
    Broker,
    MakeProducer,
    StartWorker,
    labelled,
    producer_context,
    props,
    wait_events,
)

pytestmark = [pytest.mark.slow, pytest.mark.broker]

IGNORED = 1000


def test_a_thousand_ignored_tasks_leave_nothing_behind_on_a_solo_worker(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker, pool="solo", concurrency=1)
    app = make_producer(broker)
    ignore, probe = app.tasks["e2e.ignore"], app.tasks["e2e.probe"]

    def send_ignored(start: int, stop: int) -> None:
        for i in range(start, stop):
            with producer_context(f"ignored-{i}", f"ignored-session-{i}", {"ignored_tag": i}):
                ignore.delay(f"{run_id}-ignored-{i}")

    # A solo worker runs its queue in order: probe 1 after 10 ignored tasks, probe 2 last.
    send_ignored(0, 10)
    with producer_context(f"probe1-{run_id}", tags={"probe": 1}):
        probe.delay(f"{run_id}-probe1")
    send_ignored(10, IGNORED)
    with producer_context(f"probe2-{run_id}", tags={"probe": 2}):
        probe.delay(f"{run_id}-probe2")

    [first] = wait_events(
        capture_server, labelled(f"{run_id}-probe1", "e2e.probe"), 1, worker=worker
    )
    [last] = wait_events(
        capture_server, labelled(f"{run_id}-probe2", "e2e.probe"), 1, worker=worker, timeout=240
    )

    for n, event in ((1, first), (2, last)):
        p = props(event)
        assert event["distinct_id"] == f"probe{n}-{run_id}"
        assert p["probe"] == n
        assert "ignored_tag" not in p
        assert "$session_id" not in p
        # Nothing of the previous (ignored) task was left active in the worker's context.
        assert p["isolation_before_prerun"] == "None", p["isolation_before_prerun"]
    # No structure grew with the 990 ignored tasks in between: one leaked scope per task
    # would show as hundreds more live Scope objects.
    grown = props(last)["live_scopes"] - props(first)["live_scopes"]
    assert grown <= 5, (props(first)["live_scopes"], props(last)["live_scopes"])
    assert props(last)["gc_objects"] - props(first)["gc_objects"] < IGNORED, (
        props(first)["gc_objects"],
        props(last)["gc_objects"],
    )
