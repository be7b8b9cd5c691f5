"""The HTTP side of the loopback collector: routing, CORS, answers.

``POST`` capture paths (``/batch/``, ``/i/v0/e/``, ``/e/``, ``/capture/``) and capture v1
(``/i/v1/analytics/events``) store events through :class:`~task_scopes.collector.CaptureServer`;
``/flags/`` and ``/decide/`` answer "no flags"; ``GET /array/<key>/config[.js]`` answers
an empty remote config; ``OPTIONS`` answers CORS preflights from loopback pages; ``GET /``
answers the status. Everything else is 404. A ``POST`` from a page that is not on a loopback
origin (its ``Origin`` header) is refused with 403; requests without ``Origin`` (SDKs,
scripts) are not browser requests and are served.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from ._browser_api import (
    FLAGS_PATHS,
    answer_flags,
    answer_get,
    cors_headers,
    is_loopback_origin,
    preflight_headers,
)

if TYPE_CHECKING:
    from .collector import CaptureServer

__all__ = ["CAPTURE_PATHS", "MAX_BODY", "V1_PATHS", "make_handler"]

CAPTURE_PATHS = ("/batch", "/batch/", "/i/v0/e", "/i/v0/e/", "/capture", "/capture/", "/e", "/e/")
# PostHog's capture v1 (posthog>=7, capture_mode="v1"): bearer key, per-event results.
V1_PATHS = ("/i/v1/analytics/events", "/i/v1/analytics/events/")
MAX_BODY = 20 * 1024 * 1024


def make_handler(owner: CaptureServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``owner``, which records and stores what arrives."""
    # Imported here: collector imports this module, and its parsers are what it validates.
    from .collector import batch_payload, parse_v1_payload

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "task_scopes-collector"
        # headers and body go out in two writes; with Nagle on, the second waits for the
        # client's delayed ACK (~40 ms a request on Linux keep-alive connections)
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def setup(self) -> None:
            super().setup()
            with owner._cv:
                owner._connections.add(self.connection)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                with owner._cv:
                    owner._connections.discard(self.connection)

        def _answer(
            self,
            status: int,
            body: dict[str, Any] | bytes,
            headers: Mapping[str, str],
            content_type: str = "application/json",
        ) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (cors_headers(self.headers.get("Origin")) | dict(headers)).items():
                self.send_header(key, value)
            try:
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                # the client gave up waiting (its timeout) or the server is stopping
                self.close_connection = True

        def do_POST(self) -> None:
            received = time.monotonic()
            path, _, query_string = self.path.partition("?")
            length = int(self.headers.get("Content-Length") or 0)
            encoding = self.headers.get("Content-Encoding")
            if length > MAX_BODY:
                owner._record(path, 413, [], received, encoding, length)
                self._answer(413, {"error": "payload too large"}, {})
                self.close_connection = True
                return
            body = self.rfile.read(length)
            if not is_loopback_origin(self.headers.get("Origin"), absent=True):
                # A page elsewhere on the web, posting through the developer's browser.
                owner._record(path, 403, [], received, encoding, len(body))
                self._answer(403, {"error": "origin is not a loopback page"}, {})
            elif path in FLAGS_PATHS:
                owner._record(path, 200, [], received, encoding, len(body))
                self._answer(200, answer_flags(path, parse_qs(query_string)), {})
            elif path in CAPTURE_PATHS or path in V1_PATHS:
                self._capture(path, parse_qs(query_string), body, received)
            else:
                owner._record(path, 404, [], received, encoding, len(body))
                self._answer(404, {"error": "not found"}, {})

        def _capture(
            self, path: str, query: Mapping[str, list[str]], body: bytes, received: float
        ) -> None:
            encoding = self.headers.get("Content-Encoding")
            reply = owner._next_reply()
            if reply.delay:
                time.sleep(reply.delay)
            if reply.status != 200:
                owner._record(path, reply.status, [], received, encoding, len(body))
                self._answer(reply.status, {"error": "scripted"}, reply.headers)
                return
            v1 = path in V1_PATHS
            try:
                if v1:
                    authorization = self.headers.get("Authorization")
                    events = parse_v1_payload(body, encoding, authorization)
                    api_key = (authorization or "")[7:]
                else:
                    api_key, events = batch_payload(
                        body,
                        encoding,
                        content_type=self.headers.get("Content-Type"),
                        compression=query.get("compression", [None])[-1],
                    )
            except (ValueError, OSError, EOFError, zlib.error) as exc:
                owner._record(path, 400, [], received, encoding, len(body))
                self._answer(400, {"error": f"invalid payload: {exc}"}, {})
                return
            owner._record(path, 200, events, received, encoding, len(body), api_key)
            if v1:
                results = {e.get("uuid"): {"result": "ok"} for e in events if e.get("uuid")}
                self._answer(200, {"results": results}, reply.headers)
            else:
                self._answer(200, {"status": "Ok"}, reply.headers)

        def do_GET(self) -> None:
            received = time.monotonic()
            path, _, query_string = self.path.partition("?")
            config = answer_get(path)
            if config is not None:
                owner._record(path, 200, [], received)
                self._answer(200, config[1], {}, content_type=config[0])
            elif path in FLAGS_PATHS:
                owner._record(path, 200, [], received)
                self._answer(200, answer_flags(path, parse_qs(query_string)), {})
            elif path == "/":
                self._answer(200, {"status": "ok", "events": len(owner.events)}, {})
            else:
                owner._record(path, 404, [], received)
                self._answer(404, {"error": "not found"}, {})

        def do_OPTIONS(self) -> None:
            # A CORS preflight: posthog-js sending JSON (or the app's request_headers) to
            # the collector from a page on another port.
            received = time.monotonic()
            path = self.path.partition("?")[0]
            headers = preflight_headers(
                self.headers.get("Origin"), self.headers.get("Access-Control-Request-Headers")
            )
            if headers is None:
                owner._record(path, 403, [], received)
                self._answer(403, {"error": "origin is not a loopback page"}, {})
                return
            owner._record(path, 204, [], received)
            self.send_response(204)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
