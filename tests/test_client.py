"""The event client against a real loopback collector: event shape, queueing, flush,
shutdown, outages."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from task_scopes import (
    Client,
    HttpTransport,
    InMemoryTransport,
    identify_context,
    new_context,
    set_context_session,
    tag,
)
from task_scopes import __version__ as version
from task_scopes import _client as client_module
from task_scopes._consumer import Consumer, Counters
from task_scopes._defaults import MAX_BATCH_BYTES
from task_scopes.testing import CaptureServer, Reply

MakeClient = Callable[..., Client]


@pytest.fixture
def server() -> Iterator[CaptureServer]:
    with CaptureServer() as srv:
        yield srv


@pytest.fixture
def make_client(server: CaptureServer) -> Iterator[MakeClient]:
    """Clients sending to ``server``; each is shut down after the test."""
    clients: list[Client] = []

    def make(**options: Any) -> Client:
        options.setdefault("flush_interval", 0.05)
        client = Client(options.pop("api_key", "phc_test"), server.url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.shutdown(timeout=0.5)


def _consumer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "task_scopes-consumer"]


def test_10000_captures_arrive_exactly_once_each(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    uuids = [client.capture("bulk", properties={"n": n}) for n in range(10_000)]
    assert client.flush(timeout=30) == 0
    events = server.wait_for(10_000, timeout=10)
    assert len(events) == 10_000
    assert server.duplicates == 0
    assert sorted(e["uuid"] for e in events) == sorted(uuids)  # type: ignore[type-var]
    assert sorted(e["properties"]["n"] for e in events) == list(range(10_000))
    assert sum(n for _, status, n in server.requests if status == 200) == 10_000
    # flush_at wakes the consumer; a request takes whatever is queued, up to 5 MiB
    assert all(r.size <= MAX_BATCH_BYTES for r in server.request_log)
    assert client.stats().delivered == 10_000


def test_capture_returns_the_uuid_the_event_is_sent_with(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    generated = client.capture("a")
    given = client.capture("b", uuid="0191f1a4-0000-7000-8000-000000000001")
    client.flush(timeout=10)
    events = {e["event"]: e for e in server.wait_for(2)}
    assert events["a"]["uuid"] == generated
    assert events["b"]["uuid"] == given == "0191f1a4-0000-7000-8000-000000000001"


def test_event_has_the_posthog_batch_shape_with_lib_and_version(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    client.capture("shaped", distinct_id="user-1", timestamp="2024-01-02T03:04:05+00:00")
    client.flush(timeout=10)
    [event] = server.wait_for(1)
    assert set(event) == {"event", "distinct_id", "properties", "timestamp", "uuid"}
    assert event["timestamp"] == "2024-01-02T03:04:05+00:00"
    assert event["properties"]["$lib"] == "task_scopes"
    assert event["properties"]["$lib_version"] == version
    assert "$process_person_profile" not in event["properties"]


def test_event_without_any_distinct_id_is_personless(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    with new_context(fresh=True):
        client.capture("anonymous")
        client.capture("anonymous")
    client.flush(timeout=10)
    events = server.wait_for(2)
    for event in events:
        assert event["properties"]["$process_person_profile"] is False
        assert len(event["distinct_id"]) == 36 and event["distinct_id"].count("-") == 4
    assert events[0]["distinct_id"] != events[1]["distinct_id"]


def test_context_session_becomes_session_id_and_context_identity_the_distinct_id(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    with new_context():
        identify_context("user-1")
        set_context_session("session-1")
        tag("plan", "pro")
        client.capture("in_context")
        client.capture("explicit", distinct_id="user-2", properties={"$session_id": "s-2"})
    client.flush(timeout=10)
    events = {e["event"]: e for e in server.wait_for(2)}
    assert events["in_context"]["distinct_id"] == "user-1"
    assert events["in_context"]["properties"]["$session_id"] == "session-1"
    assert events["in_context"]["properties"]["plan"] == "pro"
    assert events["explicit"]["distinct_id"] == "user-2"
    assert events["explicit"]["properties"]["$session_id"] == "s-2"


def test_flush_sends_at_once_even_with_a_300_second_flush_interval(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client(flush_interval=300)
    client.capture("waiting")
    started = time.monotonic()
    assert client.flush(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert [e["event"] for e in server.events] == ["waiting"]


def test_a_full_batch_is_sent_without_waiting_for_the_interval(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client(flush_interval=300, flush_at=10)
    for _ in range(10):
        client.capture("tenth")
    assert len(server.wait_for(10, timeout=5)) == 10


def test_shutdown_stops_the_consumer_and_a_later_capture_starts_a_new_one(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client(flush_interval=300)
    client.capture("before")
    consumer = client._consumer
    assert consumer is not None and consumer.is_alive()
    assert client.shutdown(timeout=10) == 0
    assert not consumer.is_alive()
    client.capture("after")
    assert client.flush(timeout=10) == 0
    assert [e["event"] for e in server.wait_for(2)] == ["before", "after"]
    assert client._consumer is not None and client._consumer is not consumer


def test_queue_full_drops_the_new_event_counts_it_and_logs_once(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    # no wake-up before 300 s and batches of 1000: the consumer takes nothing meanwhile
    client = make_client(flush_interval=300, flush_at=1000, max_queue_size=5)
    with caplog.at_level(logging.WARNING, logger="task_scopes"):
        results = [client.capture("e", properties={"n": n}) for n in range(8)]
    assert all(r is not None for r in results[:5])
    assert results[5:] == [None, None, None]
    stats = client.stats()
    assert (stats.queued, stats.dropped) == (5, 3)
    full = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(full) == 1
    queued = [json.loads(e)["properties"]["n"] for e in client._queue]
    assert queued == [0, 1, 2, 3, 4]  # the new events were dropped, not the old


def test_event_over_900_kib_is_refused_at_capture_and_counted_the_rest_is_sent(
    server: CaptureServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(flush_interval=300)
    with caplog.at_level(logging.WARNING, logger="task_scopes"):
        assert client.capture("huge", properties={"blob": "x" * (901 * 1024)}) is None
        client.capture("small")
        assert client.flush(timeout=10) == 0  # the refused one was never queued
    assert [e["event"] for e in server.wait_for(1)] == ["small"]
    assert client.stats().dropped == 1
    assert client.stats().delivered == 1
    [record] = [r for r in caplog.records if "huge" in r.getMessage()]
    assert "bytes as JSON, over the limit of 921,600" in record.getMessage()  # its size...
    assert "xxxx" not in record.getMessage()  # ...not its payload


def test_batches_stay_under_5_mib(server: CaptureServer, make_client: MakeClient) -> None:
    client = make_client(flush_interval=300, gzip=False)
    for _ in range(8):
        client.capture("big", properties={"blob": "y" * (800 * 1024)})
    assert client.flush(timeout=30) == 0
    assert len(server.wait_for(8)) == 8
    assert max(r.size for r in server.request_log) <= 5 * 1024 * 1024 + 1024
    assert len(server.request_log) >= 2


def test_before_send_can_modify_and_drop_events(
    server: CaptureServer, make_client: MakeClient
) -> None:
    def before_send(event: dict[str, Any]) -> dict[str, Any] | None:
        if event["event"] == "secret":
            return None
        event["properties"]["scrubbed"] = True
        return event

    client = make_client(before_send=before_send)
    assert client.capture("secret") is None
    assert client.capture("public") is not None
    client.flush(timeout=10)
    [event] = server.wait_for(1)
    assert event["event"] == "public"
    assert event["properties"]["scrubbed"] is True
    assert client.stats().dropped == 1


def test_unserializable_property_values_become_null_instead_of_losing_the_event(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    client.capture("odd", properties={"obj": object(), "data": b"\x00\x01"})
    client.flush(timeout=10)
    [event] = server.wait_for(1)
    assert event["properties"]["obj"] is None
    assert event["properties"]["data"] == "AAE="


def test_lone_surrogates_become_the_replacement_character_and_the_batch_is_kept(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client(flush_interval=300)
    client.capture("before")
    client.capture("surrogate", properties={"path": "caf\udce9.txt"})
    client.capture("after")
    assert client.flush(timeout=10) == 0
    events = {e["event"]: e for e in server.wait_for(3)}
    assert set(events) == {"before", "surrogate", "after"}
    assert events["surrogate"]["properties"]["path"] == "caf\ufffd.txt"
    assert client.stats().delivered == 3


def test_an_event_nested_too_deep_to_serialize_is_refused_alone(
    server: CaptureServer, make_client: MakeClient
) -> None:
    nested: dict[str, Any] = {}
    inner = nested
    for _ in range(100_000):
        inner["x"] = {}
        inner = inner["x"]
    client = make_client(flush_interval=300)
    client.capture("before")
    assert client.capture("too_deep", properties={"nested": nested}) is None
    client.capture("after")
    assert client.flush(timeout=10) == 0
    assert [e["event"] for e in server.wait_for(2)] == ["before", "after"]
    stats = client.stats()
    assert (stats.delivered, stats.dropped) == (2, 1)


def test_with_the_collector_down_capture_is_immediate_and_flush_returns_in_about_1s(
    server: CaptureServer, make_client: MakeClient
) -> None:
    server.stop()
    client = make_client(retry_window=3, flush_interval=300)
    started = time.monotonic()
    for _ in range(100):
        assert client.capture("offline") is not None
    assert time.monotonic() - started < 0.5  # 100 captures, no network wait
    started = time.monotonic()
    undelivered = client.flush(timeout=1)
    elapsed = time.monotonic() - started
    assert undelivered == 100
    assert 0.9 <= elapsed < 1.5
    assert server.events == []


def test_shutdown_with_the_collector_down_returns_the_undelivered_count(
    server: CaptureServer, make_client: MakeClient
) -> None:
    server.stop()
    client = make_client(retry_window=2, flush_interval=300)
    for _ in range(7):
        client.capture("offline")
    started = time.monotonic()
    assert client.shutdown(timeout=0.5) == 7
    assert time.monotonic() - started < 1.0


def test_an_outage_shorter_than_the_retry_window_loses_nothing(server: CaptureServer) -> None:
    transport = HttpTransport("phc_test", server.url, retry_window=30, backoff_factor=0.05)
    client = Client(transport=transport, flush_interval=300)
    try:
        client.capture("first")
        assert client.flush(timeout=10) == 0
        server.stop()  # also cuts the client's pooled keep-alive connection
        for _ in range(20):
            client.capture("during_outage")
        assert client.flush(timeout=0.5) == 20
        server.start()
        assert client.flush(timeout=15) == 0
        events = server.wait_for(21)
        assert [e["event"] for e in events].count("during_outage") == 20
        assert server.duplicates == 0
        assert client.stats().failed == 0
    finally:
        client.shutdown(timeout=1)


def test_a_batch_still_failing_after_the_retry_window_is_given_up_counted_and_logged(
    server: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(*[500] * 200)
    transport = HttpTransport("phc_test", server.url, retry_window=0.5, backoff_factor=0.01)
    client = Client(transport=transport, flush_interval=300)
    try:
        with caplog.at_level(logging.ERROR, logger="task_scopes"):
            for _ in range(3):
                client.capture("doomed")
            assert client.flush(timeout=10) == 3  # given up: undelivered
        assert client.stats().failed == 3
        assert server.events == []
        assert any("500" in r.getMessage() and "3 events" in r.getMessage() for r in caplog.records)
    finally:
        client.shutdown(timeout=1)


def test_consumer_threads_are_started_lazily_one_per_client() -> None:
    transport = InMemoryTransport()
    client = Client(transport=transport, flush_interval=300)
    before = len(_consumer_threads())
    assert client._consumer is None
    for _ in range(50):
        client.capture("e")
    assert len(_consumer_threads()) == before + 1
    client.shutdown(timeout=5)
    assert len(transport.events) == 50


def test_debug_changes_that_clients_logging_only() -> None:
    from task_scopes import _internal

    previous = _internal.set_reraise(False)  # production behaviour of the guard
    level = logging.getLogger("task_scopes").level
    try:
        Client(debug=True, transport=InMemoryTransport())
        assert logging.getLogger("task_scopes").level == level
        other = Client(transport=InMemoryTransport())
        # a user mistake on another client is still swallowed, not raised
        assert other.capture("x", properties="oops") is None  # type: ignore[arg-type]
    finally:
        _internal.set_reraise(previous)


def test_flush_at_exit_covers_every_client(server: CaptureServer) -> None:
    from task_scopes.celery import _signals

    first = Client("phc_first", server.url, flush_interval=300)
    second = Client("phc_second", server.url, flush_interval=300)
    first.capture("from_first")
    second.capture("from_second")
    _signals._on_worker_process_shutdown()  # a pool child's exit path
    events = server.wait_for(2, timeout=10)
    assert sorted(server.api_key_of(e) or "" for e in events) == ["phc_first", "phc_second"]
    _signals.flush_at_exit()
    assert first.stats().delivered == second.stats().delivered == 1


def test_a_backlog_goes_out_in_requests_that_grow_with_it(
    server: CaptureServer, make_client: MakeClient
) -> None:
    # The first request takes a second (a busy collector, or a thread holding the GIL):
    # what queues meanwhile leaves in one or two large requests, not in fifty of flush_at.
    server.script(Reply(200, delay=1.0))
    client = make_client(flush_interval=300, flush_at=100)
    for _ in range(100):
        client.capture("e")
    for _ in range(4_900):
        client.capture("e")
    assert client.flush(timeout=30) == 0
    assert sum(n for _, status, n in server.requests if status == 200) == 5_000
    assert len(server.requests) <= 3, server.requests


class _GatedTransport(InMemoryTransport):
    """Holds its first send until :attr:`release` is set; records each batch's size."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def send(self, batch: Any) -> int:
        self.sizes.append(len(batch))
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return super().send(batch)


