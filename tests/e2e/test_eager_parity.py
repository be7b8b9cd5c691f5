"""An eager run is a worker run: each case runs through a real prefork worker on Redis and
eagerly in this process, with the same settings on both sides, and the two event lists
must be equal.

What :func:`normalise` lets differ, and why: event UUIDs and timestamps; the value of
``celery_queue_latency_ms`` (every event of a run must carry it, unless the test says
there is no header) and of ``celery_duration_ms`` (measurements); ``celery_task_id`` (two
runs), ``celery_hostname`` (the worker's node name, this machine's host name eagerly),
``pid`` and ``thread`` (what the test task reports of its process); the stack frames of
Celery's own code (an exception propagating out of ``apply()`` passed through more of
them; the task's frames are compared); the module name of the test tasks' code (the
worker imports it as ``tests.e2e.worker_app``, this process as ``e2e.worker_app``: one
file); and ``celery_queue`` unless both runs are routed explicitly (an eager run goes
through no queue).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery

import task_scopes
from task_scopes.testing import CaptureServer

from .harness import (
    Broker,
    Event,
    MakeProducer,
    StartWorker,
    Worker,
    producer_context,
    props,
    wait_events,
)
from .worker_app import ROUTED

pytestmark = [pytest.mark.slow, pytest.mark.broker]

BY_NATURE = {"celery_task_id", "celery_hostname", "pid", "thread"}
LATENCY = "celery_queue_latency_ms"
Call = Callable[[Celery, str], Any]


def normalise(event: Event, *, latency: bool = True, queue: bool = False) -> dict[str, Any]:
    """``event`` without what may differ between a worker run and an eager run (see the
    module docstring). Fails when ``latency`` and the event has no valid latency."""
    p = dict(props(event))
    for key in BY_NATURE:
        p.pop(key, None)
    if not queue:
        p.pop("celery_queue", None)
    if latency:
        value = p.pop(LATENCY)
        assert isinstance(value, int) and value >= 0, value
    else:
        assert LATENCY not in p
    if "celery_duration_ms" in p:
        assert p["celery_duration_ms"] >= 0
        p["celery_duration_ms"] = "measured"
    for entry in p.get("$exception_list", ()):
        entry["module"] = entry["module"].removeprefix("tests.")
        frames = entry["stacktrace"]["frames"]
        entry["stacktrace"]["frames"] = [
            {**frame, "module": frame["module"].removeprefix("tests.")}
            for frame in frames
            if frame["in_app"]
        ]
    personless = p.get("$process_person_profile") is False
    return {
        "event": event["event"],
        "distinct_id": "personless" if personless else event["distinct_id"],
        "properties": p,
    }


def of_task(events: list[Event], task_id: str) -> list[Event]:
    """The events of one task's runs, retries ordered by attempt (they may come from
    different pool processes), in arrival order within an attempt."""
    mine = [e for e in events if props(e).get("celery_task_id") == task_id]
    return sorted(mine, key=lambda e: props(e).get("celery_retry_count", 0))


@dataclass
class Case:
    worker_id: str
    eager_id: str
    raised: BaseException | None
    worker_events: list[Event] = field(default_factory=list)
    eager_events: list[Event] = field(default_factory=list)

    def pair(self, **options: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The normalised worker and eager events (options of :func:`normalise`)."""
        return (
            [normalise(e, **options) for e in self.worker_events],
            [normalise(e, **options) for e in self.eager_events],
        )


