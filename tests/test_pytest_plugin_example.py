"""A user's test of their own code with the ``captured_events`` fixture (the README's example).

The fixture comes with the package through the pytest entry point ``task_scopes``: installing
task_scopes is enough, nothing to import or register.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

import task_scopes
import task_scopes.celery
from task_scopes.testing import CapturedEvents

# -- the code under test (in a real project: imported from the project) ------------------

# set_as_current=False and shared=False keep this module's app out of other tests.
app = Celery("shop", broker="memory://", backend="cache+memory://", set_as_current=False)
app.conf.task_always_eager = True
app.conf.task_default_queue = "shop-example"


@app.task(name="shop.send_receipt", shared=False)
def send_receipt(order_id: str) -> None:
    task_scopes.capture("receipt sent", properties={"order_id": order_id})


def checkout(user_id: str, order_id: str) -> object:
    with task_scopes.new_context():
        task_scopes.identify_context(user_id)
        task_scopes.tag("plan", "pro")
        task_scopes.capture("order placed", properties={"order_id": order_id})
        return send_receipt.delay(order_id)


# -- the tests ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def instrumented_app() -> Iterator[None]:
    # A project installs the plugin where it defines its app; a test suite that also
    # installs and uninstalls other apps is safer doing it per test.
    task_scopes.celery.install(app)
    yield
    task_scopes.celery.uninstall(app)


def test_checkout_and_its_task_are_attributed_to_the_user(
    captured_events: CapturedEvents,
) -> None:
    checkout("user-42", "o-1")

    events = captured_events.events
    assert [(e["event"], e["distinct_id"]) for e in events] == [
        ("order placed", "user-42"),
        ("receipt sent", "user-42"),
    ]
    assert {e["properties"]["plan"] for e in events} == {"pro"}
    receipt = captured_events.named("receipt sent")[0]
    assert receipt["properties"]["celery_task_name"] == "shop.send_receipt"


def test_task_run_by_an_in_thread_worker_is_attributed_too(
    captured_events: CapturedEvents,
) -> None:
    # The same code, but the task travels through the broker to a worker thread: the
    # context goes in the message header and is restored there.
    app.conf.task_always_eager = False
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            result = checkout("user-42", "o-2")
            result.get(timeout=10)  # type: ignore[attr-defined]
    finally:
        app.conf.task_always_eager = True

    (receipt,) = captured_events.named("receipt sent")
    assert receipt["distinct_id"] == "user-42"
    assert receipt["properties"]["plan"] == "pro"
    assert receipt["properties"]["celery_queue"] == "shop-example"


def test_captured_events_is_provided_by_the_installed_entry_point(
    pytestconfig: pytest.Config,
) -> None:
    assert pytestconfig.pluginmanager.has_plugin("task_scopes")


def test_captured_events_starts_empty_and_clears(captured_events: CapturedEvents) -> None:
    assert captured_events.events == []
    task_scopes.capture("something")
    assert [e["event"] for e in captured_events.events] == ["something"]
    captured_events.clear()
    assert captured_events.events == []