def _starve_then_capture(client: Client, captures: int) -> tuple[threading.Thread, list[Any]]:
    """Start ``client``'s consumer, then hold the lock it takes batches under (as a
    thread that keeps the GIL holds it off) while ``captures`` events are queued; the last
    one is captured in a thread of its own, returned with what it saw when it returned
    (the sizes its transport had sent). The caller releases the lock."""
    client.capture("e")  # the consumer starts and waits for a wake-up
    client._counters.cv.acquire()
    for _ in range(captures - 2):
        client.capture("e")
    transport: Any = client.transport
    seen: list[Any] = []

    def last() -> None:
        client.capture("e")
        seen.append(list(transport.sizes))

    waiter = threading.Thread(target=last)
    waiter.start()
    return waiter, seen


def test_a_capture_that_finds_the_consumer_starved_waits_while_the_batch_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Woken at 10 queued events, the consumer cannot take them; eight captures later,
    # capture() waits for it (the bound raised from 5 ms so the test can see the wait)
    # until the batch has been sent, and the next wake-up comes at twice the size.
    monkeypatch.setattr(client_module, "_HAND_OVER_FOR", 30.0)
    transport = _GatedTransport()
    transport.release.set()
    client = Client("phc_test", transport=transport, flush_at=10, flush_interval=300)
    try:
        waiter, seen = _starve_then_capture(client, 18)
        try:
            waiter.join(0.3)
            assert waiter.is_alive()  # waiting for the consumer, not returned
            consumer = client._consumer
            assert consumer is not None and consumer.wake_at == 20
        finally:
            client._counters.cv.release()
        waiter.join(10)
        assert not waiter.is_alive()
        assert seen == [[18]]  # it returned once the batch of 18 had been sent
        assert client.stats().delivered == 18
        assert not client._slow_send  # the send ended within the wait
    finally:
        client.shutdown(timeout=5)


