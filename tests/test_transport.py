"""HttpTransport against a real loopback collector told to fail; the file and memory
transports."""

from __future__ import annotations

import gzip
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from task_scopes import Client, HttpTransport, InMemoryTransport, JsonlTransport, Transport
from task_scopes._transport import batch_body
from task_scopes.collector import parse_payload
from task_scopes.testing import CaptureServer, Reply

API_KEY = "phc_SECRET_API_KEY_0123456789"
PAYLOAD_MARKER = "PAYLOAD-MUST-NOT-BE-LOGGED"


@pytest.fixture
def server() -> Iterator[CaptureServer]:
    with CaptureServer() as srv:
        yield srv


def _events(n: int, name: str = "e") -> list[str]:
    return [
        json.dumps(
            {
                "event": name,
                "distinct_id": f"user-{i}",
                "properties": {"i": i, "note": PAYLOAD_MARKER},
                "uuid": f"00000000-0000-4000-8000-{i:012d}",
            }
        )
        for i in range(n)
    ]


def test_500_500_429_with_retry_after_then_200_delivers_everything_once(
    server: CaptureServer,
) -> None:
    server.script(500, 500, (429, {"Retry-After": "1"}), 200)
    client = Client(API_KEY, server.url, flush_interval=300)
    try:
        uuids = {client.capture("retried", properties={"n": n}) for n in range(50)}
        assert client.flush(timeout=20) == 0
    finally:
        client.shutdown(timeout=1)
    events = server.wait_for(50)
    assert {e["uuid"] for e in events} == uuids
    assert server.duplicates == 0
    log = server.request_log
    assert [r.status for r in log] == [500, 500, 429, 200]
    assert [r.events for r in log] == [0, 0, 0, 50]
    # the attempt after the 429 waited its Retry-After (1 s), not the exponential backoff
    # that would have been due by then (0.5 s * 2**2 = 2 s plus jitter)
    assert 0.95 <= log[3].received - log[2].received < 1.8
    assert client.stats().delivered == 50


def test_a_retry_after_longer_than_the_retry_window_is_cut_to_the_window(
    server: CaptureServer,
) -> None:
    server.script((429, {"Retry-After": "3600"}))
    transport = HttpTransport(API_KEY, server.url, retry_window=1.0)
    assert transport.send(_events(2)) == 0
    first, second = server.request_log
    assert 0.9 <= second.received - first.received < 2.0
    assert len(server.events) == 2


@pytest.mark.parametrize("status", [408, 502, 503, 504])
def test_other_transient_statuses_are_retried(server: CaptureServer, status: int) -> None:
    server.script(status)
    transport = HttpTransport(API_KEY, server.url, backoff_factor=0.01)
    assert transport.send(_events(3)) == 0
    assert [r.status for r in server.request_log] == [status, 200]
    assert len(server.events) == 3


def test_413_splits_the_batch_until_the_halves_are_accepted(server: CaptureServer) -> None:
    server.script(413, 413)
    transport = HttpTransport(API_KEY, server.url)
    assert transport.send(_events(8)) == 0
    # 8 -> refused; 4 -> refused; 2 + 2 accepted; the other 4 accepted
    assert [(r.status, r.events) for r in server.request_log] == [
        (413, 0),
        (413, 0),
        (200, 2),
        (200, 2),
        (200, 4),
    ]
    assert sorted(e["properties"]["i"] for e in server.events) == list(range(8))
    assert server.duplicates == 0


def test_413_on_a_single_event_drops_it(server: CaptureServer) -> None:
    server.script(413)
    transport = HttpTransport(API_KEY, server.url)
    assert transport.send(_events(1)) == 1
    assert server.events == []


