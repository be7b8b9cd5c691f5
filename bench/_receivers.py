"""Loopback receivers the benchmark counts events with, run in the orchestrating process.

* PostHog's capture API (task_scopes and PostHog send here): :class:`DeferredCapture`,
  which answers each request at once and checks it later. On a 2-core machine a receiver
  that parses and checks every batch while the measured process runs takes CPU from it
  (and from the sibling core's caches), which only the configurations that send pay
  for: bare Celery sends nothing. A real capture endpoint is another machine. So during
  a measurement the receiver only decompresses and counts event UUIDs (C code, for the
  figures that wait for the last event); after it, every stored request goes through
  the same checks as the test suite's collector (``task_scopes.collector.
  batch_payload``, PostHog's capture rules), and a refused request fails the run.
* Sentry's envelope endpoint (``POST /api/<project>/envelope/``): :class:`SentryReceiver`,
  which counts ``event`` items, de-duplicated by event ID. ``GET /`` answers
  ``{"events": n}`` like ``CaptureServer`` does, so drivers poll both the same way.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from task_scopes._browser_api import decode_body
from task_scopes._collector_http import CAPTURE_PATHS
from task_scopes.collector import batch_payload

_UUID = re.compile(rb'"uuid"\s*:\s*"([^"]+)"')


_R = TypeVar("_R", bound="_Loopback")


class _JsonHandler(BaseHTTPRequestHandler):
    """Keep-alive handler answering JSON, without a log line per request."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms per request on Linux loopback).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Loopback:
    """An HTTP server on a free loopback port, in a daemon thread. Context manager."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self: _R) -> _R:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self: _R) -> _R:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeferredCapture(_Loopback):
    """PostHog's ``/batch/`` endpoint for timing: answers 200 at once, checks afterwards.

    ``count`` (also ``GET /`` as ``{"events": n}``) is the number of distinct event UUIDs
    seen so far, and ``last_arrival`` the ``perf_counter()`` of the last new one; both
    from a regular-expression scan of the decompressed body. :meth:`check` parses every
    stored request with the collector's checks and returns the number of unique valid
    events; it raises when a request was refused.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[bytes] = set()
        self.last_arrival: float | None = None
        self.stored: list[tuple[bytes, str | None, str | None]] = []
        super().__init__(_capture_handler(self))

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def record(self, body: bytes, encoding: str | None, content_type: str | None) -> None:
        data = decode_body(body, content_encoding=encoding, content_type=content_type)
        uuids = _UUID.findall(data)
        now = time.perf_counter()
        with self.lock:
            self.stored.append((body, encoding, content_type))
            before = len(self.seen)
            self.seen.update(uuids)
            if len(self.seen) > before:
                self.last_arrival = now

    def check(self) -> int:
        """Unique events that pass the collector's checks. Raises RuntimeError when a
        stored request would have been refused, or the checked count differs from the
        counted one (the counting missed or invented events)."""
        uuids: set[str] = set()
        with self.lock:
            stored = list(self.stored)
            counted = len(self.seen)
        for body, encoding, content_type in stored:
            try:
                _, events = batch_payload(body, encoding, content_type=content_type)
            except (ValueError, OSError, EOFError, zlib.error) as exc:
                raise RuntimeError(f"the capture endpoint would refuse a request: {exc}") from exc
            uuids.update(str(e.get("uuid")) for e in events)
        if len(uuids) != counted:
            raise RuntimeError(f"{len(uuids)} events checked, {counted} counted on arrival")
        return len(uuids)


def _capture_handler(owner: DeferredCapture) -> type[BaseHTTPRequestHandler]:
    class Handler(_JsonHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.split("?", 1)[0] not in CAPTURE_PATHS:
                self._answer(404, {"error": "not found"})
                return
            try:
                owner.record(
                    body, self.headers.get("Content-Encoding"), self.headers.get("Content-Type")
                )
            except (ValueError, OSError, EOFError, zlib.error):
                self._answer(400, {"error": "invalid payload"})
                return
            self._answer(200, {"status": "Ok"})

        def do_GET(self) -> None:
            self._answer(200, {"events": owner.count})

    return Handler


class SentryReceiver(_Loopback):
    """Counts events of Sentry envelopes posted to ``/api/<id>/envelope/``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.event_ids: set[str] = set()
        self.items: dict[str, int] = {}
        self.last_arrival: float | None = None
        self.bad_requests = 0
        super().__init__(_sentry_handler(self))

    @property
    def dsn(self) -> str:
        return f"http://bench@127.0.0.1:{self.port}/1"

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.event_ids)

    def record(self, body: bytes) -> None:
        from sentry_sdk.envelope import Envelope

        envelope = Envelope.deserialize(body)
        now = time.perf_counter()
        with self.lock:
            for item in envelope.items:
                kind = item.type or "?"
                self.items[kind] = self.items.get(kind, 0) + 1
                if kind == "event":
                    event = item.get_event() or {}
                    event_id = event.get("event_id") or envelope.headers.get("event_id")
                    if event_id and event_id not in self.event_ids:
                        self.event_ids.add(event_id)
                        self.last_arrival = now


def _sentry_handler(owner: SentryReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(_JsonHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.path.split("?", 1)[0].endswith("/envelope/"):
                self._answer(404, {"detail": "not found"})
                return
            try:
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                owner.record(body)
            except (ValueError, OSError, EOFError):
                with owner.lock:
                    owner.bad_requests += 1
                self._answer(400, {"detail": "bad envelope"})
                return
            self._answer(200, {})

        def do_GET(self) -> None:
            self._answer(200, {"events": owner.count})

    return Handler


class Receivers:
    """A fresh CaptureServer and SentryReceiver for one benchmark run. Context manager."""

    def __init__(self) -> None:
        self.capture = DeferredCapture()
        self.sentry = SentryReceiver()

    def __enter__(self) -> Receivers:
        self.capture.start()
        self.sentry.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.capture.close()
        self.sentry.close()

    def delivered(self, config: str) -> tuple[int, float | None]:
        """(unique events received, perf_counter of the last new one) for ``config``.
        For the capture API, the checked count: raises RuntimeError as
        :meth:`DeferredCapture.check` does."""
        if config == "sentry":
            with self.sentry.lock:
                return len(self.sentry.event_ids), self.sentry.last_arrival
        return self.capture.check(), self.capture.last_arrival

    def status_url(self, config: str) -> str:
        """Where a driver polls ``{"events": n}`` for ``config``."""
        return self.sentry.url if config == "sentry" else self.capture.url
