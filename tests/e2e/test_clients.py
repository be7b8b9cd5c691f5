"""End to end: which client a task's events go to, through real prefork workers on Redis.

The client lives on the scopes: ``task_scopes.init()`` binds one to the global scope, and an
app installed with ``task_scopes_api_key`` binds its own to the isolation scope of each of
its task runs. Keys are read at the collector, per request.
"""

from __future__ import annotations

import uuid

import pytest

from task_scopes.testing import CaptureServer

from . import worker_app
from .harness import API_KEY, Broker, MakeProducer, StartWorker, labelled, props, wait_events

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_two_apps_with_two_keys_each_send_their_own_tasks_events_with_their_own_key(
    redis_broker: Broker,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    capture_server: CaptureServer,
) -> None:
    # Every worker process installs both apps, the second one last.
    settings = {worker_app.SECOND_API_KEY: "phc_second"}
    second_broker = Broker(
        "redis", redis_broker.url, redis_broker.queue + "_second", redis_broker.redis_url
    )
    start_worker(redis_broker, settings=settings)
    start_worker(second_broker, settings={**settings, worker_app.SERVE_SECOND: True})
    first_app = make_producer(redis_broker)
    second_app = make_producer(second_broker)
    labels = {"first": f"first-{uuid.uuid4().hex[:8]}", "second": f"second-{uuid.uuid4().hex[:8]}"}
    first_app.send_task("e2e.report", args=[labels["first"]])
    first_app.send_task("e2e.fail", args=[labels["first"]])
    second_app.send_task("e2e.report", args=[labels["second"]])
    second_app.send_task("e2e.fail", args=[labels["second"]])

    for which, key in (("first", API_KEY), ("second", "phc_second")):
        label = labels[which]
        reports = wait_events(capture_server, labelled(label), 1)
        failures = wait_events(
            capture_server,
            lambda e, label=label: (
                e["event"] == "$exception"
                and props(e).get("celery_task_name") == "e2e.fail"
                and label in str(props(e).get("$exception_message"))
            ),
            1,
        )
        assert [capture_server.api_key_of(e) for e in reports + failures] == [key, key], which


def test_install_with_an_api_key_keeps_the_before_send_of_init_for_the_same_project(
    redis_broker: Broker,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    capture_server: CaptureServer,
) -> None:
    # The worker runs task_scopes.init(key, host, before_send=<drops "email">), then
    # install(app) with the same key and host in app.conf.
    start_worker(redis_broker, settings={worker_app.INIT_SCRUBBER: True})
    app = make_producer(redis_broker)
    label = f"scrub-{uuid.uuid4().hex[:8]}"
    app.send_task("e2e.capture_props", args=[label, {"email": "a@example.com", "plan": "pro"}])
    (event,) = wait_events(capture_server, labelled(label), 1)
    assert props(event)["plan"] == "pro"
    assert "email" not in props(event)
    assert capture_server.api_key_of(event) == API_KEY
