"""The loopback collector: ``python -m task_scopes.collector`` and CaptureServer."""

from __future__ import annotations

import gzip
import json
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from task_scopes.testing import CaptureServer, Reply

API_KEY = "phc_test"


@dataclass
class Collector:
    process: subprocess.Popen[str]
    url: str
    out: Path

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def lines_with(self, uuids: set[str]) -> list[dict[str, Any]]:
        return [event for event in self.lines() if event.get("uuid") in uuids]


def _start_collector(out: Path) -> Collector:
    process = subprocess.Popen(
        [sys.executable, "-m", "task_scopes.collector", "--port", "0", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_line: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: first_line.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(30)
    if not first_line or not first_line[0].startswith("listening on "):
        process.kill()
        _, err = process.communicate(timeout=10)
        pytest.fail(f"collector did not start: {first_line!r} {err}")
    url = first_line[0].split()[2]
    return Collector(process, url, out)


def _stop(collector: Collector) -> tuple[int, str]:
    collector.process.send_signal(signal.SIGINT)
    try:
        _, err = collector.process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        collector.process.kill()
        raise
    return collector.process.returncode, err


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    running = _start_collector(tmp_path_factory.mktemp("collector") / "events.jsonl")
    yield running
    _stop(running)


def _event(name: str = "e", **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": name,
        "distinct_id": "user-1",
        "properties": {"k": "v"},
        "uuid": str(uuid.uuid4()),
    }
    event.update(extra)
    return event


def _post(url: str, payload: Any, *, path: str = "/batch/", gzipped: bool = False) -> int:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if gzipped:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return requests.post(url + path, data=body, headers=headers, timeout=10).status_code


# -- the command line collector ---------------------------------------------------------


def test_cli_accepts_a_plain_batch_and_writes_one_json_line_per_event(
    collector: Collector,
) -> None:
    events = [_event("plain", properties={"n": n}) for n in range(3)]
    assert _post(collector.url, {"api_key": API_KEY, "batch": events}) == 200
    written = collector.lines_with({e["uuid"] for e in events})
    assert [e["properties"]["n"] for e in written] == [0, 1, 2]
    assert written[0] == events[0]


def test_cli_accepts_a_gzipped_batch(collector: Collector) -> None:
    events = [_event("gzipped") for _ in range(2)]
    status = _post(collector.url, {"api_key": API_KEY, "batch": events}, gzipped=True)
    assert status == 200
    assert len(collector.lines_with({e["uuid"] for e in events})) == 2


def test_cli_accepts_a_single_event_on_the_capture_endpoint(collector: Collector) -> None:
    event = _event("single")
    assert _post(collector.url, {"api_key": API_KEY, **event}, path="/i/v0/e/") == 200
    [written] = collector.lines_with({event["uuid"]})
    assert written["event"] == "single"


def test_cli_dedupes_events_by_uuid(collector: Collector) -> None:
    event = _event("twice")
    for _ in range(2):
        assert _post(collector.url, {"api_key": API_KEY, "batch": [event]}) == 200
    assert len(collector.lines_with({event["uuid"]})) == 1


BAD_PAYLOADS = {
    "not json": b"{not json",
    "not an object": [1, 2],
    "no api key": {"batch": [_event()]},
    "batch not a list": {"api_key": API_KEY, "batch": {"event": "x"}},
    "event not an object": {"api_key": API_KEY, "batch": ["x"]},
    "no event name": {"api_key": API_KEY, "batch": [_event(event="")]},
    "no distinct id": {"api_key": API_KEY, "batch": [_event(distinct_id=None)]},
    "properties not an object": {"api_key": API_KEY, "batch": [_event(properties=[1])]},
    "uuid not a string": {"api_key": API_KEY, "batch": [_event(uuid=7)]},
}


@pytest.mark.parametrize("payload", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_cli_rejects_a_bad_payload_with_400_and_writes_nothing(
    collector: Collector, payload: Any
) -> None:
    before = len(collector.lines())
    assert _post(collector.url, payload) == 400
    assert len(collector.lines()) == before


def test_cli_rejects_a_batch_with_one_bad_event_as_a_whole(collector: Collector) -> None:
    good = _event("good")
    payload = {"api_key": API_KEY, "batch": [good, _event(distinct_id="")]}
    assert _post(collector.url, payload) == 400
    assert collector.lines_with({good["uuid"]}) == []


def test_cli_answers_404_on_other_paths(collector: Collector) -> None:
    assert _post(collector.url, {"api_key": API_KEY, "batch": []}, path="/nope") == 404


def test_cli_exits_cleanly_on_interrupt_and_reports_its_count(tmp_path: Path) -> None:
    running = _start_collector(tmp_path / "events.jsonl")
    try:
        assert _post(running.url, {"api_key": API_KEY, "batch": [_event()]}) == 200
    finally:
        code, err = _stop(running)
    assert code == 0
    assert "received 1 events (0 duplicates)" in err


def _cli_error(*args: str) -> tuple[int, list[str], str]:
    """Run the CLI expecting it to refuse to start: (exit code, stderr lines, stdout)."""
    result = subprocess.run(
        [sys.executable, "-m", "task_scopes.collector", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode, result.stderr.splitlines(), result.stdout


def test_cli_port_in_use_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = tmp_path / "events.jsonl"
        code, err, stdout = _cli_error("--port", str(port), "--out", str(out))
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("python -m task_scopes.collector: error: --port")
    assert f"127.0.0.1:{port}" in err[0] and "in use" in err[0]
    assert stdout == ""
    assert not out.exists()  # nothing created for a collector that never ran


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_cli_port_out_of_range_prints_one_line_and_exits_2(port: str) -> None:
    code, err, _ = _cli_error(f"--port={port}", "--out", "unused.jsonl")
    assert code == 2
    assert err == [f"python -m task_scopes.collector: error: --port {port}: expected 0 to 65535"]


@pytest.mark.parametrize("where", ["a directory", "a missing directory"])
def test_cli_unwritable_out_prints_one_line_and_exits_2(tmp_path: Path, where: str) -> None:
    out = tmp_path if where == "a directory" else tmp_path / "missing" / "events.jsonl"
    code, err, _ = _cli_error("--port", "0", "--out", str(out))
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"python -m task_scopes.collector: error: --out {out}: ")
    assert "Traceback" not in err[0]


# -- CaptureServer -------------------------------------------------------------------------


def test_stopped_server_refuses_even_a_kept_alive_connection() -> None:
    with CaptureServer() as server, requests.Session() as session:
        payload = json.dumps({"api_key": API_KEY, "batch": [_event()]})
        assert session.post(server.url + "/batch/", data=payload, timeout=5).status_code == 200
        server.stop()
        with pytest.raises(requests.ConnectionError):
            session.post(server.url + "/batch/", data=payload, timeout=5)
        server.start()  # same port again
        assert session.post(server.url + "/batch/", data=payload, timeout=5).status_code == 200


def test_script_answers_in_order_then_200_again() -> None:
    with CaptureServer() as server:
        server.script(500, (429, {"Retry-After": "3"}), Reply(413))
        answers = []
        for _ in range(4):
            response = requests.post(
                server.url + "/batch/",
                json={"api_key": API_KEY, "batch": [_event()]},
                timeout=5,
            )
            answers.append((response.status_code, response.headers.get("Retry-After")))
        assert answers == [(500, None), (429, "3"), (413, None), (200, None)]
        assert [status for _, status, _ in server.requests] == [500, 429, 413, 200]
        assert len(server.events) == 1  # refused requests store nothing


def test_server_counts_duplicates_and_keeps_events_once() -> None:
    seen: list[str] = []
    with CaptureServer(on_event=lambda e: seen.append(e["uuid"])) as server:
        event = _event()
        for _ in range(3):
            _post(server.url, {"api_key": API_KEY, "batch": [event]})
        assert server.wait_for(1) == [event]
        assert server.duplicates == 2
    assert seen == [event["uuid"]]


def test_server_appends_new_events_to_its_out_file(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with CaptureServer(out=out) as server:
        events = [_event() for _ in range(2)]
        _post(server.url, {"api_key": API_KEY, "batch": events + events[:1]})
    assert [json.loads(line) for line in out.read_text().splitlines()] == events


def test_wait_for_returns_what_arrived_when_the_timeout_passes() -> None:
    with CaptureServer() as server:
        assert server.wait_for(1, timeout=0.05) == []


def test_clear_forgets_events_requests_and_script_but_not_seen_uuids() -> None:
    with CaptureServer() as server:
        event = _event()
        _post(server.url, {"api_key": API_KEY, "batch": [event]})
        server.script(500)
        server.clear()
        assert (server.events, server.requests, server.request_log) == ([], [], [])
        assert _post(server.url, {"api_key": API_KEY, "batch": [event]}) == 200
        assert server.duplicates == 1