def test_400_drops_the_batch_and_logs_its_size_but_no_payload_and_no_api_key(
    server: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(400)
    client = Client(API_KEY, server.url, flush_interval=300)
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                client.capture("rejected", properties={"note": PAYLOAD_MARKER})
            assert client.flush(timeout=10) == 3  # dropped: undelivered
            # the next batch goes through: a 4xx drops one batch, not the client
            client.capture("accepted")
            assert client.flush(timeout=10) == 0
    finally:
        client.shutdown(timeout=1)
    assert [e["event"] for e in server.events] == ["accepted"]
    assert [r.status for r in server.request_log] == [400, 200]
    assert client.stats().failed == 3
    dropped = [r for r in caplog.records if "answered 400" in r.getMessage()]
    assert len(dropped) == 1
    message = dropped[0].getMessage()
    assert "3 events" in message
    assert f"{server.request_log[0].size} bytes" in message
    for record in caplog.records:
        text = record.getMessage() + str(record.args)
        assert PAYLOAD_MARKER not in text
        assert API_KEY not in text


def test_bodies_are_gzipped_and_the_collector_accepts_them(server: CaptureServer) -> None:
    transport = HttpTransport(API_KEY, server.url, gzip=True)
    batch = _events(100)
    assert transport.send(batch) == 0
    [record] = server.request_log
    assert record.encoding == "gzip"
    assert record.size < len(batch_body(API_KEY, batch)) / 5
    assert len(server.events) == 100


def test_plain_bodies_are_sent_when_gzip_is_off(server: CaptureServer) -> None:
    transport = HttpTransport(API_KEY, server.url, gzip=False)
    assert transport.send(_events(2)) == 0
    [record] = server.request_log
    assert record.encoding is None
    assert len(server.events) == 2


def test_batch_body_is_the_posthog_batch_payload() -> None:
    body = json.loads(batch_body(API_KEY, _events(2)))
    assert set(body) == {"api_key", "batch", "sent_at"}
    assert body["api_key"] == API_KEY
    assert [e["properties"]["i"] for e in body["batch"]] == [0, 1]


def test_a_stalled_collector_is_cut_off_by_the_timeout_and_retried(
    server: CaptureServer,
) -> None:
    server.script(Reply(200, delay=2.0))
    transport = HttpTransport(API_KEY, server.url, timeout=0.3, backoff_factor=0.01)
    started = time.monotonic()
    assert transport.send(_events(2)) == 0
    assert time.monotonic() - started < 1.8  # did not sit out the 2 s stall
    # the stalled request may still land after its reply timed out: the UUIDs dedupe it
    assert len(server.wait_for(2)) == 2


def test_connection_refused_gives_up_after_the_retry_window(server: CaptureServer) -> None:
    server.stop()
    transport = HttpTransport(API_KEY, server.url, retry_window=0.5, backoff_factor=0.05)
    started = time.monotonic()
    assert transport.send(_events(4)) == 4
    assert 0.5 <= time.monotonic() - started < 5


def test_max_retries_caps_the_attempts(server: CaptureServer) -> None:
    server.script(*[503] * 10)
    transport = HttpTransport(API_KEY, server.url, max_retries=2, backoff_factor=0.01)
    assert transport.send(_events(1)) == 1
    assert [r.status for r in server.request_log] == [503, 503, 503]


def test_transports_satisfy_the_transport_protocol(tmp_path: Path) -> None:
    for transport in (
        HttpTransport(API_KEY, "http://127.0.0.1:1"),
        InMemoryTransport(),
        JsonlTransport(tmp_path / "events.jsonl"),
    ):
        assert isinstance(transport, Transport)


def test_jsonl_transport_appends_one_event_per_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    client = Client(transport=JsonlTransport(path), flush_interval=300)
    for n in range(5):
        client.capture("line", properties={"n": n})
    assert client.flush(timeout=10) == 0
    client.capture("line", properties={"n": 5})
    assert client.shutdown(timeout=10) == 0
    lines = path.read_text().splitlines()
    assert [json.loads(line)["properties"]["n"] for line in lines] == list(range(6))


def test_jsonl_transport_reports_an_unwritable_path_as_undelivered(tmp_path: Path) -> None:
    transport = JsonlTransport(tmp_path / "missing-dir" / "events.jsonl")
    assert transport.send(_events(2)) == 2


def test_in_memory_transport_keeps_parsed_events_until_cleared() -> None:
    transport = InMemoryTransport()
    assert transport.send(_events(3)) == 0
    assert [e["properties"]["i"] for e in transport.events] == [0, 1, 2]
    transport.clear()
    assert transport.events == []


def test_gzip_helper_matches_what_the_collector_decodes() -> None:
    body = gzip.compress(batch_body(API_KEY, _events(2)))
    assert [e["distinct_id"] for e in parse_payload(body, "gzip")] == ["user-0", "user-1"]


def test_proxy_variables_are_read_once_when_the_transport_is_made(
    server: CaptureServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The collector stands in for a proxy: a proxied POST names the full target URL.
    target = "http://collector.invalid:8000"
    monkeypatch.setenv("HTTP_PROXY", server.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    transport = HttpTransport("phc_test", target, retry_window=1.0, max_retries=1)
    monkeypatch.delenv("HTTP_PROXY")  # too late: it was resolved at construction
    transport.send(['{"event":"e","distinct_id":"d","properties":{}}'])
    assert [r.path for r in server.request_log] == [f"{target}/batch/"]


def test_no_proxy_is_honoured(server: CaptureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    transport = HttpTransport("phc_test", server.url, retry_window=1.0)
    assert transport.send(['{"event":"e","distinct_id":"d","properties":{}}']) == 0


@pytest.mark.parametrize(
    ("host", "proxy", "uses_bundle"),
    [
        ("https://eu.i.posthog.com", None, True),
        ("HTTPS://eu.i.posthog.com", None, True),  # a scheme is case-insensitive
        ("http://127.0.0.1:9", None, False),  # no TLS: no stat() of the bundle per POST
        ("http://collector.invalid:8000", "https://proxy.invalid:3128", True),
    ],
)
def test_the_ca_bundle_variable_is_used_wherever_tls_is_spoken(
    monkeypatch: pytest.MonkeyPatch, host: str, proxy: str | None, uses_bundle: bool
) -> None:
    proxy_names = ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY")
    for name in (*proxy_names, "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/corporate-ca.pem")
    if proxy is not None:
        monkeypatch.setenv("HTTP_PROXY", proxy)
    transport = HttpTransport("phc_test", host)
    assert transport._session.verify == ("/etc/corporate-ca.pem" if uses_bundle else True)
