"""After ``os.fork()`` parent and child each deliver their own events, none twice."""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from task_scopes import Client, JsonlTransport, identify_context, new_context
from task_scopes.testing import CaptureServer, Reply

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")


def _fork(child: Callable[[], int]) -> int:
    """Fork; run ``child`` in the child and leave it with ``os._exit`` (never back into
    pytest). Returns the child's pid in the parent."""
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads may deadlock the child;
        # that is the situation under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = child()
        finally:
            os._exit(code)
    return pid


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_parent_and_child_each_deliver_their_own_events_none_twice() -> None:
    with CaptureServer() as server:
        # the first batch stalls 1.5 s so that the parent has one batch in flight, and
        # more queued behind it, at the moment of the fork
        server.script(Reply(200, delay=1.5))
        client = Client("phc_test", server.url, flush_at=5, flush_interval=300)
        try:
            for n in range(5):
                client.capture("parent_in_flight", properties={"n": n})
            _wait_for(lambda: client.stats().in_flight == 5)
            for n in range(3):
                client.capture("parent_queued", properties={"n": n})
            assert client.stats().queued + client.stats().in_flight == 8

            def child() -> int:
                with new_context():
                    identify_context("child-user")
                    for n in range(4):
                        client.capture("child", properties={"pid": os.getpid(), "n": n})
                undelivered = client.flush(timeout=10)
                stats = client.stats()
                # the child starts with nothing of the parent's: only its own 4 events
                return 0 if (undelivered, stats.delivered, stats.captured) == (0, 4, 4) else 1

            pid = _fork(child)
            assert _exit_code(pid) == 0
            assert client.flush(timeout=10) == 0
        finally:
            client.shutdown(timeout=2)
        events = server.wait_for(12, timeout=5)
    names = [e["event"] for e in events]
    assert names.count("parent_in_flight") == 5
    assert names.count("parent_queued") == 3
    assert names.count("child") == 4
    assert server.duplicates == 0
    assert sum(r.events for r in server.request_log if r.status == 200) == 12
    child_events = [e for e in events if e["event"] == "child"]
    assert {e["properties"]["pid"] for e in child_events} == {pid}
    assert {e["distinct_id"] for e in child_events} == {"child-user"}


def test_child_writes_even_if_the_parent_consumer_held_the_transport_lock_at_fork(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    transport = JsonlTransport(path)
    client = Client(transport=transport, flush_interval=300)
    client.capture("parent")
    # the state a fork can catch: the parent's consumer thread in the middle of a write
    held = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with transport._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert held.wait(5)

        def child() -> int:
            client.capture("child")
            return 0 if client.flush(timeout=5) == 0 else 1

        pid = _fork(child)
        assert _exit_code(pid) == 0
    finally:
        release.set()
        thread.join(5)
    assert client.shutdown(timeout=5) == 0
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert sorted(events) == ["child", "parent"]
