"""The loopback collector as posthog-js's ``api_host``: CORS, remote config, flags, and the
body encodings posthog-js sends (the browser tier, tests/browser, runs the real thing)."""

from __future__ import annotations

import base64
import gzip
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from task_scopes.testing import CaptureServer

from .test_collector import Collector, _start_collector, _stop

API_KEY = "phc_test"
PAGE = "http://127.0.0.1:43210"


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    """``python -m task_scopes.collector``, as a developer runs it."""
    running = _start_collector(tmp_path_factory.mktemp("collector") / "events.jsonl")
    yield running
    _stop(running)


@pytest.fixture
def server() -> Iterator[CaptureServer]:
    with CaptureServer() as capture_server:
        yield capture_server


def _batch(*names: str) -> tuple[dict[str, Any], set[str]]:
    """A posthog-js ``/e/`` body: ``{api_key, batch, sent_at}``, distinct IDs in properties."""
    events = [
        {
            "event": name,
            "properties": {"distinct_id": "anon-1", "token": API_KEY, "$window_id": "w-1"},
            "uuid": str(uuid.uuid4()),
            "timestamp": "2024-05-17T12:00:00.000Z",
        }
        for name in names
    ]
    payload = {"api_key": API_KEY, "batch": events, "sent_at": "2024-05-17T12:00:01.000Z"}
    return payload, {e["uuid"] for e in events}


# -- CORS ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "http://127.0.0.1:5173",
        "http://localhost:3000",
        "http://[::1]:8080",
        "https://app.localhost",
    ],
)
def test_preflight_from_a_loopback_page_is_answered_for_that_origin(
    collector: Collector, origin: str
) -> None:
    reply = requests.options(
        f"{collector.url}/e/?ver=1.449.2",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-app",
        },
        timeout=10,
    )
    assert reply.status_code == 204
    assert reply.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in reply.headers["Access-Control-Allow-Methods"]
    assert reply.headers["Access-Control-Allow-Headers"] == "content-type,x-app"
    assert reply.headers["Vary"] == "Origin"


