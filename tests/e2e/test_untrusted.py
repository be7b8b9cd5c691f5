"""Oversized, garbage, wrong-typed and forged context never stops a task from running."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

import pytest

import task_scopes
from task_scopes.testing import CaptureServer

from .harness import (
    Broker,
    Event,
    MakeProducer,
    StartWorker,
    Worker,
    labelled,
    producer_context,
    props,
    wait_events,
)

pytestmark = [pytest.mark.slow, pytest.mark.broker]

# What the e2e tasks and the client put in every event, whatever the context.
BASELINE = {
    "label",
    "attempt",
    "user_header_attr",
    "user_header_headers",
    "pid",
    "thread",
    "$lib",
    "$lib_version",
    "$process_person_profile",
}


def _context_keys(event: Event) -> set[str]:
    """Property keys that can only have come from a propagated context."""
    return {k for k in props(event) if k not in BASELINE and not k.startswith("celery_")}


def _assert_empty_context(event: Event, refused_distinct_id: str) -> None:
    p = props(event)
    assert p.get("$process_person_profile") is False, event
    assert event["distinct_id"] != refused_distinct_id
    assert "$session_id" not in p
    assert _context_keys(event) == set()
    # The task still got its own task tags: it ran under the plugin, with an empty context.
    assert p["celery_task_name"] == "e2e.report"


def _refusal_logged(worker: Worker, task_ids: list[str]) -> bool:
    """The worker logged a task_scopes warning about one of these tasks (the warning is
    rate-limited, so one line at least; a refusal is logged, never raised)."""
    return any(
        "WARNING" in line and "task_scopes" in line and any(i in line for i in task_ids)
        for line in worker.log().splitlines()
    )


def _warnings_naming(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("task_scopes")
        and r.levelno >= logging.WARNING
        and key in r.getMessage()
    ]


def test_a_200_kib_string_tag_is_dropped_with_a_warning_and_the_task_runs_on_rabbitmq(
    amqp_broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = start_worker(amqp_broker)
    app = make_producer(amqp_broker)
    label = f"{run_id}-huge-string"
    with (
        caplog.at_level(logging.WARNING, logger="task_scopes"),
        producer_context(f"big-{run_id}", tags={"small": "kept"}),
    ):
        task_scopes.tag("huge_string", "x" * (200 * 1024))
        app.tasks["e2e.report"].delay(label)

    [event] = wait_events(capture_server, labelled(label), 1, worker=worker)
    assert event["distinct_id"] == f"big-{run_id}"
    assert props(event)["small"] == "kept"
    assert "huge_string" not in props(event), (
        f"tag arrived with {len(str(props(event)['huge_string']))} characters"
    )
    assert _warnings_naming(caplog, "huge_string"), caplog.text


def test_a_200_kib_list_tag_over_the_header_cap_is_dropped_with_a_warning_on_rabbitmq(
    amqp_broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = start_worker(amqp_broker)
    app = make_producer(amqp_broker)
    label = f"{run_id}-huge-list"
    # Each item is under the 1,000-character value cap; together they are 200 KiB.
    huge_list = ["y" * 800] * 256
    with (
        caplog.at_level(logging.WARNING, logger="task_scopes"),
        producer_context(f"big-{run_id}", tags={"small": "kept"}),
    ):
        task_scopes.tag("huge_list", huge_list)
        app.tasks["e2e.report"].delay(label)

    [event] = wait_events(capture_server, labelled(label), 1, worker=worker)
    assert event["distinct_id"] == f"big-{run_id}"
    assert props(event)["small"] == "kept"
    assert "huge_list" not in props(event)
    assert _warnings_naming(caplog, "huge_list"), caplog.text


BAD_HEADERS: dict[str, Any] = {
    "garbage": "garbage",
    "json-list": "[1,2]",
    "wrong-types": json.dumps({"v": 1, "d": 123, "s": ["x"], "t": "not-an-object"}),
    "unknown-version": json.dumps({"v": 99, "d": "refused-user"}),
    "not-a-string": 12345,
}


def test_garbage_and_wrong_typed_headers_run_the_task_with_an_empty_context(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker)
    plain = make_producer(broker, plugin=False)  # nothing rewrites the headers we send
    report = plain.tasks["e2e.report"]
    refused = [
        report.apply_async((f"{run_id}-{name}",), headers={"task_scopes": value}).id
        for name, value in BAD_HEADERS.items()
    ]
    # Control: a well-formed header from the same plain producer is restored, so the
    # empty contexts above are refusals, not a header that never arrived.
    valid = json.dumps(
        {"v": 1, "d": f"plain-{run_id}", "s": "plain-session", "t": {"origin": "plain"}}
    )
    report.apply_async((f"{run_id}-valid",), headers={"task_scopes": valid})

    [restored] = wait_events(capture_server, labelled(f"{run_id}-valid"), 1, worker=worker)
    assert restored["distinct_id"] == f"plain-{run_id}"
    assert props(restored)["$session_id"] == "plain-session"
    assert props(restored)["origin"] == "plain"
    for name in BAD_HEADERS:
        [event] = wait_events(
            capture_server, labelled(f"{run_id}-{name}"), 1, worker=worker, what=name
        )
        _assert_empty_context(event, refused_distinct_id="123")
    assert _refusal_logged(worker, refused)


SECRET = "s3cret-for-e2e"


def test_forged_unsigned_and_wrongly_signed_context_is_refused_when_a_secret_is_set(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker, settings={"task_scopes_secret": SECRET})
    signed = make_producer(broker, settings={"task_scopes_secret": SECRET})
    plain = make_producer(broker, plugin=False)
    forged_user = f"forged-{run_id}"
    header = json.dumps({"v": 1, "d": forged_user, "s": "forged-session", "t": {"forged": True}})
    wrong_key_sig = hmac.new(b"not-the-secret", header.encode(), hashlib.sha256).hexdigest()
    cases = {
        "forged-sig": {"task_scopes": header, "task_scopes_sig": "0" * 64},
        "wrong-key": {"task_scopes": header, "task_scopes_sig": wrong_key_sig},
        "unsigned": {"task_scopes": header},
        "posthog-unsigned": {"X-POSTHOG-DISTINCT-ID": forged_user},
    }
    refused = [
        plain.tasks["e2e.report"].apply_async((f"{run_id}-{name}",), headers=headers).id
        for name, headers in cases.items()
    ]
    # Control: the plugin's own signed header is accepted by the same worker.
    with producer_context(f"signed-{run_id}", "signed-session", {"signed": True}):
        signed.tasks["e2e.report"].delay(f"{run_id}-signed")

    [accepted] = wait_events(capture_server, labelled(f"{run_id}-signed"), 1, worker=worker)
    assert accepted["distinct_id"] == f"signed-{run_id}"
    assert props(accepted)["$session_id"] == "signed-session"
    assert props(accepted)["signed"] is True
    for name in cases:
        [event] = wait_events(
            capture_server, labelled(f"{run_id}-{name}"), 1, worker=worker, what=name
        )
        _assert_empty_context(event, refused_distinct_id=forged_user)
    assert _refusal_logged(worker, refused)
