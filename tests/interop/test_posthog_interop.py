"""Interop with the real ``posthog`` package through a real prefork worker on Redis.

Direction 1: a producer running PostHog's ``PosthogCeleryIntegration`` inside
``posthog.new_context()`` -> a worker running task_scopes only. Direction 2: a producer
running task_scopes with ``posthog_headers`` inside ``task_scopes.new_context()`` -> a
worker running PostHog's integration only. Both libraries send to the same loopback
collector, which must accept what PostHog's client sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import posthog
import pytest
from celery import Celery
from posthog.integrations.celery import PosthogCeleryIntegration

import task_scopes
import task_scopes.celery
from task_scopes.testing import CaptureServer

from . import ph_worker_app
from .conftest import Event, StartWorker, wait_events

pytestmark = [pytest.mark.slow, pytest.mark.broker]

TAGS = {"plan": "pro", "seats": 5, "beta": True}
POSTHOG_HEADERS = list(ph_worker_app.POSTHOG_HEADERS)


def labelled(label: str, event: str = "interop.report") -> Callable[[Event], bool]:
    def predicate(e: Event) -> bool:
        return e.get("event") == event and e.get("properties", {}).get("label") == label

    return predicate


def task_event(task_id: str, event: str) -> Callable[[Event], bool]:
    """PostHog's lifecycle events (``celery task started`` ...) of one task."""

    def predicate(e: Event) -> bool:
        return e.get("event") == event and e.get("properties", {}).get("celery_task_id") == task_id

    return predicate


def tags_of(event: Event) -> dict[str, Any]:
    return {key: event["properties"].get(key) for key in TAGS}


@pytest.fixture
def producer(redis_url: str, queue: str) -> Iterator[Celery]:
    """A plain Celery app in this process, publishing to the worker's queue."""
    app = ph_worker_app.make_app(redis_url, queue=queue)
    yield app
    app.close()


@pytest.fixture
def posthog_producer(capture_server: CaptureServer) -> Iterator[posthog.Posthog]:
    """PostHog's integration instrumented in this process, with its own client sending
    gzip'd batches to the collector. Shut down (signals disconnected, flushed) afterwards."""
    client = posthog.Posthog(
        project_api_key=ph_worker_app.API_KEY,
        host=capture_server.url,
        flush_interval=ph_worker_app.FLUSH_INTERVAL,
        gzip=True,
        capture_mode="v0",
    )
    integration = PosthogCeleryIntegration(client=client)
    integration.instrument()
    yield client
    integration.shutdown()
    client.shutdown()


@pytest.fixture
def task_scopes_producer(producer: Celery) -> Iterator[Celery]:
    """task_scopes installed on the producer with PostHog's headers on; no API key, so
    nothing is captured here, only propagated."""
    task_scopes.celery.install(producer, posthog_headers=True)
    yield producer
    task_scopes.celery.uninstall(producer)


def assert_posthog_requests_accepted(server: CaptureServer) -> None:
    """Every request reached ``/batch/`` and was accepted (PostHog's default protocol)."""
    assert server.requests, "no request reached the collector"
    refused = [r for r in server.requests if r[1] != 200]
    assert not refused, f"the collector refused: {refused}"
    assert {path for path, _, _ in server.requests} == {"/batch/"}


# -- direction 1: PostHog producer -> task_scopes worker -------------------------------------


