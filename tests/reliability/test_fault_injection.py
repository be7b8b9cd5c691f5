"""Faults inside task_scopes while real tasks run: tasks succeed, each fault is logged once
per interval.

Tasks run in a solo worker in a thread of this process (``memory://`` broker), with the
plugin installed and the default client pointed at the faulty part. The guard swallows, as
in production (:func:`support.swallowing`); the suite's fixture otherwise makes it raise.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from celery import Celery

import task_scopes
import task_scopes.celery
from task_scopes import Client
from task_scopes._internal import RateLimitedLog
from task_scopes.celery import _memo, _signals
from task_scopes.testing import CaptureServer, InMemoryTransport

from .support import Records, default_client, memory_app, running, swallowing

TASKS = 12
USER = "user-under-fault"


class Worker:
    """The app, its task and helpers to run tasks and wait for their results."""

    def __init__(self, app: Celery, task: Any) -> None:
        self.app, self.task = app, task

    def run(
        self, count: int = TASKS, headers: dict[str, Any] | None = None, user: str | None = USER
    ) -> list[dict[str, Any]]:
        """Publish ``count`` tasks (from a context for ``user``, if given) and return their
        results; fails if any task did not succeed."""
        with task_scopes.new_context(fresh=True):
            if user is not None:
                task_scopes.identify_context(user)
            pending = [self.task.apply_async((n,), headers=headers) for n in range(count)]
        results = []
        for result in pending:
            value = result.get(timeout=20, interval=0.005)
            assert result.successful(), result.traceback
            results.append(value)
        return results


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    app = memory_app("faults")

    @app.task(name="faults.work", bind=True, shared=False)
    def work(self: Any, n: int) -> dict[str, Any]:
        uid = task_scopes.capture("fault task", properties={"n": n})
        return {"n": n, "uuid": uid, "distinct_id": task_scopes.get_context_distinct_id()}

    task_scopes.celery.install(app)
    with running(app):
        yield Worker(app, work)
    task_scopes.celery.uninstall(app)


@pytest.fixture
def records() -> Iterator[Records]:
    with swallowing(), Records().on("task_scopes") as found:
        yield found


def _own_results(results: Sequence[dict[str, Any]], count: int = TASKS) -> None:
    assert [r["n"] for r in results] == list(range(count))


# -- the transport raising ------------------------------------------------------------------


class RaisingTransport:
    """Raises on ``send`` while ``failing``; afterwards keeps what it is sent."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0
        self.events: list[dict[str, Any]] = []

    def send(self, batch: Sequence[str]) -> int:
        self.calls += 1
        if self.failing:
            raise RuntimeError("transport broken")
        self.events.extend(json.loads(item) for item in batch)
        return 0

    def close(self) -> None:
        pass


def _one_batch_per_task(worker: Worker, client: Client) -> list[dict[str, Any]]:
    results = []
    for n in range(TASKS):  # a flush after each task: one failing send per task
        with task_scopes.new_context(fresh=True):
            task_scopes.identify_context(USER)
            result = worker.task.apply_async((n,))
        results.append(result.get(timeout=20, interval=0.005))
        assert result.successful(), result.traceback
        client.flush(timeout=5)
    return results


def test_transport_raising_every_task_succeeds_and_the_consumer_survives(
    worker: Worker, records: Records
) -> None:
    transport = RaisingTransport()
    with default_client(Client(transport=transport, flush_interval=0.05)) as client:
        _own_results(_one_batch_per_task(worker, client))
        assert transport.calls >= 2, "the faulty transport was not exercised"
        failed = client.stats().failed
        assert failed == TASKS  # counted as given up, not silently dropped

        transport.failing = False
        _own_results(worker.run(3), 3)
        assert client.flush(timeout=5) == 0
        assert [e["properties"]["n"] for e in transport.events] == [0, 1, 2]
        assert client.stats().delivered == 3


def test_transport_raising_is_logged_once_per_interval(worker: Worker, records: Records) -> None:
    transport = RaisingTransport()
    with default_client(Client(transport=transport, flush_interval=0.05)) as client:
        _one_batch_per_task(worker, client)
    assert transport.calls >= 2
    logged = records.containing("transport broken") + records.containing("in consumer")
    assert len(logged) == 1, [r.getMessage() for r in logged]


# -- the encoder raising --------------------------------------------------------------------


def _broken_encode(*_: Any, **__: Any) -> Any:
    raise RuntimeError("encoder broken")


def test_encoder_raising_every_task_is_published_and_succeeds(
    worker: Worker, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_memo, "encode", _broken_encode)
    monkeypatch.setattr(_memo, "_encoded", {})  # nothing memoized from earlier tests
    with default_client(Client(transport=InMemoryTransport(), flush_interval=0.05)) as client:
        results = worker.run()
        _own_results(results)
        # Published without the context it could not encode: the task ran with none.
        assert {r["distinct_id"] for r in results} == {None}
        assert client.flush(timeout=5) == 0
        assert client.stats().delivered == TASKS
    assert records.containing("before_task_publish"), "the fault was not logged at all"


