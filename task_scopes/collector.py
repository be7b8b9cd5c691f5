"""A loopback collector that speaks PostHog's capture API, for local work and tests.

``python -m task_scopes.collector --port 8000 --out events.jsonl`` accepts ``POST /batch/``
and ``POST /i/v0/e/`` (gzip or plain JSON) as PostHog does, and PostHog's capture v1
``POST /i/v1/analytics/events`` (bearer key; gzip or deflate), de-duplicates by event UUID
and writes one JSON event per line. It binds to 127.0.0.1 only. It is not a replacement
for PostHog in production.

It refuses, with 400 and as a whole, any request PostHog's capture endpoint would
refuse: invalid JSON or UTF-8, ``NaN``/``Infinity``, numbers beyond a 64-bit float,
nesting deeper than 127, bodies over 20 MiB, a malformed API key, an empty batch, or one
event with an empty or missing name, a missing or blank distinct ID, a malformed UUID,
wrongly typed fields or over 1,000,000 bytes. The rules, and where in PostHog's capture
service each comes from, are in ``task_scopes._capture_rules``; tests that send to this
collector therefore see what production would do with the same events.

It can also be posthog-js's ``api_host`` during local development, from a page on another
loopback port: CORS for loopback origins, posthog-js's body encodings on ``/e/`` and
``/i/v0/e/``, and answers to its remote config and flags requests for a project with
nothing configured (see :mod:`task_scopes._browser_api`). ``GET /`` answers the status.

In Python, :class:`CaptureServer` is the same server as a context manager, with the
events kept in memory and a script of failures (statuses, ``Retry-After``, delays) to
answer with, so transports are tested against a real socket.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from . import _capture_rules
from ._browser_api import decode_body, decompress
from ._collector_http import make_handler

__all__ = ["CaptureServer", "Reply", "RequestRecord", "main"]


@dataclass(frozen=True)
class Reply:
    """One scripted answer: ``status`` after ``delay`` seconds, with ``headers``.

    A status of 200 still stores the events; any other status stores nothing.
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


class RequestRecord(NamedTuple):
    """One answered request, as kept in :attr:`CaptureServer.request_log`.

    ``received``: ``time.monotonic()`` when the request arrived (before any scripted
    delay), seconds; ``encoding``: its ``Content-Encoding`` header or None; ``size``: body
    length in bytes as sent (compressed when gzip).
    """

    path: str
    status: int
    events: int
    received: float
    encoding: str | None
    size: int


def _as_reply(item: int | Reply | tuple[int, Mapping[str, str]]) -> Reply:
    if isinstance(item, Reply):
        return item
    if isinstance(item, int):
        return Reply(item)
    status, headers = item
    return Reply(status, dict(headers))


def _validate_event(event: Any) -> str | None:
    """Why PostHog's capture endpoint would refuse ``event``, or None; the rules, read
    from PostHog's capture service, are listed in ``task_scopes._capture_rules``."""
    return _capture_rules.event_problem(event)


def parse_payload(
    body: bytes,
    content_encoding: str | None,
    *,
    content_type: str | None = None,
    compression: str | None = None,
) -> list[dict[str, Any]]:
    """Decode a capture request body into its events, as strictly as PostHog's capture.

    Args:
        content_type, compression: the ``Content-Type`` header and the ``compression``
            query parameter, for posthog-js's encodings (a base64 ``data=`` form).

    Raises:
        ValueError: not gzip/base64/JSON, not UTF-8, ``NaN``/``Infinity`` or a number out of
            range, nested deeper than 127, over 20 MiB, a missing or malformed API key,
            no event, or one event PostHog refuses (an empty event name, a missing or
            blank distinct ID, a malformed UUID...): the whole request is refused.
    """
    return batch_payload(
        body, content_encoding, content_type=content_type, compression=compression
    )[1]


