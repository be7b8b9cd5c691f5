"""The demo, ``python -m example_worker``, run as a user runs it: a subprocess that starts a
real prefork worker. Its JSON lines are checked here independently of the demo's own
verdict; the verdict logic itself is checked on hand-made events."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from example_worker import check as demo_check
from example_worker.plan import EXPECTED, SHOPPERS, Shopper
from task_scopes.testing import CaptureServer

ROOT = Path(__file__).resolve().parent.parent
COUNTS = re.compile(
    r"^events received: (\d+), attributed to the right user: (\d+) of (\d+) expected, "
    r"exceptions: (\d+)$"
)
TOTAL = sum(len(v) for v in EXPECTED.values())


def run_demo(*args: str, timeout: float = 150.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "example_worker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def shopper_of(event: dict[str, Any]) -> Shopper:
    order_id = event["properties"].get("order_id")
    return next(s for s in SHOPPERS if s.order_id == order_id)


def signature(event: dict[str, Any]) -> tuple[Any, ...]:
    props = event["properties"]
    return (
        event["event"],
        props.get("celery_task_name"),
        props.get("celery_retry_count"),
        props.get("sku"),
    )


def expected_signatures(name: str) -> Counter[tuple[Any, ...]]:
    return Counter((e.event, e.task, e.retry, e.sku) for e in EXPECTED[name])


def assert_every_expected_event_attributed(events: list[dict[str, Any]]) -> None:
    assert len(events) == TOTAL, [signature(e) for e in events]
    assert len({e["uuid"] for e in events}) == TOTAL
    sessions: dict[str, set[str]] = {}
    for shopper in SHOPPERS:
        mine = [e for e in events if shopper_of(e) is shopper]
        assert Counter(signature(e) for e in mine) == expected_signatures(shopper.name)
        # The order ID came in the task's arguments; the user came in the header.
        assert {e["distinct_id"] for e in mine} == {shopper.distinct_id}
        assert {e["properties"]["plan"] for e in mine} == {shopper.plan}
        sessions[shopper.name] = {e["properties"]["$session_id"] for e in mine}
        assert len(sessions[shopper.name]) == 1
        assert uuid.UUID(next(iter(sessions[shopper.name]))).version == 7
    assert len(set.union(*sessions.values())) == len(SHOPPERS)
    assert len({e["properties"]["demo_run"] for e in events}) == 1

    exceptions = [e for e in events if e["event"] == "$exception"]
    assert len(exceptions) == 1
    (failure,) = exceptions
    assert failure["distinct_id"] == "user_carol"
    assert failure["properties"]["$exception_type"] == "GiftCardExpired"
    assert failure["properties"]["$exception_list"][0]["mechanism"]["type"] == "celery"
    synced = next(e for e in events if e["event"] == "loyalty_points_synced")
    assert synced["properties"]["celery_retry_count"] == 1
    assert synced["distinct_id"] == "user_bob"


def assert_demo_succeeded(result: subprocess.CompletedProcess[str], out: Path) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert_every_expected_event_attributed(read_events(out))
    assert "OK: every expected event arrived" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    match = COUNTS.match(last)
    assert match is not None, last
    assert match.groups() == (str(TOTAL), str(TOTAL), str(TOTAL), "1")
    # The table names each shopper with the session their events carried.
    for event in read_events(out):
        shopper = shopper_of(event)
        session = event["properties"]["$session_id"]
        assert f"{shopper.name}: distinct ID {shopper.distinct_id}, session {session}" in (
            result.stdout
        )


@pytest.mark.slow
def test_demo_on_the_embedded_default_attributes_every_event_within_a_minute(
    tmp_path: Path,
) -> None:
    out = tmp_path / "events.jsonl"
    started = time.monotonic()
    result = run_demo("--out", str(out))
    elapsed = time.monotonic() - started
    assert_demo_succeeded(result, out)
    assert "filesystem://" in result.stdout
    assert elapsed < 60, f"the default run took {elapsed:.1f} s"


@pytest.mark.slow
@pytest.mark.broker
def test_demo_on_redis_attributes_every_event(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    result = run_demo("--broker", redis_url, "--out", str(out))
    assert_demo_succeeded(result, out)


@pytest.mark.slow
@pytest.mark.broker
def test_demo_on_rabbitmq_attributes_every_event(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    result = run_demo("--broker", amqp_url, "--out", str(out), "--concurrency", "3")
    assert_demo_succeeded(result, out)
    assert "guest:guest" not in result.stdout  # the password is masked


@pytest.mark.slow
def test_demo_says_what_was_lost_and_fails_when_the_collector_stops(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    # 3 events come from the web process; stop once the worker's have started arriving.
    result = run_demo("--out", str(out), "--stop-collector-after", "5")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "OK:" not in result.stdout
    received = read_events(out)
    assert 5 <= len(received) < TOTAL
    assert "the collector was stopped after" in result.stdout
    lost = TOTAL - len(received)
    assert f"lost: {lost} expected events never reached the collector" in result.stdout
    for shopper in SHOPPERS:
        got = Counter(signature(e) for e in received if shopper_of(e) is shopper)
        missing = expected_signatures(shopper.name) - got
        if missing:
            line = next(
                x
                for x in result.stdout.splitlines()
                if x.strip().startswith(f"missing for {shopper.name} ")
            )
            assert f"({sum(missing.values())})" in line
            for event, task, _retry, _sku in missing:
                assert f"{event} ({task or 'web request'}" in line
    last = result.stdout.strip().splitlines()[-1]
    match = COUNTS.match(last)
    assert match is not None, last
    assert match.group(1) == str(len(received))
    assert match.group(2) == str(len(received))


@pytest.mark.slow
def test_demo_with_host_sends_everything_there_and_says_it_cannot_verify() -> None:
    # A collector of the test's own stands in for PostHog: the demo does not look at it.
    with CaptureServer() as server:
        result = run_demo("--host", server.url, "--api-key", "phc_elsewhere")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "arrival cannot be verified" in result.stdout
        assert "events received:" not in result.stdout
        # The demo exits after the worker's exit flush and its own: nothing is left to come.
        events = list(server.events)
    assert_every_expected_event_attributed(events)


def test_demo_refuses_host_without_api_key() -> None:
    result = run_demo("--host", "https://eu.i.posthog.com", timeout=60)
    assert result.returncode == 2
    assert "--host needs --api-key" in result.stderr


# -- the verdict, on hand-made events -----------------------------------------------------


def _perfect_events(sessions: dict[str, str]) -> list[dict[str, Any]]:
    events = []
    for shopper in SHOPPERS:
        for expected in EXPECTED[shopper.name]:
            props: dict[str, Any] = {
                "order_id": shopper.order_id,
                "plan": shopper.plan,
                "$session_id": sessions[shopper.name],
            }
            if expected.task is not None:
                props["celery_task_name"] = expected.task
                props["celery_retry_count"] = expected.retry
            if expected.sku is not None:
                props["sku"] = expected.sku
            events.append(
                {"event": expected.event, "distinct_id": shopper.distinct_id, "properties": props}
            )
    return events


SESSIONS = {s.name: f"session-{s.name}" for s in SHOPPERS}


def test_verdict_is_ok_for_exactly_the_expected_events() -> None:
    verdict = demo_check.check(_perfect_events(SESSIONS), SESSIONS)
    assert verdict.ok
    assert verdict.attributed_right == TOTAL
    assert demo_check.counts(verdict).endswith(f"{TOTAL} of {TOTAL} expected, exceptions: 1")


def test_verdict_flags_an_event_attributed_to_another_user() -> None:
    events = _perfect_events(SESSIONS)
    receipt = next(
        e
        for e in events
        if e["event"] == "receipt_sent" and e["properties"]["order_id"] == "A-1001"
    )
    receipt["distinct_id"] = "user_bob"
    verdict = demo_check.check(events, SESSIONS)
    assert not verdict.ok
    assert verdict.all_arrived
    assert [r.expected.event for r in verdict.misattributed if r.expected] == ["receipt_sent"]
    assert verdict.attributed_right == TOTAL - 1
    assert any("WRONG USER" in line for line in demo_check.render(verdict, SESSIONS))


def test_verdict_flags_a_lost_session_and_a_second_exception() -> None:
    events = _perfect_events(SESSIONS)
    del events[1]["properties"]["$session_id"]
    events.append(json.loads(json.dumps(next(e for e in events if e["event"] == "$exception"))))
    verdict = demo_check.check(events, SESSIONS)
    assert not verdict.ok
    assert len(verdict.misattributed) == 1
    assert "session ID None" in (verdict.misattributed[0].problem or "")
    assert len(verdict.unexpected) == 1
    assert verdict.exceptions == 2


def test_verdict_lists_what_is_missing() -> None:
    events = [e for e in _perfect_events(SESSIONS) if e["event"] != "loyalty_points_synced"]
    verdict = demo_check.check(events, SESSIONS)
    assert not verdict.all_arrived
    assert [e.event for e in verdict.missing["bob"]] == ["loyalty_points_synced"]
    assert demo_check.problems(verdict) == [
        "missing for bob (1): loyalty_points_synced (shop.sync_loyalty_points, retry 1)"
    ]


# -- the demo's filesystem:// transport -------------------------------------------------

PRODUCER = """
import sys
from kombu import Connection, Exchange, Queue
folder, count = sys.argv[1], int(sys.argv[2])
options = {"data_folder_in": folder, "data_folder_out": folder, "control_folder": folder}
queue = Queue("q", Exchange("q"), "q")
with Connection("filesystem://localhost/", transport_options=options,
                transport="example_worker._filesystem:Transport") as connection:
    producer = connection.Producer()
    for i in range(count):
        producer.publish({"i": i, "pad": "x" * 3000}, exchange=queue.exchange, routing_key="q",
                         declare=[queue], serializer="json")
"""


@pytest.mark.slow
def test_filesystem_transport_never_hands_out_a_message_before_it_is_written(
    tmp_path: Path,
) -> None:
    from kombu import Connection, Exchange, Queue

    # kombu's own channel, in this set-up, loses several messages per thousand to a
    # consumer that polls while a producer is writing.
    count = 1500
    producers = [
        subprocess.Popen([sys.executable, "-c", PRODUCER, str(tmp_path), str(count)], cwd=ROOT)
        for _ in range(2)
    ]
    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path)}
    options["control_folder"] = str(tmp_path)
    received: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + 90
    with Connection("filesystem://localhost/", transport_options=options) as connection:
        queue = Queue("q", Exchange("q"), "q")(connection.default_channel)
        while len(received) + len(errors) < 2 * count and time.monotonic() < deadline:
            try:
                message = queue.get(no_ack=True)
            except Exception as exc:  # an empty or partial file: the bug
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if message is not None:
                received.append(message.payload["i"])
    for producer in producers:
        assert producer.wait(60) == 0
    assert errors == []
    assert Counter(received) == Counter({i: 2 for i in range(count)})