@dataclass
class Parity:
    """Runs each case once through the worker and once eagerly, from the same context."""

    server: CaptureServer
    worker: Worker
    app: Celery
    cases: list[Case] = field(default_factory=list)

    def run(
        self,
        call: Call,
        context: Callable[[], AbstractContextManager[Any]],
        *,
        propagates: bool = False,
        raises: type[BaseException] | None = None,
    ) -> Case:
        """``call(app, task_id)`` once published to the worker, once eagerly (with
        ``task_eager_propagates=propagates``; ``raises``: the exception it must raise)."""
        worker_id, eager_id = str(uuid.uuid4()), str(uuid.uuid4())
        with context():
            call(self.app, worker_id)
        conf = self.app.conf
        conf.task_always_eager, conf.task_eager_propagates = True, propagates
        raised: BaseException | None = None
        try:
            with context():
                if raises is None:
                    call(self.app, eager_id)
                else:
                    with pytest.raises(raises) as info:
                        call(self.app, eager_id)
                    raised = info.value
        finally:
            conf.task_always_eager, conf.task_eager_propagates = False, False
        case = Case(worker_id, eager_id, raised)
        self.cases.append(case)
        return case

    def collect(self) -> None:
        """Wait for the worker's events (as many as the eager runs gave), stop the worker
        warm (every process flushes, so a surplus event would have arrived), fill in the
        cases."""
        assert task_scopes.flush(30) == 0
        for case in self.cases:
            case.eager_events = of_task(self.server.events, case.eager_id)
            assert case.eager_events, "the eager run captured nothing"
            wait_events(
                self.server,
                lambda e, task_id=case.worker_id: props(e).get("celery_task_id") == task_id,
                len(case.eager_events),
                worker=self.worker,
                what=f"events of task {case.worker_id}",
            )
        assert self.worker.stop() == 0
        for case in self.cases:
            case.worker_events = of_task(self.server.events, case.worker_id)


@pytest.fixture
def parity(
    redis_broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
) -> Iterator[Callable[..., Parity]]:
    """``parity(**settings)``: a prefork worker and a producer with the same settings."""

    def make(**settings: Any) -> Parity:
        worker = start_worker(redis_broker, settings=settings)
        app = make_producer(redis_broker, settings=settings)
        return Parity(capture_server, worker, app)

    yield make


def user(run_id: str, **tags: Any) -> Callable[[], AbstractContextManager[Any]]:
    return lambda: producer_context(f"user-{run_id}", f"session-{run_id}", tags)


def task(name: str, *args: Any, **options: Any) -> Call:
    return lambda app, task_id: app.tasks[name].apply_async(args, task_id=task_id, **options)


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


# -- 1 and 6: failures, also when the exception propagates out of apply() ---------------------


def test_failures_give_the_workers_events_also_when_eager_propagates(
    parity: Callable[..., Parity], run_id: str
) -> None:
    p = parity(task_scopes_task_events=True)
    context = user(run_id, plan="pro")
    cases = {
        (name, propagates): p.run(
            task(f"e2e.{name}", f"{run_id}-{name}"),
            context,
            propagates=propagates,
            raises=error if propagates else None,
        )
        for name, error in (("fail", ValueError), ("unpicklable", Exception))
        for propagates in (False, True)
    }
    p.collect()

    for (name, propagates), case in cases.items():
        on_worker, eager = case.pair()
        assert eager == on_worker, (name, propagates)
        assert names(on_worker) == [
            "celery task started",
            "e2e.before_raise",
            "$exception",
            "celery task failure",
        ]
        failure = on_worker[2]
        assert failure["distinct_id"] == f"user-{run_id}"
        assert failure["properties"]["plan"] == "pro"
        assert failure["properties"]["celery_task_name"] == f"e2e.{name}"
        if propagates:  # the task's own exception, unchanged
            assert case.raised is not None
            assert str(case.raised) == failure["properties"]["$exception_message"]
            assert type(case.raised).__name__ == failure["properties"]["$exception_type"]

    # 6: the unpicklable exception under its own type, module and message
    [entry] = cases[("unpicklable", False)].pair()[0][2]["properties"]["$exception_list"]
    assert (entry["type"], entry["module"], entry["value"]) == (
        "HoldsALock",
        "e2e.worker_app",
        f"lock held: {run_id}-unpicklable",
    )
    assert "unpicklable" in {frame["function"] for frame in entry["stacktrace"]["frames"]}


# -- 2: propagate=False ---------------------------------------------------------------------


def test_propagate_false_gives_personless_events_both_ways(
    parity: Callable[..., Parity], run_id: str
) -> None:
    p = parity(task_scopes_propagate=False)
    case = p.run(task("e2e.report", f"{run_id}-personless"), user(run_id, plan="pro"))
    p.collect()

    on_worker, eager = case.pair(latency=False)  # no header, so no publish time either
    assert eager == on_worker
    [event] = on_worker
    assert event["distinct_id"] == "personless"
    assert "plan" not in event["properties"]
    assert "$session_id" not in event["properties"]


