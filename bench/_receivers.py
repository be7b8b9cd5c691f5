"""Loopback receivers the benchmark counts events with, run in the orchestrating process.

* PostHog's capture API (task_scopes and PostHog send here): ``task_scopes.testing.
  CaptureServer``, with the arrival time of the last new event recorded.
* Sentry's envelope endpoint (``POST /api/<project>/envelope/``): :class:`SentryReceiver`,
  which counts ``event`` items, de-duplicated by event ID. ``GET /`` answers
  ``{"events": n}`` like ``CaptureServer`` does, so drivers poll both the same way.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from task_scopes.testing import CaptureServer


class SentryReceiver:
    """Counts events of Sentry envelopes posted to ``/api/<id>/envelope/``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.event_ids: set[str] = set()
        self.items: dict[str, int] = {}
        self.last_arrival: float | None = None
        self.bad_requests = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _sentry_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def dsn(self) -> str:
        return f"http://bench@127.0.0.1:{self.port}/1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.event_ids)

    def start(self) -> SentryReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

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
    class Handler(BaseHTTPRequestHandler):
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
        self.last_capture: float | None = None
        self.capture = CaptureServer(on_event=self._on_event)
        self.sentry = SentryReceiver()

    def _on_event(self, event: dict[str, Any]) -> None:
        self.last_capture = time.perf_counter()

    def __enter__(self) -> Receivers:
        self.capture.start()
        self.sentry.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.capture.close()
        self.sentry.close()

    def delivered(self, config: str) -> tuple[int, float | None]:
        """(unique events received, perf_counter of the last new one) for ``config``."""
        if config == "sentry":
            with self.sentry.lock:
                return len(self.sentry.event_ids), self.sentry.last_arrival
        return len(self.capture.events), self.last_capture

    def status_url(self, config: str) -> str:
        """Where a driver polls ``{"events": n}`` for ``config``."""
        return self.sentry.url if config == "sentry" else self.capture.url
