"""The end-to-end tests' side of the harness: brokers, producers, and event waits.

The worker subprocess itself is :class:`tests.harness.worker.Worker`, shared with the
benchmarks; :func:`e2e_worker` points it at :mod:`tests.e2e.worker_app`. Everything here
synchronises on something observable (a log line, an event, a counter, a process exit)
with a deadline; nothing sleeps in place of waiting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import task_scopes
from task_scopes.testing import CaptureServer
from tests.harness import rabbitmq
from tests.harness.worker import INTERNAL_ERROR, READY_TIMEOUT, ROOT, STOP_TIMEOUT, Worker

from . import worker_app

__all__ = [
    "API_KEY", "EVENT_TIMEOUT", "INTERNAL_ERROR", "READY_TIMEOUT", "ROOT", "STOP_TIMEOUT",
    "Broker", "Event", "MakeProducer", "Predicate", "StartWorker", "Worker", "e2e_worker",
    "exception_type", "exceptions", "labelled", "producer_context", "props", "wait_events",
    "wait_for_value", "worker_settings",
]  # fmt: skip

API_KEY = "phc_test"
EVENT_TIMEOUT = 60.0  # generous: the machine is small and shared

Event = dict[str, Any]
Predicate = Callable[[Event], bool]
# The factories the conftest fixtures ``start_worker`` and ``make_producer`` yield.
StartWorker = Callable[..., Worker]
MakeProducer = Callable[..., Celery]


@dataclass(frozen=True)
class Broker:
    """Where a test's messages go.

    ``kind`` is ``"redis"`` or ``"amqp"``; ``queue`` is used by this test only;
    ``redis_url`` is a Redis database of the test's own, used as result backend (chords)
    and for counters, whatever the broker.
    """

    kind: str
    url: str
    queue: str
    redis_url: str

    def celery_settings(self) -> dict[str, str]:
        """``app.conf`` keys every worker and producer of the test share: the control and
        event exchanges named after the queue, so the test can delete them after."""
        return rabbitmq.celery_settings(self.queue)


def worker_settings(server: CaptureServer, **overrides: Any) -> dict[str, Any]:
    """``app.conf`` keys for a worker that sends its events to ``server``."""
    settings: dict[str, Any] = {
        "task_scopes_api_key": API_KEY,
        "task_scopes_host": server.url,
        "task_scopes_flush_interval": 0.2,
    }
    settings.update(overrides)
    return settings


def e2e_worker(
    broker: Broker,
    settings: dict[str, Any],
    log_path: Path,
    *,
    name: str,
    pool: str = "prefork",
    concurrency: int = 2,
    extra_args: Sequence[str] = (),
    plugin: bool = True,
) -> Worker:
    """A (not yet started) worker running :mod:`tests.e2e.worker_app` on ``broker``, with
    ``settings`` merged into its ``app.conf`` and ``task_scopes.celery.install(app)``
    unless ``plugin`` is false."""
    env = {
        worker_app.ENV_BROKER: broker.url,
        worker_app.ENV_BACKEND: broker.redis_url,
        worker_app.ENV_QUEUE: broker.queue,
        worker_app.ENV_REDIS: broker.redis_url,
        worker_app.ENV_SETTINGS: json.dumps(settings),
        worker_app.ENV_PLUGIN: "1" if plugin else "0",
    }
    return Worker(
        "tests.e2e.worker_app",
        name=name,
        queue=broker.queue,
        log_path=log_path,
        env=env,
        pool=pool,
        concurrency=concurrency,
        extra_args=extra_args,
    )


def wait_events(
    server: CaptureServer,
    predicate: Predicate,
    count: int,
    *,
    worker: Worker | None = None,
    timeout: float = EVENT_TIMEOUT,
    what: str = "events",
) -> list[Event]:
    """Wait until ``count`` received events match ``predicate``; return the matching ones.

    Fails the test (with the worker's log) on timeout or when the worker died meanwhile.
    """

    def matching(events: list[Event]) -> list[Event]:
        return [e for e in events if predicate(e)]

    deadline = time.monotonic() + timeout
    found: list[Event] = []
    while True:
        remaining = deadline - time.monotonic()
        # Slices of a second so that a dead worker is noticed early.
        events = server.wait_until(lambda evs: len(matching(evs)) >= count, min(remaining, 1.0))
        found = matching(events)
        if len(found) >= count:
            return found
        if worker is not None and not worker.alive():
            break
        if time.monotonic() >= deadline:
            break
    log = worker.log_tail() if worker is not None else ""
    names = sorted({str(e.get("event")) for e in server.events})
    pytest.fail(
        f"{what}: {len(found)} of {count} arrived within {timeout:.0f}s "
        f"(server has {len(server.events)} events named {names})\n{log}"
    )


def labelled(label: str, event: str | None = "e2e.report") -> Predicate:
    """Events carrying ``properties.label == label`` (and named ``event`` unless None)."""

    def predicate(e: Event) -> bool:
        props = e.get("properties", {})
        return props.get("label") == label and (event is None or e.get("event") == event)

    return predicate


def exceptions(task_name: str | None = None, task_id: str | None = None) -> Predicate:
    """``$exception`` events, of one task name and/or task id when given."""

    def predicate(e: Event) -> bool:
        if e.get("event") != "$exception":
            return False
        props = e.get("properties", {})
        if task_name is not None and props.get("celery_task_name") != task_name:
            return False
        return task_id is None or props.get("celery_task_id") == task_id

    return predicate


def exception_type(event: Event) -> str | None:
    """The outermost exception type of an ``$exception`` event."""
    props = event["properties"]
    listed = props.get("$exception_list") or [{}]
    return props.get("$exception_type") or listed[0].get("type")


def wait_for_value(
    read: Callable[[], Any],
    expected: Any,
    *,
    timeout: float,
    worker: Worker | None = None,
    what: str = "value",
) -> None:
    """Poll ``read()`` (e.g. a Redis counter) until it equals ``expected``."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected:
        if worker is not None and not worker.alive():
            pytest.fail(f"worker died while waiting for {what} ({value!r})\n{worker.log_tail()}")
        if time.monotonic() >= deadline:
            tail = worker.log_tail() if worker is not None else ""
            pytest.fail(f"{what} is {value!r}, expected {expected!r} after {timeout:.0f}s\n{tail}")
        # Polling an external counter: there is nothing to block on.
        time.sleep(0.2)
        value = read()


@contextmanager
def producer_context(
    distinct_id: str,
    session_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """A fresh context of the producer (this test process), as a web request would open."""
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context(distinct_id)
        if session_id is not None:
            task_scopes.set_context_session(session_id)
        for key, value in (tags or {}).items():
            task_scopes.tag(key, value)
        yield


def props(event: Event) -> dict[str, Any]:
    """The properties of an event."""
    properties: dict[str, Any] = event["properties"]
    return properties
