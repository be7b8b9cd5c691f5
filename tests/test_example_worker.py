"""The demo, ``python -m example_worker``, run as a user runs it: a subprocess that serves
the shop's WSGI app, posts the shoppers' checkouts to it with posthog-js's headers and
starts a real prefork worker. Its JSON lines are checked here independently of the demo's
own verdict; the verdict logic itself is checked on hand-made events, and the web app on
its own, in this process, with its task messages read back from a ``memory://`` broker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests

from example_worker import browser
from example_worker import check as demo_check
from example_worker.plan import EXPECTED, SHOPPERS, Shopper
from task_scopes.testing import CaptureServer, capture_events

ROOT = Path(__file__).resolve().parent.parent
COUNTS = re.compile(
    r"^events received: (\d+), attributed to the right user: (\d+) of (\d+) expected, "
    r"exceptions: (\d+)$"
)
TOTAL = sum(len(v) for v in EXPECTED.values())
WEB_URL = re.compile(r"^http://127\.0\.0\.1:\d+/checkout$")


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
        windows = {e["properties"]["$window_id"] for e in mine}
        assert len(windows) == 1
        assert uuid.UUID(next(iter(windows))).version == 7
    assert len(set.union(*sessions.values())) == len(SHOPPERS)
    assert len({e["properties"]["demo_run"] for e in events}) == 1

    # The web events were captured inside the middleware's request scope; its $ tags
    # describe that request and stay on the web process's events.
    web = [e for e in events if "celery_task_name" not in e["properties"]]
    assert sorted(e["event"] for e in web) == ["checkout_requested"] * len(SHOPPERS)
    assert {e["properties"]["$request_method"] for e in web} == {"POST"}
    urls = {e["properties"]["$current_url"] for e in web}
    assert len(urls) == 1 and WEB_URL.match(next(iter(urls))), urls
    for event in events:
        if event not in web:
            assert "$current_url" not in event["properties"], event
            assert "$request_method" not in event["properties"], event

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
    # The table names each shopper with the session their events carried, which is the
    # one their browser sent, and shows the web events' request.
    for event in read_events(out):
        shopper = shopper_of(event)
        session = event["properties"]["$session_id"]
        assert f"{shopper.name}: distinct ID {shopper.distinct_id}, session {session}" in (
            result.stdout
        )
        assert f"  {shopper.distinct_id:<11} session {session}  -> 202 Accepted: " in (
            result.stdout
        )
    rows = [line.split() for line in result.stdout.splitlines()]
    web_rows = [r for r in rows if r[:1] == ["checkout_requested"]]
    assert len(web_rows) == len(SHOPPERS)
    assert all(r[3:5] == ["POST", "/checkout"] and r[-1] == "ok" for r in web_rows), web_rows


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
    # 3 events come from the web process, flushed before the worker's first batch is due;
    # the collector refuses everything after them.
    result = run_demo("--out", str(out), "--stop-collector-after", "3")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "OK:" not in result.stdout
    received = read_events(out)
    assert 3 <= len(received) < TOTAL
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
                assert f"{event} ({task or 'POST /checkout'}" in line
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
            else:
                props["$current_url"] = "http://127.0.0.1:8000/checkout"
                props["$request_method"] = "POST"
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


def test_verdict_counts_a_web_event_from_another_request_as_unexpected() -> None:
    events = _perfect_events(SESSIONS)
    web = next(e for e in events if e["event"] == "checkout_requested")
    web["properties"]["$request_method"] = "GET"
    verdict = demo_check.check(events, SESSIONS)
    assert not verdict.ok
    assert [r.event["event"] for r in verdict.unexpected] == ["checkout_requested"]
    assert demo_check.problems(verdict)[0].startswith(
        "missing for alice (1): checkout_requested (POST /checkout)"
    )


def test_verdict_lists_what_is_missing() -> None:
    events = [e for e in _perfect_events(SESSIONS) if e["event"] != "loyalty_points_synced"]
    verdict = demo_check.check(events, SESSIONS)
    assert not verdict.all_arrived
    assert [e.event for e in verdict.missing["bob"]] == ["loyalty_points_synced"]
    assert demo_check.problems(verdict) == [
        "missing for bob (1): loyalty_points_synced (shop.sync_loyalty_points, retry 1)"
    ]


# -- the web app, in this process ----------------------------------------------------------

WEB_QUEUE = f"shop-web-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def shop_web_module() -> Iterator[ModuleType]:
    """:mod:`example_worker.web` with the shop app on an in-process ``memory://`` broker.

    The app reads its settings from the environment when first imported, so it must not
    have been imported in this process with other settings. Importing it makes it the
    current app and installs the plugin on it; both are undone for the tests that follow.
    """
    from celery import current_app

    import task_scopes.celery

    previous = current_app._get_current_object()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SHOP_BROKER_URL", "memory://")
        env.setenv("SHOP_RESULT_BACKEND", "cache+memory://")  # the chord needs a backend
        env.setenv("SHOP_QUEUE", WEB_QUEUE)
        env.delenv("SHOP_POSTHOG_API_KEY", raising=False)
        import example_worker.web as web
        from example_worker.app import app
    previous.set_current()
    try:
        if app.conf.broker_url != "memory://" or app.conf.task_default_queue != WEB_QUEUE:
            pytest.fail(f"example_worker.app was imported earlier with {app.conf.broker_url}")
        yield web
    finally:
        task_scopes.celery.uninstall(app)


@pytest.fixture
def shop_web(shop_web_module: ModuleType) -> ModuleType:
    """The web module, its queue emptied of what an earlier (failed) test left there."""
    from example_worker.app import app

    published(app)
    return shop_web_module


def published(app: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """The task messages waiting in the web test's queue, taken off it: (task name,
    order_id argument, decoded ``task_scopes`` header without its publish time)."""
    out = []
    with app.connection_for_read() as connection:
        queue = app.amqp.queues[WEB_QUEUE].bind(connection.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            args = message.decode()[0]
            context = json.loads(message.headers["task_scopes"])
            assert isinstance(context.pop("p"), int)
            out.append((message.headers["task"], args[0], context))
    return out


def visitor(shopper: Shopper) -> tuple[str, str, str]:
    """A distinct ID, session and window that appear nowhere but in the request headers."""
    return (
        f"visitor-{shopper.name}-{uuid.uuid4().hex[:6]}",
        f"session-{shopper.name}",
        f"window-{shopper.name}",
    )


def test_web_app_attributes_concurrent_checkouts_to_their_posthog_headers(
    shop_web: ModuleType,
) -> None:
    from example_worker.app import app

    who = {s.order_id: visitor(s) for s in SHOPPERS}
    with capture_events() as captured, shop_web.serve("run-42") as server:

        def post(shopper: Shopper) -> requests.Response:
            return requests.post(
                f"{server.url}/checkout",
                json=browser.cart(shopper),
                headers=browser.tracing_headers(*who[shopper.order_id]),
                timeout=30,
            )

        with ThreadPoolExecutor(len(SHOPPERS)) as pool:
            responses = list(pool.map(post, SHOPPERS))
        events = captured.named("checkout_requested")

    for shopper, response in zip(SHOPPERS, responses, strict=True):
        assert response.status_code == 202, response.text
        assert response.json()["order_id"] == shopper.order_id
    assert len(events) == len(SHOPPERS)
    for event in events:
        props = event["properties"]
        shopper = shopper_of(event)
        ids = (event["distinct_id"], props["$session_id"], props["$window_id"])
        assert ids == who[shopper.order_id]
        assert props["$current_url"] == f"{server.url}/checkout"
        assert props["$request_method"] == "POST"
        assert (props["plan"], props["demo_run"]) == (shopper.plan, "run-42")

    # What the worker would receive: each message carries its own request's context, and
    # none of the request's $ tags.
    messages = published(app)
    by_order = Counter(order_id for _, order_id, _ in messages)
    assert by_order == {
        s.order_id: 1 + len(s.items) + (s.loyalty_points is not None) + (s.gift_card is not None)
        for s in SHOPPERS
    }
    for task, order_id, context in messages:
        shopper = next(s for s in SHOPPERS if s.order_id == order_id)
        assert (context["d"], context["s"], context["w"]) == who[order_id], task
        assert context["t"] == {"plan": shopper.plan, "demo_run": "run-42"}, task


def test_web_app_without_posthog_headers_captures_a_personless_checkout(
    shop_web: ModuleType,
) -> None:
    from example_worker.app import app

    alice = SHOPPERS[0]
    with capture_events() as captured, shop_web.serve() as server:
        response = requests.post(f"{server.url}/checkout", json=browser.cart(alice), timeout=30)
        (event,) = captured.named("checkout_requested")
    assert response.status_code == 202, response.text
    assert event["properties"]["$process_person_profile"] is False
    assert "$session_id" not in event["properties"]
    messages = published(app)
    assert len(messages) == 1 + len(alice.items)
    assert all(context == {"v": 1, "t": {"plan": "pro"}} for _, _, context in messages)


def test_web_app_refuses_a_malformed_checkout_and_enqueues_nothing(
    shop_web: ModuleType,
) -> None:
    from example_worker.app import app

    cart = browser.cart(SHOPPERS[0])
    cart["items"] = [["mug", "two"]]
    headers = browser.tracing_headers("user_alice", "session-alice", "window-alice")
    with capture_events() as captured, shop_web.serve() as server:
        bad = requests.post(f"{server.url}/checkout", json=cart, headers=headers, timeout=30)
        wrong_method = requests.get(f"{server.url}/checkout", headers=headers, timeout=30)
        events = captured.events
    assert bad.status_code == 400
    assert "'items' must be a non-empty list" in bad.json()["error"]
    assert wrong_method.status_code == 405
    assert events == []
    assert published(app) == []


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