def test_posthog_producer_context_reaches_a_task_scopes_worker(
    start_worker: StartWorker,
    producer: Celery,
    posthog_producer: posthog.Posthog,
    capture_server: CaptureServer,
    queue: str,
) -> None:
    worker = start_worker("task_scopes")
    with posthog.new_context(fresh=True, client=posthog_producer):
        posthog.identify_context("ph-user-1")
        posthog.set_context_session("ph-session-1")
        for key, value in TAGS.items():
            posthog.tag(key, value)
        result = producer.tasks["interop.report"].delay("d1")

    [event] = wait_events(capture_server, labelled("d1"), 1, worker)
    props = event["properties"]
    assert event["distinct_id"] == "ph-user-1"
    assert props["$session_id"] == "ph-session-1"
    assert tags_of(event) == TAGS
    assert "$process_person_profile" not in props
    assert props["$lib"] == "task_scopes"
    assert props["celery_task_id"] == result.id
    assert props["celery_queue"] == queue
    assert props["celery_hostname"] == worker.hostname
    # The context came through PostHog's top-level headers: task_scopes wrote none here,
    # and the worker process never loaded posthog.
    assert props["wire"]["attr"] == sorted(POSTHOG_HEADERS)
    assert props["modules"] == ["task_scopes"]

    # PostHog's own "published" event, from this process, was accepted as sent.
    [published] = wait_events(
        capture_server, task_event(result.id, "celery task published"), 1, worker
    )
    assert published["distinct_id"] == "ph-user-1"
    assert published["properties"]["$lib"] == "posthog-python"
    assert_posthog_requests_accepted(capture_server)


def test_posthog_producer_context_survives_a_retry_on_a_task_scopes_worker(
    start_worker: StartWorker,
    producer: Celery,
    posthog_producer: posthog.Posthog,
    capture_server: CaptureServer,
) -> None:
    worker = start_worker("task_scopes")
    with posthog.new_context(fresh=True, client=posthog_producer):
        posthog.identify_context("ph-user-2")
        posthog.set_context_session("ph-session-2")
        for key, value in TAGS.items():
            posthog.tag(key, value)
        result = producer.tasks["interop.retry_once"].delay("d1-retry")

    events = wait_events(capture_server, labelled("d1-retry"), 2, worker)
    by_attempt = {e["properties"]["attempt"]: e for e in events}
    assert sorted(by_attempt) == [0, 1]
    for attempt, event in by_attempt.items():
        assert event["distinct_id"] == "ph-user-2", attempt
        assert event["properties"]["$session_id"] == "ph-session-2", attempt
        assert tags_of(event) == TAGS, attempt
        assert event["properties"]["celery_task_id"] == result.id
        assert event["properties"]["celery_retry_count"] == attempt
    # The first run read PostHog's headers; the retry was published from the worker child,
    # where task_scopes re-injected the restored context in its own header.
    assert by_attempt[0]["properties"]["wire"]["attr"] == sorted(POSTHOG_HEADERS)
    assert "task_scopes" in by_attempt[1]["properties"]["wire"]["attr"]
    assert not [e for e in capture_server.events if e["event"] == "$exception"]


# -- direction 2: task_scopes producer -> PostHog worker -------------------------------------


def _publish_in_task_scopes_context(
    app: Celery, task: str, label: str, distinct_id: str, session_id: str
) -> str:
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context(distinct_id)
        task_scopes.set_context_session(session_id)
        for key, value in TAGS.items():
            task_scopes.tag(key, value)
        task_id: str = app.tasks[task].delay(label).id
    return task_id


def assert_attributed(event: Event, distinct_id: str, session_id: str) -> None:
    props = event["properties"]
    assert event["distinct_id"] == distinct_id
    assert props["$session_id"] == session_id
    assert tags_of(event) == TAGS
    assert "$process_person_profile" not in props


def test_task_scopes_producer_context_reaches_a_posthog_worker(
    start_worker: StartWorker,
    task_scopes_producer: Celery,
    capture_server: CaptureServer,
) -> None:
    worker = start_worker("posthog")
    task_id = _publish_in_task_scopes_context(
        task_scopes_producer, "interop.report", "d2", "ts-user-1", "ts-session-1"
    )

    [event] = wait_events(capture_server, labelled("d2"), 1, worker)
    assert_attributed(event, "ts-user-1", "ts-session-1")
    props = event["properties"]
    assert props["$lib"] == "posthog-python"
    assert props["celery_task_id"] == task_id
    # PostHog reads request.headers; with no nested dict on the message, Celery >= 5.3
    # (celery#7555) fills it with the message's custom top-level headers, so the ones
    # task_scopes writes are there.
    assert props["wire"]["headers"] == sorted(["task_scopes", *POSTHOG_HEADERS])
    assert props["modules"] == ["posthog"]
    # PostHog's lifecycle events of the task are attributed too.
    for name in ("celery task started", "celery task success"):
        [lifecycle] = wait_events(capture_server, task_event(task_id, name), 1, worker)
        assert_attributed(lifecycle, "ts-user-1", "ts-session-1")
    assert_posthog_requests_accepted(capture_server)


