"""Transports: where batches of serialized events go.

A batch is a list of JSON strings, one event each, already bounded by the consumer
(<= 5 MiB). ``send()`` returns how many of them were *not* delivered; it may block (the
consumer thread calls it) but must not raise for delivery failures. Subclass
:class:`BaseTransport` and override what you need.
"""

from __future__ import annotations

import gzip as _gzip
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from . import _capture_rules, _defaults
from ._internal import RateLimitedLog, logger
from ._version import __version__

__all__ = [
    "BaseTransport",
    "HttpTransport",
    "InMemoryTransport",
    "JsonlTransport",
    "Transport",
    "batch_body",
    "describe_failure",
]

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@runtime_checkable
class Transport(Protocol):
    """What the client hands batches to; :class:`BaseTransport` implements the hooks."""

    def send(self, batch: Sequence[str]) -> int:
        """Deliver ``batch`` (JSON event strings). Returns the number not delivered."""

    def close(self) -> None:
        """Release connections and files."""

    def after_fork_in_child(self) -> None:
        """Replace locks and connections inherited from the parent after ``os.fork()``."""


class BaseTransport:
    """Base class of transports: ``send()`` to implement, hooks that do nothing by default."""

    def send(self, batch: Sequence[str]) -> int:
        """Deliver ``batch`` (JSON event strings, one event each). Returns the number not
        delivered. Called from the consumer thread only; may block, must not raise for
        delivery failures."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and files. ``Client.shutdown()`` does not call it, since a
        shut-down client starts again on its next ``capture()``; whoever made the
        transport closes it when done with it. Does nothing by default."""

    def after_fork_in_child(self) -> None:
        """Called by the client in the child after ``os.fork()``: replace locks and
        connections inherited from the parent (a lock held by the parent's consumer
        thread at the fork would never be released in the child). Does nothing by
        default."""


def batch_body(api_key: str, batch: Sequence[str]) -> bytes:
    """The ``/batch/`` request body for pre-serialized events, as UTF-8 bytes."""
    sent_at = json.dumps(datetime.now(timezone.utc).isoformat())
    return (
        f'{{"api_key":{json.dumps(api_key)},"batch":[{",".join(batch)}],"sent_at":{sent_at}}}'
    ).encode()


# urllib3 names the connection object or pool in front of the cause; the host is logged
# apart, so drop it: "HTTPConnection(host='h', port=9): Failed to establish..." -> "Failed..."
_POOL_PREFIX = re.compile(r"^(?:<[^<>]* object at 0x[0-9a-fA-F]+>|\w+\(host=[^)]*\)):\s*")


def describe_failure(exc: BaseException) -> str:
    """The cause of a failed request, for a log line: the innermost error requests and
    urllib3 wrapped (a read timeout, connection refused...) and its message, without the
    pool or connection prefix. Never the URL's credentials, the payload or the API key."""
    inner: BaseException = exc
    for _ in range(5):  # requests' ConnectionError(MaxRetryError(reason=...)), at most
        reason = getattr(inner, "reason", None)
        if isinstance(reason, BaseException):
            inner = reason
        elif inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        else:
            break
    text = _POOL_PREFIX.sub("", str(inner))[:300]
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


class _FailureNote:
    """The last failure of the request being retried, shared by the ``Retry`` copies
    urllib3 makes, so that an exit flush can say why a batch is still being retried."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: str | None = None


class _WindowRetry(Retry):
    """urllib3 ``Retry`` that also gives up once ``window`` seconds passed since the first
    failure of this request, however many attempts that took, and notes each failure."""

    window: float = _defaults.RETRY_WINDOW
    note: _FailureNote | None = None
    _first_failure: float | None = None

    def new(self, **kw: Any) -> _WindowRetry:
        retry = super().new(**kw)
        retry.window = self.window
        retry.note = self.note
        retry._first_failure = self._first_failure
        return retry

    def increment(self, *args: Any, **kwargs: Any) -> _WindowRetry:
        first = self._first_failure if self._first_failure is not None else time.monotonic()
        if self.note is not None:
            error, response = kwargs.get("error"), kwargs.get("response")
            if error is not None:
                self.note.last = describe_failure(error)
            elif response is not None:
                self.note.last = f"answered {response.status}"
        retry = super().increment(*args, **kwargs)
        retry._first_failure = first
        return retry

    def is_exhausted(self) -> bool:
        if self._first_failure is not None and time.monotonic() - self._first_failure > self.window:
            return True
        return bool(super().is_exhausted())

    def sleep_for_retry(self, response: Any) -> bool:
        """Wait what ``Retry-After`` asks, but no longer than what is left of the window:
        a collector answering ``Retry-After: 3600`` must not park the consumer for an
        hour while ``capture()`` fills the queue."""
        retry_after = self.get_retry_after(response)
        if not retry_after:  # absent or 0: the exponential backoff applies (as urllib3)
            return False
        if self._first_failure is not None:
            left = self.window - (time.monotonic() - self._first_failure)
            retry_after = min(retry_after, max(left, 0.0))
        time.sleep(retry_after)
        return True


class _QuietConsumerRetries(logging.Filter):
    """Drops urllib3's per-attempt "Retrying (...)" warnings logged from our consumer
    thread; the transport logs a rate-limited line of its own when it gives up. Records
    from the host application's threads pass untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno <= logging.WARNING
            and threading.current_thread().name.startswith("task_scopes-consumer")
        )


