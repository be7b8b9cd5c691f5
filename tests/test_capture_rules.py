"""The loopback collector and InMemoryTransport refuse what PostHog's capture endpoint
refuses, and accept what it accepts (the rules, with their sources in PostHog's capture
service, are in ``task_scopes._capture_rules``)."""

from __future__ import annotations

import gzip
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from task_scopes import InMemoryTransport
from task_scopes.testing import CaptureServer

API_KEY = "phc_test"


@pytest.fixture(scope="module")
def server() -> Iterator[CaptureServer]:
    with CaptureServer() as srv:
        yield srv


def _event(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": "e",
        "distinct_id": "user-1",
        "properties": {"k": "v"},
        "uuid": str(uuid.uuid4()),
    }
    event.update(fields)
    return {k: v for k, v in event.items() if v is not _ABSENT}


_ABSENT = object()


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def _batch(*events: dict[str, Any], api_key: Any = API_KEY) -> bytes:
    return json.dumps({"api_key": api_key, "batch": list(events)}).encode()


def _post(server: CaptureServer, body: bytes, *, gzipped: bool = False) -> int:
    headers = {"Content-Type": "application/json"}
    if gzipped:
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return requests.post(server.url + "/batch/", data=body, headers=headers, timeout=30).status_code


# Each of these makes PostHog's capture answer 400 (or 401) to the whole request.
REFUSED: dict[str, bytes] = {
    "NaN token": _batch(_event(properties={"x": float("nan")})),
    "Infinity token": _batch(_event(properties={"x": float("inf")})),
    "-Infinity token": _batch(_event(properties={"x": -float("inf")})),
    "float beyond f64": _batch(_event()).replace(b'"k": "v"', b'"k": 1e400'),
    "integer beyond f64": _batch(_event(properties={"x": 10**400})),
    "nested 128 deep": _batch(_event(properties={"x": _nested(124)})),
    "invalid UTF-8": _batch(_event(properties={"x": "\udce9"})).replace(b"\\udce9", b"\xe9"),
    "event name missing": _batch(_event(event=_ABSENT)),
    "event name empty": _batch(_event(event="")),
    "event name not a string": _batch(_event(event=7)),
    "distinct_id missing": _batch(_event(distinct_id=_ABSENT)),
    "distinct_id null": _batch(_event(distinct_id=None)),
    "distinct_id empty": _batch(_event(distinct_id="")),
    "distinct_id whitespace": _batch(_event(distinct_id=" \t\u3000")),
    "uuid malformed": _batch(_event(uuid="not-a-uuid")),
    "uuid not a string": _batch(_event(uuid=7)),
    "properties null": _batch(_event(properties=None)),
    "properties a list": _batch(_event(properties=[1])),
    "timestamp not a string": _batch(_event(timestamp=1700000000)),
    "$cookieless_mode not a bool": _batch(_event(properties={"$cookieless_mode": "yes"})),
    "empty batch": _batch(),
    "api_key empty": _batch(_event(), api_key=" "),
    "api_key missing": _batch(_event(), api_key=None),
    "personal api key": _batch(_event(), api_key="phx_personal"),
    "api_key too long": _batch(_event(), api_key="phc_" + "x" * 61),
    "event over 1,000,000 bytes": _batch(_event(properties={"x": "y" * 1_000_000})),
}

# ...and these it accepts.
ACCEPTED: dict[str, bytes] = {
    "nested 127 deep": _batch(_event(properties={"x": _nested(123)})),
    "distinct_id a number": _batch(_event(distinct_id=42)),
    "distinct_id in properties": _batch(
        _event(distinct_id=_ABSENT, properties={"distinct_id": "u"})
    ),
    "distinct_id over 200 characters (cut, not refused)": _batch(_event(distinct_id="d" * 300)),
    "distinct_id of a control character Rust does not trim": _batch(_event(distinct_id="\x1c")),
    "uuid empty (one is made)": _batch(_event(uuid="")),
    "uuid without hyphens": _batch(_event(uuid=uuid.uuid4().hex)),
    "uuid braced": _batch(_event(uuid="{" + str(uuid.uuid4()) + "}")),
    "escaped lone surrogate": _batch(_event(properties={"x": "\ud800"})),
    "integer beyond 64 bits": _batch(_event(properties={"x": 2**100})),
    "api_key with a trailing newline": _batch(_event(), api_key=API_KEY + "\n"),
}


@pytest.mark.parametrize("body", REFUSED.values(), ids=REFUSED.keys())
def test_the_collector_refuses_what_posthog_refuses_as_a_whole_request(
    server: CaptureServer, body: bytes
) -> None:
    good = _event(event="good")
    if b'"batch": []' not in body:  # a good event in the same request is refused too
        body = body.replace(b'"batch": [', b'"batch": [' + json.dumps(good).encode() + b", ", 1)
    assert _post(server, body) == 400
    assert good["uuid"] not in {e.get("uuid") for e in server.events}


@pytest.mark.parametrize("body", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_the_collector_accepts_what_posthog_accepts(server: CaptureServer, body: bytes) -> None:
    assert _post(server, body) == 200


def test_a_body_over_20_mib_after_decompression_is_refused(server: CaptureServer) -> None:
    padding = "z" * (400 * 1024)
    events = [_event(properties={"pad": padding}) for _ in range(52)]  # ~20.3 MiB
    assert _post(server, _batch(*events), gzipped=True) == 400


def test_in_memory_transport_refuses_a_batch_posthog_would_refuse_and_logs_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = InMemoryTransport()
    good = json.dumps(_event(event="good"))
    bad = json.dumps(_event(properties={"x": float("nan")}))
    with caplog.at_level(logging.ERROR, logger="task_scopes"):
        assert transport.send([good, bad]) == 2
        assert transport.send([good, json.dumps(_event(distinct_id=" "))]) == 2
    assert transport.events == []
    lines = [r.getMessage() for r in caplog.records]
    assert "NaN is not JSON" in lines[0]
    assert "distinct_id is empty or whitespace" in lines[1]
    assert transport.send([good]) == 0
    assert [e["event"] for e in transport.events] == ["good"]