def batch_payload(
    body: bytes,
    content_encoding: str | None,
    *,
    content_type: str | None = None,
    compression: str | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """``(api_key, events)`` of a ``/batch/``-shaped request; raises as :func:`parse_payload`."""
    data = decode_body(
        body,
        content_encoding=content_encoding,
        content_type=content_type,
        compression=compression,
    )
    _check_size(data)
    return _capture_rules.batch_events(_capture_rules.loads(data), body_bytes=len(data))


def _check_size(data: bytes) -> None:
    if len(data) > _capture_rules.MAX_BODY_BYTES:  # PostHog stops decompressing there
        raise ValueError(f"body over {_capture_rules.MAX_BODY_BYTES} bytes")


def parse_v1_payload(
    body: bytes, content_encoding: str | None, authorization: str | None
) -> list[dict[str, Any]]:
    """Decode a PostHog capture v1 request into events of the ``/batch/`` shape
    (``session_id`` / ``window_id`` moved back to ``$session_id`` / ``$window_id``).

    Raises:
        ValueError: no ``Authorization: Bearer`` key, bad encoding or JSON, or an event of
            the wrong shape.
    """
    if not authorization or not authorization.startswith("Bearer ") or not authorization[7:]:
        raise ValueError("Authorization: Bearer <api key> missing")
    problem = _capture_rules.token_problem(authorization[7:])
    if problem:
        raise ValueError(problem)
    data = decompress(body, content_encoding)
    _check_size(data)
    payload = _capture_rules.loads(data)
    if not isinstance(payload, dict) or not isinstance(payload.get("batch"), list):
        raise ValueError("batch missing")
    events = []
    for item in payload["batch"]:
        if not isinstance(item, dict):
            raise ValueError("event is not an object")
        event = dict(item)
        props = event.get("properties")
        props = dict(props) if isinstance(props, dict) else props
        for wire_key, prop_key in (("session_id", "$session_id"), ("window_id", "$window_id")):
            if wire_key in event and isinstance(props, dict):
                props[prop_key] = event.pop(wire_key)
        event["properties"] = props
        problem = _validate_event(event)
        if problem:
            raise ValueError(problem)
        events.append(event)
    return events


class CaptureServer:
    """Loopback HTTP collector in a background thread. Context manager.

    Args:
        port: TCP port on 127.0.0.1; 0 picks a free one (see :attr:`url`).
        out: optional path; each new (non-duplicate) event is appended as one JSON line.
        on_event: optional callback ``(event_dict) -> None`` for each new event.

    Attributes:
        events: unique events received, in arrival order (dicts as sent).
        duplicates: events received again under a UUID already seen.
        requests: ``(path, status, events_in_request)`` of every request answered (CORS
            preflights, remote config and flags requests included; ``GET /`` not).
        request_log: the same requests as :class:`RequestRecord`\\ s, with arrival time,
            content encoding and body size (e.g. to check a ``Retry-After`` was waited).

    Example::

        with CaptureServer() as server:
            client = Client("phc_test", server.url)
            client.capture("x"); client.flush()
            assert server.wait_for(1)[0]["event"] == "x"
    """

    def __init__(
        self,
        port: int = 0,
        *,
        out: str | Path | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._port = port
        self._out_path = Path(out) if out is not None else None
        self._out: TextIO | None = None
        self._on_event = on_event
        self._cv = threading.Condition()
        self._script: deque[Reply] = deque()
        self._uuids: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.duplicates = 0
        self.requests: list[tuple[str, int, int]] = []
        self.request_log: list[RequestRecord] = []
        self._api_keys: dict[str, str] = {}
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Base URL to give a client as ``host``, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> CaptureServer:
        """Listen (again, on the same port after :meth:`stop`). Returns self."""
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", self._port), make_handler(self))
        if self._out_path is not None and self._out is None:
            try:
                self._out = open(self._out_path, "a", encoding="utf-8")  # noqa: SIM115
            except BaseException:
                server.server_close()  # no half-started server holding the port
                raise
        server.daemon_threads = True
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; connections are refused until :meth:`start`. Events are kept.

        Open keep-alive connections are shut too: otherwise a client's pooled connection
        would still be served by its handler thread and the server would not look down.
        """
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._cv:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by its handler
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def close(self) -> None:
        """Stop and close the output file."""
        self.stop()
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> CaptureServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scripting and assertions ----------------------------------------------------

    def script(self, *replies: int | Reply | tuple[int, Mapping[str, str]]) -> None:
        """Answer the next capture requests with these, in order, then 200 again.

        Items: a status (``500``), ``(429, {"Retry-After": "1"})``, or a :class:`Reply`
        (``Reply(200, delay=5.0)`` stalls five seconds, then accepts).
        """
        with self._cv:
            self._script.extend(_as_reply(r) for r in replies)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` unique events arrived or ``timeout`` seconds
        passed. Returns a copy of the events received (check its length)."""
        return self.wait_until(lambda events: len(events) >= count, timeout)

    def wait_until(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Wait until ``predicate(events)`` holds or ``timeout`` seconds passed.
        Returns a copy of the events received."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not predicate(self.events):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            return list(self.events)

    def api_key_of(self, event: Mapping[str, Any]) -> str | None:
        """The API key of the request that brought ``event`` (one of :attr:`events`)."""
        with self._cv:
            return self._api_keys.get(event.get("uuid", ""))

    def clear(self) -> None:
        """Forget events, duplicates, requests and the script (UUIDs seen are kept)."""
        with self._cv:
            self.events.clear()
            self.requests.clear()
            self.request_log.clear()
            self._script.clear()
            self.duplicates = 0

    # -- request handling --------------------------------------------------------------

    def _next_reply(self) -> Reply:
        with self._cv:
            return self._script.popleft() if self._script else Reply()

    def _record(
        self,
        path: str,
        status: int,
        events: Iterable[dict[str, Any]],
        received: float,
        encoding: str | None = None,
        size: int = 0,
        api_key: str | None = None,
    ) -> None:
        new: list[dict[str, Any]] = []
        events = list(events)
        with self._cv:
            self.requests.append((path, status, len(events)))
            self.request_log.append(
                RequestRecord(path, status, len(events), received, encoding, size)
            )
            if status == 200:
                for event in events:
                    uuid = event.get("uuid")
                    if uuid is not None:
                        if uuid in self._uuids:
                            self.duplicates += 1
                            continue
                        self._uuids.add(uuid)
                        if api_key is not None:
                            self._api_keys[uuid] = api_key
                    new.append(event)
                self.events.extend(new)
                if self._out is not None and new:
                    self._out.write("".join(json.dumps(e) + "\n" for e in new))
                    self._out.flush()
            self._cv.notify_all()
        if self._on_event is not None:
            for event in new:
                self._on_event(event)


def main(argv: list[str] | None = None) -> int:
    """Run the collector until interrupted. Prints ``listening on URL`` once ready.

    Returns 0 after an interrupt. A port out of range or in use, or an ``--out`` file that
    cannot be opened for appending, prints one line naming the problem on stderr and
    returns 2 (argparse's own usage errors exit 2 too).
    """
    parser = argparse.ArgumentParser(
        prog="python -m task_scopes.collector",
        description="Loopback collector speaking PostHog's capture API.",
    )
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any)")
    parser.add_argument("--out", default="events.jsonl", help="JSON lines file to append to")
    args = parser.parse_args(argv)
    server = _start(parser.prog, args.port, args.out)
    if server is None:
        return 2
    print(f"listening on {server.url} writing {args.out}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    print(f"received {len(server.events)} events ({server.duplicates} duplicates)", file=sys.stderr)
    return 0


def _start(prog: str, port: int, out: str) -> CaptureServer | None:
    """The started server, or None after printing why it cannot start."""
    problem = None
    if not 0 <= port <= 65535:
        problem = f"--port {port}: expected 0 to 65535"
    else:
        try:
            return CaptureServer(port, out=out).start()
        except OSError as exc:  # the port is bound first, then the file opened
            reason = exc.strerror or str(exc)
            if exc.filename is not None:
                problem = f"--out {out}: cannot append to it: {reason}"
            else:
                problem = f"--port {port}: cannot listen on 127.0.0.1:{port}: {reason}"
    print(f"{prog}: error: {problem}", file=sys.stderr)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
