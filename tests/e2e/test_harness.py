"""The harness itself, without the plugin: a worker runs tasks and their events arrive."""

from __future__ import annotations

import pytest

from task_scopes.testing import CaptureServer

from .harness import Broker, MakeProducer, StartWorker, labelled, wait_events

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_plain_worker_runs_a_task_and_its_event_reaches_the_collector(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker, plugin=False)
    app = make_producer(broker, plugin=False)
    label = f"{run_id}-plain"
    app.tasks["e2e.report"].delay(label)
    [event] = wait_events(capture_server, labelled(label), 1, worker=worker)
    # No plugin: nothing carried the (absent) producer context, so the event is personless.
    assert event["properties"]["$process_person_profile"] is False
    assert event["properties"]["pid"] != 0
