"""The producer's context reaches the task: delay, eager, canvas, threads, PostHog headers."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from celery import chain, chord, group

import task_scopes
from task_scopes.testing import CaptureServer

from .harness import (
    EVENT_TIMEOUT,
    Broker,
    Event,
    MakeProducer,
    StartWorker,
    labelled,
    producer_context,
    props,
    wait_events,
)

pytestmark = [pytest.mark.slow, pytest.mark.broker]

SIGNED_UP = datetime(2024, 5, 17, 12, 30, 5, tzinfo=timezone.utc)
PRODUCER_TAGS = {"plan": "pro", "order_count": 3, "signed_up_at": SIGNED_UP}
EXPECTED_TAGS = {"plan": "pro", "order_count": 3, "signed_up_at": "2024-05-17T12:30:05+00:00"}
TASK_TAGS = (
    "celery_task_id",
    "celery_task_name",
    "celery_queue",
    "celery_retry_count",
    "celery_hostname",
)


def test_delay_carries_distinct_id_session_and_tags_into_the_task(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker)
    app = make_producer(broker)
    label = f"{run_id}-delay"

    with producer_context("user-1", "sess-1", PRODUCER_TAGS):
        result = app.tasks["e2e.report"].delay(label)

    [event] = wait_events(capture_server, labelled(label), 1, worker=worker)
    p = props(event)
    assert event["distinct_id"] == "user-1"
    assert p["$session_id"] == "sess-1"
    assert {key: p.get(key) for key in EXPECTED_TAGS} == EXPECTED_TAGS
    assert "$process_person_profile" not in p
    assert p["celery_task_id"] == result.id
    assert p["celery_task_name"] == "e2e.report"
    assert p["celery_queue"] == broker.queue
    assert p["celery_retry_count"] == 0
    assert p["celery_hostname"] == worker.hostname


# Differ between a worker run and an eager run by nature, not by instrumentation.
VOLATILE = {
    "celery_task_id",
    "celery_hostname",
    "celery_queue",
    "celery_queue_latency_ms",
    "label",
    "pid",
    "thread",
}


def _comparable(event: Event) -> dict[str, Any]:
    return {k: v for k, v in props(event).items() if k not in VOLATILE}


def test_eager_run_gives_the_same_event_and_leaves_the_callers_context_unchanged(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker)
    app = make_producer(broker)
    report = app.tasks["e2e.report"]
    worker_label, eager_label = f"{run_id}-worker", f"{run_id}-eager"

    with producer_context("user-1", "sess-1", PRODUCER_TAGS):
        report.delay(worker_label, mutate=True)
        before = (
            task_scopes.get_context_distinct_id(),
            task_scopes.get_context_session_id(),
            task_scopes.get_tags(),
        )
        app.conf.task_always_eager = True
        try:
            eager = report.delay(eager_label, mutate=True)
        finally:
            app.conf.task_always_eager = False
        after = (
            task_scopes.get_context_distinct_id(),
            task_scopes.get_context_session_id(),
            task_scopes.get_tags(),
        )
        task_scopes.capture("e2e.after_eager", properties={"label": eager_label})

    # The task did change its own context (so "unchanged" below is not vacuous)...
    seen_by_task = eager.get(timeout=10)
    assert seen_by_task["distinct_id"] == "task-user"
    assert seen_by_task["session_id"] == "task-session"
    assert "mutated_by_task" in seen_by_task["tags"]
    # ...and none of it leaked back to the caller.
    assert after == before
    assert before[0] == "user-1" and before[1] == "sess-1"

    [on_worker] = wait_events(capture_server, labelled(worker_label), 1, worker=worker)
    [in_eager] = wait_events(capture_server, labelled(eager_label), 1)
    [caller_after] = wait_events(capture_server, labelled(eager_label, "e2e.after_eager"), 1)

    assert in_eager["distinct_id"] == on_worker["distinct_id"] == "user-1"
    assert _comparable(in_eager) == _comparable(on_worker)
    assert props(in_eager)["celery_task_id"] == eager.id
    assert {key: props(in_eager).get(key) for key in EXPECTED_TAGS} == EXPECTED_TAGS
    for key in ("celery_task_id", "celery_task_name", "celery_retry_count"):
        assert key in props(in_eager), key

    assert caller_after["distinct_id"] == "user-1"
    assert props(caller_after)["$session_id"] == "sess-1"
    assert "mutated_by_task" not in props(caller_after)
    assert not any(key in props(caller_after) for key in TASK_TAGS)


def test_canvas_steps_and_callbacks_carry_the_producers_distinct_id(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker)
    app = make_producer(broker, backend=True)  # chords need a result backend
    t = app.tasks
    user = f"canvas-{run_id}"

    def lbl(name: str) -> str:
        return f"{run_id}-{name}"

    with producer_context(user, tags={"flow": "canvas"}):
        results = [
            chain(
                t["e2e.step"].s(label=lbl("chain-a")), t["e2e.step"].s(label=lbl("chain-b"))
            ).delay(),
            group(t["e2e.report"].s(lbl("group-1")), t["e2e.report"].s(lbl("group-2"))).delay(),
            chord(
                [t["e2e.report"].s(lbl("chord-h1")), t["e2e.report"].s(lbl("chord-h2"))],
                t["e2e.collect"].s(label=lbl("chord-body")),
            ).delay(),
            t["e2e.report"].apply_async(
                (lbl("link-parent"),), link=t["e2e.on_success"].s(label=lbl("link-callback"))
            ),
            t["e2e.fail"].apply_async(
                (lbl("failing-parent"),),
                link_error=[
                    t["e2e.on_error_published"].s(label=lbl("errback-published")),
                    t["e2e.on_error_inline"].s(label=lbl("errback-inline")),
                ],
            ),
        ]
    # Every task finished (the chord body only after both header tasks stored theirs).
    # Waiting here also ends each result's subscription to the Redis backend.
    for result in results:
        result.get(timeout=EVENT_TIMEOUT, propagate=False)

    names = [
        "chain-a",
        "chain-b",
        "group-1",
        "group-2",
        "chord-h1",
        "chord-h2",
        "chord-body",
        "link-parent",
        "link-callback",
        "errback-published",
        "errback-inline",
    ]
    seen: dict[str, Event] = {}
    for name in names:
        [seen[name]] = wait_events(capture_server, labelled(lbl(name)), 1, worker=worker, what=name)
    [seen["failing-parent"]] = wait_events(
        capture_server, labelled(lbl("failing-parent"), "e2e.before_raise"), 1, worker=worker
    )

    wrong = {
        name: (e["distinct_id"], props(e).get("flow"))
        for name, e in seen.items()
        if e["distinct_id"] != user or props(e).get("flow") != "canvas"
    }
    assert wrong == {}, f"tasks that lost the producer's context: {wrong}"
    # The canvas really ran as intended (so the check above covers what it claims).
    assert props(seen["chain-b"])["prev"] == lbl("chain-a")
    assert props(seen["chord-body"])["results"] == 2
    assert props(seen["link-callback"])["celery_task_name"] == "e2e.on_success"
    assert props(seen["errback-published"])["celery_task_name"] == "e2e.on_error_published"


def test_threads_pool_tasks_never_see_another_producers_context(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker, pool="threads", concurrency=4)
    app = make_producer(broker)
    producers = [f"{run_id}-producer{i}" for i in range(3)]
    expected: dict[str, tuple[str, int]] = {}
    for n in range(20):
        for producer in producers:
            label = f"{producer}-{n}"
            expected[label] = (producer, n)
            with producer_context(producer, f"{producer}-session", {"producer": producer, "n": n}):
                app.tasks["e2e.interleave"].delay(label)

    def ours(name: str) -> Any:
        return lambda e: e["event"] == name and props(e).get("label") in expected

    starts = wait_events(capture_server, ours("e2e.start"), 60, worker=worker, what="starts")
    ends = wait_events(capture_server, ours("e2e.end"), 60, worker=worker, what="ends")

    mismatches = []
    for event in starts + ends:
        p = props(event)
        producer, n = expected[p["label"]]
        seen = (event["distinct_id"], p.get("$session_id"), p.get("producer"), p.get("n"))
        if seen != (producer, f"{producer}-session", producer, n):
            mismatches.append((event["event"], p["label"], seen))
        if event["event"] == "e2e.end" and p.get("seen_label") != p["label"]:
            mismatches.append(("seen_label", p["label"], p.get("seen_label")))
        if event["event"] == "e2e.start" and "seen_label" in p:
            mismatches.append(("seen_label before tagging", p["label"], p["seen_label"]))
    assert mismatches == []
    # The tasks did run side by side in several threads, so isolation was put to the test.
    assert len({props(e)["thread"] for e in starts}) >= 2
    assert _max_overlap(starts, ends) >= 2


def _max_overlap(starts: list[Event], ends: list[Event]) -> int:
    """How many tasks were between their start and end events at the same time."""
    edges = [(e["timestamp"], 1) for e in starts] + [(e["timestamp"], -1) for e in ends]
    running = best = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        running += step
        best = max(best, running)
    return best


POSTHOG_TAGS = {"plan": "team", "seats": 5}


def test_posthog_headers_from_a_plain_producer_are_restored(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker)
    plain = make_producer(broker, plugin=False)
    label = f"{run_id}-posthog-headers"
    plain.tasks["e2e.report"].apply_async(
        (label,),
        headers={
            "X-POSTHOG-DISTINCT-ID": f"ph-{run_id}",
            "X-POSTHOG-SESSION-ID": "ph-session",
            # PostHog's integration writes json.dumps(tags, default=str).
            "X-POSTHOG-CONTEXT-TAGS": json.dumps(POSTHOG_TAGS, default=str),
        },
    )
    [event] = wait_events(capture_server, labelled(label), 1, worker=worker)
    assert event["distinct_id"] == f"ph-{run_id}"
    assert props(event)["$session_id"] == "ph-session"
    assert {key: props(event).get(key) for key in POSTHOG_TAGS} == POSTHOG_TAGS
    assert props(event)["celery_task_name"] == "e2e.report"


def test_context_published_by_posthogs_own_celery_integration_is_restored(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    from posthog import contexts
    from posthog.integrations.celery import PosthogCeleryIntegration

    worker = start_worker(broker)
    plain = make_producer(broker, plugin=False)
    label = f"{run_id}-posthog-integration"
    integration = PosthogCeleryIntegration(
        capture_exceptions=False, capture_task_lifecycle_events=False, propagate_context=True
    )
    integration.instrument()
    try:
        with contexts.new_context(fresh=True, capture_exceptions=False):
            contexts.identify_context(f"ph-{run_id}")
            contexts.set_context_session("ph-session")
            for key, value in POSTHOG_TAGS.items():
                contexts.tag(key, value)
            plain.tasks["e2e.report"].delay(label)
    finally:
        integration.uninstrument()
    [event] = wait_events(capture_server, labelled(label), 1, worker=worker)
    assert event["distinct_id"] == f"ph-{run_id}"
    assert props(event)["$session_id"] == "ph-session"
    assert {key: props(event).get(key) for key in POSTHOG_TAGS} == POSTHOG_TAGS