# -- 3: the caps, with a secret ---------------------------------------------------------------


def test_caps_and_signing_apply_to_eager_runs_as_to_published_ones(
    parity: Callable[..., Parity], run_id: str
) -> None:
    p = parity(task_scopes_secret=f"secret-{run_id}")
    tags: dict[str, Any] = {f"tag_{i:02d}": i for i in range(70)}
    tags["long_note"] = "n" * 1500
    case = p.run(task("e2e.report", f"{run_id}-caps"), user(run_id, **tags))
    p.collect()

    on_worker, eager = case.pair()
    assert eager == on_worker
    [event] = on_worker
    carried = {key for key in event["properties"] if key.startswith(("tag_", "long_"))}
    assert "long_note" not in carried
    assert len(carried) == 64
    assert event["distinct_id"] == f"user-{run_id}"  # signed, verified, restored


# -- 4 and 8: lifecycle events say what happened; every event has the time in queue ----------


def test_retries_and_the_final_failure_report_their_exceptions_both_ways(
    parity: Callable[..., Parity], run_id: str
) -> None:
    p = parity(task_scopes_task_events=True)
    case = p.run(task("e2e.autoretry_fail", f"{run_id}-autoretry"), user(run_id))
    p.collect()

    on_worker, eager = case.pair()
    assert eager == on_worker
    assert names(on_worker) == [
        *["celery task started", "e2e.report", "celery task retry"] * 2,
        "celery task started",
        "e2e.report",
        "$exception",
        "celery task failure",
    ]
    message = f"always failing: {run_id}-autoretry"
    reported = [
        (
            e["event"],
            e["properties"]["celery_exception"],
            e["properties"]["celery_exception_message"],
        )
        for e in on_worker
        if e["event"] in {"celery task retry", "celery task failure"}
    ]
    assert reported == [
        ("celery task retry", "ValueError", message),
        ("celery task retry", "ValueError", message),
        ("celery task failure", "ValueError", message),
    ]
    # every event of the runs, $exception included, had a latency (normalise checked it)
    assert len(case.worker_events) == len(on_worker) == 10


# -- 5: celery_queue only when the routing names the queue ------------------------------------


def test_celery_queue_only_when_the_routing_names_the_queue_both_ways(
    parity: Callable[..., Parity], run_id: str, redis_broker: Broker
) -> None:
    p = parity(**{ROUTED: True})
    direct = p.run(
        task("e2e.report", f"{run_id}-direct", exchange="e2e_direct", routing_key="e2e.routed"),
        user(run_id),
    )
    topic = p.run(
        task(
            "e2e.report",
            f"{run_id}-topic",
            exchange="e2e_topic",
            routing_key="e2e.events.created",
        ),
        user(run_id),
    )
    p.collect()

    for case, queue in ((direct, redis_broker.queue), (topic, None)):
        on_worker, eager = case.pair(queue=True)
        assert eager == on_worker
        [event] = on_worker
        assert event["properties"].get("celery_queue") == queue
        assert event["properties"]["label"].endswith("direct" if queue else "topic")


# -- 9: groups ----------------------------------------------------------------------------------


def test_groups_travel_to_the_task_and_its_exception_both_ways(
    parity: Callable[..., Parity], run_id: str
) -> None:
    @contextmanager
    def with_groups() -> Iterator[None]:
        with producer_context(f"user-{run_id}"):
            task_scopes.set_context_groups({"company": "acme"})
            yield

    p = parity()
    case = p.run(task("e2e.fail_with_groups", f"{run_id}-groups"), with_groups)
    p.collect()

    on_worker, eager = case.pair()
    assert eager == on_worker
    assert [(e["event"], e["properties"]["$groups"]) for e in on_worker] == [
        ("e2e.report", {"company": "acme", "project": "p1"}),
        ("$exception", {"company": "acme"}),
    ]
    assert all(e["distinct_id"] == f"user-{run_id}" for e in on_worker)