def test_encoder_raising_is_logged_once_per_interval(
    worker: Worker, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_memo, "encode", _broken_encode)
    monkeypatch.setattr(_memo, "_encoded", {})  # nothing memoized from earlier tests
    with default_client(Client(transport=InMemoryTransport(), flush_interval=0.05)):
        worker.run()
    logged = records.containing("before_task_publish")
    assert len(logged) == 1, f"{len(logged)} lines for {TASKS} publishes"


# -- the collector refusing, the queue overflowing: rate-limited paths ------------------------


def test_collector_rejecting_batches_is_logged_once_per_interval(
    worker: Worker, records: Records
) -> None:
    with CaptureServer() as server:
        server.script(*[400] * TASKS)
        client = Client("phc_faults", server.url, flush_interval=0.05)
        with default_client(client):
            _own_results(_one_batch_per_task(worker, client))
        rejected = [r for r in server.requests if r[1] == 400]
        assert len(rejected) >= 2, "the collector's refusal was not exercised"
    logged = records.containing("collector answered 400")
    assert len(logged) == 1, [r.getMessage() for r in logged]


class BlockedTransport:
    """Holds the consumer in ``send`` until released, so the queue fills up."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.sent = 0

    def send(self, batch: Sequence[str]) -> int:
        self.entered.set()
        self.release.wait(30)
        self.sent += len(batch)
        return 0

    def close(self) -> None:
        pass


def test_full_queue_drops_new_events_logged_once_per_interval(
    worker: Worker, records: Records
) -> None:
    transport = BlockedTransport()
    client = Client(transport=transport, flush_interval=0.05, flush_at=1, max_queue_size=3)
    with default_client(client):
        first = worker.run(1)
        assert transport.entered.wait(10), "the consumer never reached the transport"
        _own_results(worker.run(), TASKS)  # the queue holds 3 of these, the rest are dropped
        transport.release.set()
        assert client.flush(timeout=10) == 0
        stats = client.stats()
    assert first[0]["uuid"] is not None
    assert stats.dropped == TASKS - 3
    assert transport.sent == 1 + 3
    logged = records.containing("queue full")
    assert len(logged) == 1, [r.getMessage() for r in logged]


# -- the clock jumping ----------------------------------------------------------------------


class JumpingClock:
    """``time.monotonic`` plus an offset that the test moves (seconds; may be negative).

    ``wild=True``: every call from a thread other than the test's own adds another jump,
    alternating an hour forward and an hour back, so the consumer, the transport and
    the rate-limited logs see a clock that jumps between two readings.
    """

    def __init__(self, real: Any, *, wild: bool = False) -> None:
        self.real = real
        self.offset = 0.0
        self.wild = wild
        self.calls = 0
        self._main = threading.main_thread()

    def __call__(self) -> float:
        if self.wild and threading.current_thread() is not self._main:
            self.calls += 1
            return float(self.real() + self.offset + (3600.0 if self.calls % 2 else -3600.0))
        return float(self.real() + self.offset)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> JumpingClock:
    jumping = JumpingClock(time.monotonic)
    monkeypatch.setattr(time, "monotonic", jumping)
    return jumping


def test_clock_jumping_inside_consumer_and_transport_loses_nothing(
    worker: Worker, records: Records, clock: JumpingClock
) -> None:
    clock.wild = True
    with CaptureServer() as server:
        client = Client("phc_faults", server.url, flush_interval=0.05)
        with default_client(client):
            results = []
            for _ in range(3):
                results += worker.run()
                clock.offset += 7200.0
            clock.offset = -7200.0
            results += worker.run()
            assert client.flush(timeout=10) == 0
        received = server.wait_for(len(results), timeout=10)
    assert clock.calls > 0, "no other thread read the jumping clock"
    assert {r["distinct_id"] for r in results} == {USER}
    assert {e["uuid"] for e in received} == {r["uuid"] for r in results}
    assert client.stats().failed == 0
    assert not records.containing("internal error"), [r.getMessage() for r in records.records]


def test_clock_jumping_bad_header_warning_once_per_interval(
    worker: Worker, records: Records, clock: JumpingClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_signals, "_bad_header_log", RateLimitedLog(60.0))
    bad = {"task_scopes": "{not json"}
    warnings = []
    with default_client(Client(transport=InMemoryTransport(), flush_interval=0.05)):
        for jump in (0.0, 61.0, -3600.0, 3600.0 + 61.0, 0.0):
            clock.offset += jump
            results = worker.run(5, headers=bad, user=None)
            assert {r["distinct_id"] for r in results} == {None}
            warnings.append(len(records.containing("ignored the context header")))
    # once per 60 s of the (jumped) clock; a jump back is not a new interval
    assert warnings == [1, 2, 2, 3, 3]
    suppressed = records.containing("similar messages suppressed")
    assert suppressed and all(r.levelno == logging.WARNING for r in suppressed)