def test_task_scopes_producer_context_survives_a_retry_on_a_posthog_worker(
    start_worker: StartWorker,
    task_scopes_producer: Celery,
    capture_server: CaptureServer,
) -> None:
    worker = start_worker("posthog")
    task_id = _publish_in_task_scopes_context(
        task_scopes_producer, "interop.retry_once", "d2-retry", "ts-user-2", "ts-session-2"
    )

    events = wait_events(capture_server, labelled("d2-retry"), 2, worker)
    assert sorted(e["properties"]["attempt"] for e in events) == [0, 1]
    for event in events:
        assert_attributed(event, "ts-user-2", "ts-session-2")
        assert event["properties"]["celery_task_id"] == task_id
    assert_posthog_requests_accepted(capture_server)


def test_without_posthog_headers_a_posthog_worker_sees_no_context(
    start_worker: StartWorker,
    producer: Celery,
    capture_server: CaptureServer,
) -> None:
    # The control: task_scopes' own header alone means nothing to PostHog's worker, so the
    # attribution above is the work of posthog_headers=True.
    task_scopes.celery.install(producer, posthog_headers=False)
    try:
        worker = start_worker("posthog")
        _publish_in_task_scopes_context(
            producer, "interop.report", "d2-off", "ts-user-3", "ts-session-3"
        )
        [event] = wait_events(capture_server, labelled("d2-off"), 1, worker)
    finally:
        task_scopes.celery.uninstall(producer)
    props = event["properties"]
    assert props["wire"]["headers"] == ["task_scopes"]
    assert event["distinct_id"] != "ts-user-3"
    assert props["$process_person_profile"] is False
    assert "$session_id" not in props
    assert not set(TAGS) & set(props)


def test_posthog_worker_sees_the_context_when_the_message_has_a_nested_headers_dict(
    start_worker: StartWorker,
    task_scopes_producer: Celery,
    capture_server: CaptureServer,
) -> None:
    # The celery#4875 workaround: Sentry's Celery integration writes this nested dict on
    # every task published inside a transaction (sentry-sdk 2.x, _update_celery_task_headers),
    # ddtrace and PostHog's own producer do too. Written here through Celery's public API,
    # the message has the same shape.
    worker = start_worker("posthog")
    nested = {"headers": {"sentry-trace": f"{'a' * 32}-{'b' * 16}-1"}}
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("ts-user-4")
        task_scopes.set_context_session("ts-session-4")
        for key, value in TAGS.items():
            task_scopes.tag(key, value)
        task_scopes_producer.tasks["interop.report"].apply_async(("d2-nested",), headers=nested)

    [event] = wait_events(capture_server, labelled("d2-nested"), 1, worker)
    assert event["properties"]["wire"]["attr"] == sorted(["task_scopes", *POSTHOG_HEADERS])
    assert_attributed(event, "ts-user-4", "ts-session-4")


def test_collector_accepts_posthogs_capture_v1_requests(capture_server: CaptureServer) -> None:
    client = posthog.Posthog(
        project_api_key=ph_worker_app.API_KEY,
        host=capture_server.url,
        capture_mode="v1",
        max_retries=0,
        flush_interval=ph_worker_app.FLUSH_INTERVAL,
    )
    try:
        client.capture("interop.v1", distinct_id="v1-user", properties={"$session_id": "s"})
        client.flush()
    finally:
        client.shutdown()
    events = capture_server.wait_until(bool, timeout=5.0)
    assert [(e["event"], e["distinct_id"]) for e in events] == [("interop.v1", "v1-user")]
    assert events[0]["properties"]["$session_id"] == "s"