def test_a_consumer_busy_with_a_send_is_not_waited_for() -> None:
    # A slow collector: the queue refills to flush_at while a batch is in flight. The
    # consumer is not starved, it is waiting for the network: capture() goes on.
    transport = _GatedTransport()
    client = Client("phc_test", transport=transport, flush_at=10, flush_interval=300)
    try:
        for _ in range(10):
            client.capture("e")  # the 10th wakes the consumer: it takes 10 and blocks
        assert transport.entered.wait(10)
        for _ in range(30):  # a wake-up at 10 queued, and eight past it
            client.capture("e")
        consumer = client._consumer
        assert consumer is not None and consumer.wake_at == 10  # no hand-over happened
        assert not client._slow_send
        transport.release.set()
        assert client.flush(timeout=10) == 0
    finally:
        transport.release.set()
        client.shutdown(timeout=5)


def test_the_wake_up_size_never_grows_past_what_the_queue_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # flush_at 600 with a queue of 1,000: doubling would ask for 1,200 queued events,
    # which the queue never holds, and every capture past 1,000 would be dropped.
    monkeypatch.setattr(client_module, "_HAND_OVER_FOR", 30.0)
    transport = _GatedTransport()
    transport.release.set()
    client = Client(
        "phc_test", transport=transport, flush_at=600, max_queue_size=1000, flush_interval=300
    )
    try:
        waiter, _ = _starve_then_capture(client, 608)
        client._counters.cv.release()
        waiter.join(10)
        consumer = client._consumer
        assert consumer is not None and consumer.wake_at == 992
        for _ in range(1500):
            client.capture("e")
        assert client.flush(timeout=10) == 0
        assert client.stats().dropped == 0
        assert client.stats().delivered == 2108
    finally:
        client.shutdown(timeout=5)