logging.getLogger("urllib3.connectionpool").addFilter(_QuietConsumerRetries())


class HttpTransport(BaseTransport):
    """POSTs batches to ``{host}/batch/`` in PostHog's capture format over ``requests``.

    One ``requests.Session`` per process (replaced after ``os.fork()``). Connection errors,
    408, 429 and 5xx are retried with exponential backoff plus jitter, honouring
    ``Retry-After``, until ``retry_window`` seconds have passed since the first failure (or
    ``max_retries`` attempts, if given); a 413 splits the batch in two; any other 4xx drops
    the batch and logs its size (never its content, never the API key). A redirect (3xx)
    is not followed (``requests`` would re-send the batch as a ``GET``): it is a failure,
    logged with the status and where it points. Failures are logged with their cause
    (connection refused, read timeout...) and the collector's origin, once per 30 s per
    kind of failure.

    Args:
        api_key: project API key (``phc_...``).
        host: base URL, e.g. ``https://eu.i.posthog.com``.
        timeout: seconds (float) for connect and for each read.
        gzip: compress request bodies (``Content-Encoding: gzip``).
        retry_window: seconds (float) a batch is retried before it is given up.
        max_retries: cap on attempts besides the window; None means the window alone.
        backoff_factor: seconds; waits are ``factor * 2**n`` capped at 4 s, plus jitter.
    """

    def __init__(
        self,
        api_key: str,
        host: str = _defaults.HOST,
        *,
        timeout: float = _defaults.TIMEOUT,
        gzip: bool = True,
        retry_window: float = _defaults.RETRY_WINDOW,
        max_retries: int | None = None,
        backoff_factor: float = 0.5,
    ) -> None:
        self.api_key = api_key
        self.url = host.rstrip("/") + "/batch/"
        # scheme://host:port: what log lines name (a user:password@ in host stays out)
        self.origin = _origin(self.url)
        self.timeout = timeout
        self.gzip = gzip
        self._note = _FailureNote()
        retry = _WindowRetry(
            total=max_retries if max_retries is not None else 10_000,
            connect=None,
            read=None,
            status=None,
            other=0,
            redirect=0,  # a POST answered with a redirect is a failure, never followed
            raise_on_redirect=False,
            allowed_methods=None,  # POST is safe to retry: event UUIDs are idempotent
            status_forcelist=RETRY_STATUSES,
            backoff_factor=backoff_factor,
            backoff_max=_defaults.RETRY_BACKOFF_MAX,  # resume soon after the collector returns
            backoff_jitter=backoff_factor,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        retry.window = retry_window
        retry.note = self._note
        self._retry = retry
        self._log = RateLimitedLog(30.0)
        self._lock = threading.Lock()
        self._session = self._new_session()

    def _new_session(self) -> requests.Session:
        session = self._make_session()
        # One prepared POST per session, copied for each batch: preparing a request
        # (URL parsing, merging the session's headers, hooks, auth) costs the consumer
        # about a third of a send. The capture API sets no cookies, so none is merged.
        headers = {"Content-Encoding": "gzip"} if self.gzip else {}
        self._template = session.prepare_request(
            requests.Request("POST", self.url, headers=headers, data=b"")
        )
        return session

    def _make_session(self) -> requests.Session:
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=self._retry, pool_connections=1, pool_maxsize=2)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update(
            {"Content-Type": "application/json", "User-Agent": f"task_scopes/{__version__}"}
        )
        # What requests would read from the environment on every POST (proxy variables
        # with no_proxy, the CA bundle variables), resolved once per session: the consumer
        # POSTs to one URL, and per-request look-ups cost it more than the send. No
        # ~/.netrc: the capture API takes its key in the body.
        proxies = requests.utils.get_environ_proxies(self.url)
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        session.trust_env = False
        session.proxies.update(proxies)
        # Only where TLS is spoken (the host or a proxy): a CA bundle path makes requests
        # stat() it on every POST, a system call after which the consumer waits for the
        # GIL (see Consumer).
        tls = [self.url, *proxies.values()]
        if ca_bundle and any(urlsplit(str(url)).scheme.lower() == "https" for url in tls):
            session.verify = ca_bundle
        return session

    def after_fork_in_child(self) -> None:
        """Drop the connections inherited from the parent; the child opens its own."""
        self._lock = threading.Lock()
        self._log = RateLimitedLog(30.0)
        self._session = self._new_session()

    @property
    def last_failure(self) -> str | None:
        """Why the last attempt failed, e.g. ``"NewConnectionError: Failed to establish a
        new connection: [Errno 111] Connection refused"`` or ``"answered 503"``; None
        after a delivery. Also while a batch is still being retried."""
        return self._note.last

    def send(self, batch: Sequence[str]) -> int:
        if not batch:
            return 0
        body = batch_body(self.api_key, batch)
        if self.gzip:
            # Level 1: a third of the CPU of level 5 for about a tenth more bytes on
            # batches of events (which repeat their keys); the consumer shares the GIL
            # with the application, the network has room.
            body = _gzip.compress(body, compresslevel=1, mtime=0)
        started = time.monotonic()
        try:
            with self._lock:
                request = self._template.copy()
                request.body = body
                request.headers["Content-Length"] = str(len(body))
                response = self._session.send(request, timeout=self.timeout, allow_redirects=False)
        except requests.RequestException as exc:
            cause = describe_failure(exc)
            self._note.last = cause
            self._log.log(
                logging.ERROR,
                "task_scopes: gave up on a batch of %d events (%d bytes) to %s after %.1f s: %s",
                len(batch),
                len(body),
                self.origin,
                time.monotonic() - started,
                cause,
                key=cause.split(":", 1)[0],
            )
            return len(batch)
        status = response.status_code
        location = response.headers.get("Location")
        response.close()
        if status < 300:
            self._note.last = None
            return 0
        if status == 413 and len(batch) > 1:
            half = len(batch) // 2
            return self.send(batch[:half]) + self.send(batch[half:])
        self._note.last = f"{self.origin} answered {status}"
        if status < 400:
            self._log.log(
                logging.ERROR,
                "task_scopes: %s answered %d, a redirect to %s, to a batch of %d events "
                "(%d bytes): not delivered, since a redirect would re-send it as GET; "
                "set the host to where it points",
                self.origin,
                status,
                _redacted(location),
                len(batch),
                len(body),
                key=status,
            )
            return len(batch)
        self._log.log(
            logging.ERROR,
            "task_scopes: collector answered %d; dropped a batch of %d events (%d bytes) to %s",
            status,
            len(batch),
            len(body),
            self.origin,
            key=status,
        )
        return len(batch)

    def close(self) -> None:
        self._session.close()