@pytest.mark.parametrize(
    "origin", ["https://example.com", "http://127.0.0.1.example.com:80", "null", "file://"]
)
def test_preflight_from_any_other_page_is_refused(collector: Collector, origin: str) -> None:
    reply = requests.options(
        f"{collector.url}/e/",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert reply.status_code == 403
    assert "Access-Control-Allow-Origin" not in reply.headers


def test_answers_to_a_loopback_page_let_it_read_them_and_its_retry_after(
    server: CaptureServer,
) -> None:
    payload, uuids = _batch("$pageview")
    server.script((429, {"Retry-After": "2"}))
    refused = requests.post(f"{server.url}/e/", json=payload, headers={"Origin": PAGE}, timeout=10)
    accepted = requests.post(f"{server.url}/e/", json=payload, headers={"Origin": PAGE}, timeout=10)
    assert (refused.status_code, accepted.status_code) == (429, 200)
    for reply in (refused, accepted):
        assert reply.headers["Access-Control-Allow-Origin"] == PAGE
        assert reply.headers["Access-Control-Expose-Headers"] == "Retry-After"
    assert {e["uuid"] for e in server.events} == uuids


def test_a_post_from_a_page_elsewhere_is_refused_and_stores_nothing(
    server: CaptureServer,
) -> None:
    payload, _ = _batch("$pageview")
    for path in ("/e/", "/flags/?v=2"):
        reply = requests.post(
            f"{server.url}{path}",
            json=payload,
            headers={"Origin": "https://evil.example"},
            timeout=10,
        )
        assert reply.status_code == 403
        assert "Access-Control-Allow-Origin" not in reply.headers
    assert server.events == []
    # Without an Origin header (an SDK, a script) it is not a browser's request: served.
    assert requests.post(f"{server.url}/e/", json=payload, timeout=10).status_code == 200


# -- remote config and flags ----------------------------------------------------------------


def test_remote_config_json_is_an_empty_project_in_posthogs_shape(collector: Collector) -> None:
    reply = requests.get(f"{collector.url}/array/{API_KEY}/config", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "application/json"
    config = reply.json()
    assert config["token"] == API_KEY
    assert "gzip-js" in config["supportedCompression"]
    assert (config["surveys"], config["sessionRecording"], config["siteApps"]) == (False, False, [])
    assert config["analytics"] == {"endpoint": "/i/v0/e/"}


def test_remote_config_script_sets_the_global_posthog_js_reads(collector: Collector) -> None:
    reply = requests.get(
        f"{collector.url}/array/{API_KEY}/config.js", headers={"Origin": PAGE}, timeout=10
    )
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "application/javascript"
    match = re.fullmatch(
        r"\(function\(\)\{window\._POSTHOG_REMOTE_CONFIG=window\._POSTHOG_REMOTE_CONFIG\|\|\{\};"
        r'window\._POSTHOG_REMOTE_CONFIG\["phc_test"\]=\{config:(\{.*\}),siteApps:\[\]\};\}\)\(\);',
        reply.text,
    )
    assert match is not None, reply.text
    assert json.loads(match.group(1))["token"] == API_KEY


HOSTILE_KEY = quote('phc_x"];alert(1)//')


@pytest.mark.parametrize(
    "path", [f"/array/{HOSTILE_KEY}/config.js", "/array//config", "/static/x.js"]
)
def test_other_gets_are_404_never_a_script_with_the_path_in_it(
    collector: Collector, path: str
) -> None:
    reply = requests.get(collector.url + path, timeout=10)
    assert reply.status_code == 404
    assert "alert" not in reply.text


def test_status_is_still_answered_at_the_root(server: CaptureServer) -> None:
    assert requests.get(server.url + "/", timeout=10).json() == {"status": "ok", "events": 0}


@pytest.mark.parametrize("body", [b"", gzip.compress(b'{"token": "phc_test"}')])
def test_flags_v2_answers_no_flags(server: CaptureServer, body: bytes) -> None:
    reply = requests.post(
        f"{server.url}/flags/?v=2&config=true",
        data=body,
        headers={"Origin": PAGE, "Content-Type": "text/plain"},
        timeout=10,
    )
    assert reply.status_code == 200
    answer = reply.json()
    assert (answer["flags"], answer["errorsWhileComputingFlags"]) == ({}, False)
    assert reply.headers["Access-Control-Allow-Origin"] == PAGE
    assert server.requests == [("/flags/", 200, 0)]


def test_legacy_decide_answers_no_flags_in_its_own_shape(server: CaptureServer) -> None:
    answer = requests.post(f"{server.url}/decide/?v=3", data=b"{}", timeout=10).json()
    assert (answer["featureFlags"], answer["featureFlagPayloads"]) == ({}, {})
    assert answer["supportedCompression"] == ["gzip", "gzip-js"]
    assert answer["sessionRecording"] is False


# -- posthog-js's body encodings -----------------------------------------------------------


def _base64_form(payload: dict[str, Any]) -> bytes:
    # What posthog-js's _base64Encode and encodeToDataString make of a body.
    encoded = base64.b64encode(json.dumps(payload).encode()).decode()
    return ("data=" + quote(encoded, safe="")).encode()


def _gzip(payload: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(payload).encode())


def _json_form(payload: dict[str, Any]) -> bytes:
    return ("data=" + quote(json.dumps(payload), safe="")).encode()


ACCEPTED = {
    # posthog-js 1.449 (fetch and XHR): gzip as text/plain, no compression parameter.
    "gzip text/plain": ("/i/v0/e/?ver=1.449.2", "text/plain", _gzip),
    # Older releases said so in the query.
    "gzip-js parameter": ("/e/?compression=gzip-js&ver=1.100.0", "text/plain", _gzip),
    # sendBeacon on page exit: a base64 form.
    "base64 form": (
        "/e/?compression=base64&ver=1.449.2",
        "application/x-www-form-urlencoded",
        _base64_form,
    ),
    "json": ("/e/?ver=1.449.2", "application/json", lambda p: json.dumps(p).encode()),
    "json text/plain": ("/i/v0/e/", "text/plain;charset=UTF-8", lambda p: json.dumps(p).encode()),
    "json form": ("/e/", "application/x-www-form-urlencoded", _json_form),
}


@pytest.mark.parametrize(("path", "content_type", "encode"), ACCEPTED.values(), ids=ACCEPTED)
def test_every_body_encoding_of_posthog_js_is_accepted(
    collector: Collector, path: str, content_type: str, encode: Any
) -> None:
    payload, uuids = _batch("$pageview", "$identify")
    reply = requests.post(
        collector.url + path,
        data=encode(payload),
        headers={"Content-Type": content_type, "Origin": PAGE},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert [e["event"] for e in collector.lines_with(uuids)] == ["$pageview", "$identify"]


REFUSED = {
    "gzip-js parameter, plain body": ("/e/?compression=gzip-js", "text/plain", b'{"batch": []}'),
    "base64 parameter, not base64": (
        "/e/?compression=base64",
        "application/x-www-form-urlencoded",
        b"data=%7B%22a%22%7D",
    ),
    "base64 parameter, no data field": (
        "/e/?compression=base64",
        "application/x-www-form-urlencoded",
        b"other=e30%3D",
    ),
    "lz64 is not sent any more": (
        "/e/?compression=lz64",
        "application/x-www-form-urlencoded",
        b"data=N4Ig",
    ),
    "form without data": ("/e/", "application/x-www-form-urlencoded", b"batch=1"),
    "broken gzip": ("/e/", "text/plain", gzip.compress(b'{"api_key": "phc_test"}')[:-6]),
}


@pytest.mark.parametrize(("path", "content_type", "body"), REFUSED.values(), ids=REFUSED)
def test_a_body_that_is_not_what_it_says_is_refused_with_400(
    server: CaptureServer, path: str, content_type: str, body: bytes
) -> None:
    reply = requests.post(
        server.url + path, data=body, headers={"Content-Type": content_type}, timeout=10
    )
    assert reply.status_code == 400, reply.text
    assert server.events == []


def test_decoded_bodies_are_still_validated_event_by_event(server: CaptureServer) -> None:
    payload, _ = _batch("$pageview")
    payload["batch"].append({"event": "$autocapture", "properties": {"token": API_KEY}})
    reply = requests.post(
        f"{server.url}/e/?compression=base64",
        data=_base64_form(payload),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert reply.status_code == 400
    assert "distinct_id missing" in reply.json()["error"]
    assert server.events == []


def test_preflights_and_config_requests_are_in_the_request_log(server: CaptureServer) -> None:
    requests.options(f"{server.url}/e/", headers={"Origin": PAGE}, timeout=10)
    requests.get(f"{server.url}/array/{API_KEY}/config.js", timeout=10)
    requests.get(f"{server.url}/nope", timeout=10)
    assert server.requests == [
        ("/e/", 204, 0),
        (f"/array/{API_KEY}/config.js", 200, 0),
        ("/nope", 404, 0),
    ]


def test_out_file_of_the_cli_is_what_posthog_js_sent(tmp_path: Path) -> None:
    running = _start_collector(tmp_path / "events.jsonl")
    try:
        payload, uuids = _batch("custom")
        reply = requests.post(
            f"{running.url}/e/?compression=base64",
            data=_base64_form(payload),
            headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": PAGE},
            timeout=10,
        )
        assert reply.status_code == 200
    finally:
        _stop(running)
    assert running.lines_with(uuids) == payload["batch"]