def test_after_a_hand_over_that_ended_before_the_send_capture_yields_while_it_is_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A slow collector: the wait ends with the batch still in flight. The rest of the
    # send needs the GIL when the answer comes, so capture() gives it 0.1 ms once a
    # millisecond while it is in flight (without a backlog), until a capture finds
    # nothing in flight.
    monkeypatch.setattr(client_module, "_HAND_OVER_FOR", 0.05)
    yields: list[int] = []
    real = Client._yield_to_consumer

    def recording(self: Client, queued: int) -> None:
        yields.append(queued)
        real(self, queued)

    monkeypatch.setattr(Client, "_yield_to_consumer", recording)
    transport = _GatedTransport()  # holds its first send
    client = Client("phc_test", transport=transport, flush_at=10, flush_interval=300)
    try:
        waiter, _ = _starve_then_capture(client, 18)
        client._counters.cv.release()
        waiter.join(10)
        assert not waiter.is_alive()
        assert transport.entered.is_set()
        assert client._slow_send
        assert yields == []
        client.capture("e")  # in flight, no backlog: yields because the send is slow
        assert yields == [1]
        transport.release.set()
        assert client.flush(timeout=10) == 0
        client.capture("e")  # nothing in flight: no yield, and the slow send is over
        assert yields == [1]
        assert not client._slow_send
    finally:
        transport.release.set()
        client.shutdown(timeout=5)