class InMemoryTransport(BaseTransport):
    """Keeps every delivered event as a dict in ``events`` (tests, ``capture_events()``).

    As strict as PostHog's capture endpoint (``task_scopes._capture_rules``): a batch
    holding one event PostHog would refuse is refused whole, logged and counted as
    failed, so a test sees what production would do with it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log = RateLimitedLog(30.0)
        self.events: list[dict[str, Any]] = []

    def send(self, batch: Sequence[str]) -> int:
        parsed = []
        for item in batch:
            problem, event = _strict_event(item)
            if problem:
                self._log.log(
                    logging.ERROR,
                    "task_scopes: InMemoryTransport refused a batch of %d events, as "
                    "PostHog would: %s",
                    len(batch),
                    problem,
                    key=problem,
                )
                return len(batch)
            parsed.append(event)
        with self._lock:
            self.events.extend(parsed)
        return 0

    def clear(self) -> None:
        """Forget the events received so far."""
        with self._lock:
            self.events.clear()

    def after_fork_in_child(self) -> None:
        """A new lock: the parent's consumer may have held the old one at the fork."""
        self._lock = threading.Lock()


def _strict_event(item: str) -> tuple[str | None, Any]:
    """``(problem, event)``: why PostHog would refuse the event JSON ``item`` (None if
    it would not), and the event parsed."""
    size = len(item.encode("utf-8", "surrogatepass"))
    if size > _capture_rules.MAX_EVENT_BYTES:
        return f"event of {size} bytes, over {_capture_rules.MAX_EVENT_BYTES}", None
    try:
        # with the two levels of the /batch/ body ({"batch": [...]}) around it
        event = _capture_rules.loads(f'{{"batch":[{item}]}}'.encode())["batch"][0]
    except ValueError as exc:
        return f"invalid JSON: {exc}", None
    return _capture_rules.event_problem(event), event


def _origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: no credentials, path or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def _redacted(url: str | None) -> str:
    """``url`` without credentials or query string, for a log line."""
    if not url:
        return "nowhere (no Location)"
    parts = urlsplit(url)
    if not parts.scheme:
        return parts.path[:200]
    return (_origin(url) + parts.path)[:200]


class JsonlTransport(BaseTransport):
    """Appends each event as one JSON line to ``path`` (offline and local development).

    Safe across processes for lines under the pipe-buffer size: each batch is one
    ``write()`` on a file opened with ``O_APPEND``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def send(self, batch: Sequence[str]) -> int:
        data = "".join(item + "\n" for item in batch)
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as fh:
                fh.write(data)
        except OSError:
            logger.exception("task_scopes: cannot write %d events to %s", len(batch), self.path)
            return len(batch)
        return 0

    def after_fork_in_child(self) -> None:
        """A new lock: the parent's consumer may have held the old one at the fork."""
        self._lock = threading.Lock()