def test_the_wake_up_size_goes_back_to_flush_at_when_a_partial_batch_comes_due() -> None:
    transport = InMemoryTransport()
    client = Client("phc_test", transport=transport, flush_at=10, flush_interval=0.2)
    try:
        client.capture("e")
        consumer = client._consumer
        assert consumer is not None
        consumer.wake_at = 40  # as raised by hand-overs to a starved consumer
        deadline = time.monotonic() + 10
        while client.stats().delivered < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.stats().delivered == 1  # sent by the interval, not by a wake-up
        assert consumer.wake_at == 10
    finally:
        client.shutdown(timeout=5)


class _ProducerDuringSend(InMemoryTransport):
    """Records each batch's size; during the first send, two more events are captured, as
    a thread that goes on working after its ``flush()`` would."""

    def __init__(self, queue: Any) -> None:
        super().__init__()
        self.queue = queue
        self.sizes: list[int] = []

    def send(self, batch: Any) -> int:
        self.sizes.append(len(batch))
        if len(self.sizes) == 1:
            self.queue.extend([_event_json(i) for i in (10, 11)])
        return super().send(batch)


def _event_json(i: int) -> str:
    return json.dumps(
        {
            "event": "e",
            "distinct_id": "d",
            "properties": {"i": i},
            "timestamp": "2026-12-02T00:00:00+00:00",
            "uuid": f"01a23500-0000-7000-8000-{i:012x}",
        }
    )


def test_a_flush_sends_what_was_queued_then_and_later_events_wait_for_flush_at() -> None:
    # Before: flush() left the consumer sending at once until it found the queue empty,
    # so a producer that kept capturing got a request per event or two.
    queue: Any = collections.deque(_event_json(i) for i in range(3))
    transport = _ProducerDuringSend(queue)
    counters = Counters()
    counters.oldest = time.monotonic()  # as capture() sets it on the first queued event
    consumer = Consumer(queue, transport, counters, flush_at=100, flush_interval=3600.0)
    consumer.flush_now()
    consumer._drain()  # the consumer's pass, run here: the thread is never started
    assert transport.sizes == [3]
    assert len(queue) == 2  # captured after the flush: they wait for a full batch
    consumer.flush_now()
    consumer._drain()
    assert transport.sizes == [3, 2]
    assert [e["properties"]["i"] for e in transport.events] == [0, 1, 2, 10, 11]
