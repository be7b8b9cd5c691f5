"""Client: builds events, queues them, and hands them to a consumer thread."""

from __future__ import annotations

import atexit
import logging
import os
import random
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, NamedTuple

from . import _defaults, _validate
from ._consumer import Consumer, Counters
from ._exceptions import exception_list, mark_captured
from ._internal import RateLimitedLog, guard, logger
from ._scope import merged_context, merged_groups
from ._transport import HttpTransport, Transport
from ._version import __version__

__all__ = ["Client", "ClientStats", "Event", "flush_all", "register_exit_flush"]

Event = dict[str, Any]
BeforeSend = Callable[[Event], "Event | None"]

_clients: weakref.WeakSet[Client] = weakref.WeakSet()
_clients_lock = threading.Lock()
# A debug client's own log lines go here (and to stderr); other clients never touch it.
debug_logger = logging.getLogger("task_scopes.debug")
_CAPTURE_GUARD = guard("capture")
_getrandbits = random.getrandbits  # reseeded after os.fork() by the random module


def uuid7() -> str:
    """A new UUIDv7 string (RFC 9562): 48-bit Unix milliseconds, then 74 random bits.

    Time-ordered, as PostHog prefers for event UUIDs, and about four times cheaper than
    ``str(uuid.uuid4())``, which reads ``os.urandom`` and builds a ``UUID`` per call. The
    collector de-duplicates on it, which needs uniqueness, not unpredictability.
    """
    rand = _getrandbits(74)
    value = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76
        | (rand >> 62) << 64
        | 0x2 << 62
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class ClientStats(NamedTuple):
    """Counters of one client in this process since it started (or since ``os.fork()``).

    ``captured``: events accepted by ``capture()``; ``queued``: waiting for the consumer;
    ``in_flight``: in the batch being sent; ``delivered``; ``failed``: given up by the
    transport; ``dropped``: refused (queue full, too large, unserializable,
    ``before_send``).
    """

    captured: int
    queued: int
    in_flight: int
    delivered: int
    failed: int
    dropped: int


class Client:
    """Sends events in PostHog's capture format, in batches, from a background thread.

    ``capture()`` never blocks on the network and never raises: it builds the event from
    the active scopes, appends it to a bounded in-memory queue and returns its UUID.

    Args:
        api_key: project API key; None (and no ``transport``) makes a disabled client.
        host: capture host, e.g. ``https://eu.i.posthog.com``.
        flush_at: queued events (int >= 1) that wake the consumer to send at once.
        flush_interval: seconds (float) a partial batch may wait.
        max_queue_size: events held in memory; a capture beyond it is dropped and counted.
        timeout: seconds (float) per HTTP attempt.
        max_retries: cap on HTTP attempts per batch; None retries for ``retry_window``.
        retry_window: seconds (float) a failing batch is retried before it is given up.
        gzip: gzip request bodies.
        transport: where batches go; default :class:`HttpTransport` to ``host``.
        before_send: ``(event) -> event | None``; None drops the event.
        disabled: accept nothing; ``capture()`` returns None.
        debug: log this client's captures and deliveries at DEBUG on the
            ``task_scopes.debug`` logger, which then also writes to stderr. Nothing
            process-wide changes: other clients log as before.

    Raises:
        TypeError / ValueError: an option of the wrong type or out of range, naming it
            (counts are ints >= 1, ``max_retries`` >= 0; seconds finite and > 0; ``host``
            an ``http(s)://`` URL with a host; ``api_key`` a non-empty string or None).
    """

    def __init__(
        self,
        api_key: str | None = None,
        host: str = _defaults.HOST,
        *,
        flush_at: int = _defaults.FLUSH_AT,
        flush_interval: float = _defaults.FLUSH_INTERVAL,
        max_queue_size: int = _defaults.MAX_QUEUE_SIZE,
        timeout: float = _defaults.TIMEOUT,
        max_retries: int | None = None,
        retry_window: float = _defaults.RETRY_WINDOW,
        gzip: bool = True,
        transport: Transport | None = None,
        before_send: BeforeSend | None = None,
        disabled: bool = False,
        debug: bool = False,
    ) -> None:
        api_key = _validate.optional_text("api_key", api_key)
        host = _validate.http_url("host", host)
        flush_at = _validate.count("flush_at", flush_at)
        flush_interval = _validate.seconds("flush_interval", flush_interval)
        max_queue_size = _validate.count("max_queue_size", max_queue_size)
        timeout = _validate.seconds("timeout", timeout)
        max_retries = _validate.optional_count("max_retries", max_retries)
        retry_window = _validate.seconds("retry_window", retry_window)
        gzip = _validate.boolean("gzip", gzip)
        disabled = _validate.boolean("disabled", disabled)
        debug = _validate.boolean("debug", debug)
        before_send = _validate.optional_callable("before_send", before_send)
        if transport is not None and not callable(getattr(transport, "send", None)):
            raise TypeError(
                "transport: expected a task_scopes.BaseTransport (an object with "
                f"send(batch)), got {type(transport).__name__}"
            )
        self.api_key = api_key
        self.host = host
        self.flush_at = flush_at
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.before_send = before_send
        self.disabled = disabled or (api_key is None and transport is None)
        if transport is None and not self.disabled:
            assert api_key is not None
            transport = HttpTransport(
                api_key,
                host,
                timeout=timeout,
                gzip=gzip,
                retry_window=retry_window,
                max_retries=max_retries,
            )
        self.transport = transport
        self.debug = debug
        if debug:
            _enable_debug_logging()
        self._reset()
        with _clients_lock:
            _clients.add(self)

    def _reset(self) -> None:
        """Fresh per-process state: queue, locks, consumer (started lazily), counters."""
        self._queue: deque[Event] = deque()
        self._start_lock = threading.Lock()
        self._consumer: Consumer | None = None
        self._counters = Counters()
        self._log = RateLimitedLog(60.0)

    def _after_fork_in_child(self) -> None:
        self._reset()
        if self.transport is not None:
            self.transport.after_fork_in_child()

    def __repr__(self) -> str:
        state = "disabled" if self.disabled else self.host
        return f"<task_scopes.Client {state}>"

    # -- capture -----------------------------------------------------------------

    def capture(
        self,
        event: str,
        *,
        distinct_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        timestamp: datetime | str | None = None,
        uuid: str | None = None,
        groups: Mapping[str, str | int] | None = None,
    ) -> str | None:
        """Queue one event attributed from the active scopes. Never blocks, never raises.

        Args:
            event: event name, e.g. ``"order_processed"``.
            distinct_id: overrides the scopes' distinct ID for this event.
            properties: event properties; they win over tags of the same name.
            timestamp: when it happened (aware datetime or ISO 8601); default now, UTC.
            uuid: event UUID (str); default a new UUIDv7. The collector dedupes on it.
            groups: group type -> group key, e.g. ``{"company": "acme"}``; merged over the
                scopes' groups (and a ``$groups`` dict in ``properties``) into the
                ``$groups`` property, as posthog-python sends them.

        Returns:
            The event UUID, or None when the client is disabled or dropped the event (the
            reason is logged).
        """
        if self.disabled:
            self._log.log(logging.DEBUG, "task_scopes: client disabled; event not sent")
            return None
        with _CAPTURE_GUARD:
            ctx_distinct_id, session_id, props, window_id = merged_context()
            if properties:
                props.update(properties)
            event_groups = merged_groups()
            if event_groups or groups:
                explicit = props.get("$groups")
                if isinstance(explicit, Mapping):
                    event_groups.update(explicit)
                event_groups.update(groups or {})
                props["$groups"] = event_groups
            if session_id is not None and "$session_id" not in props:
                props["$session_id"] = session_id
            if window_id is not None and "$window_id" not in props:
                props["$window_id"] = window_id
            if distinct_id is None:
                distinct_id = ctx_distinct_id
            if distinct_id is None:
                distinct_id = uuid7()
                props.setdefault("$process_person_profile", False)
            props["$lib"] = "task_scopes"
            props["$lib_version"] = __version__
            if timestamp is None:
                ts = datetime.now(timezone.utc).isoformat()
            elif isinstance(timestamp, datetime):
                ts = timestamp.isoformat()
            else:
                ts = str(timestamp)
            uid = uuid if uuid is not None else uuid7()
            message: Event = {
                "event": event,
                "distinct_id": str(distinct_id),
                "properties": props,
                "timestamp": ts,
                "uuid": uid,
            }
            if self.before_send is not None:
                kept = self.before_send(message)
                if kept is None:
                    self._count_drop()
                    logger.debug("task_scopes: before_send dropped event %r", event)
                    return None
                message = kept
            if not self._enqueue(message):
                return None
            if self.debug:
                debug_logger.debug("task_scopes: %r captured event %r (%s)", self, event, uid)
            return uid
        return None

    def capture_exception(
        self,
        exc: BaseException | None = None,
        *,
        distinct_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        mechanism: str = "generic",
        handled: bool = True,
    ) -> str | None:
        """Capture ``exc`` (default: the one being handled) as an ``$exception`` event.

        The same exception object is sent once however often it is captured.

        Args:
            exc: the exception; None takes ``sys.exc_info()``.
            mechanism: what caught it (``"celery"``, ``"new_context"``...).
            handled: False when it escaped the user's code.

        Returns:
            The event UUID; None when there is no exception, it was captured before, or
            the client is disabled or dropped the event.
        """
        if exc is None:
            exc = sys.exc_info()[1]
        if exc is None or self.disabled:
            return None
        with guard("capture_exception"):
            if not mark_captured(exc):
                return None
            props: dict[str, Any] = {
                "$exception_list": exception_list(exc, mechanism=mechanism, handled=handled),
                "$exception_type": type(exc).__name__,
                "$exception_message": str(exc)[:2_000],
            }
            if properties:
                props.update(properties)
            return self.capture("$exception", distinct_id=distinct_id, properties=props)
        return None

    def set(self, *, distinct_id: str | None = None, properties: Mapping[str, Any]) -> str | None:
        """Set person properties (``$set``) on the given or the scopes' distinct ID."""
        return self.capture("$set", distinct_id=distinct_id, properties={"$set": dict(properties)})

    def set_once(
        self, *, distinct_id: str | None = None, properties: Mapping[str, Any]
    ) -> str | None:
        """Set person properties only where unset (``$set_once``)."""
        return self.capture(
            "$set", distinct_id=distinct_id, properties={"$set_once": dict(properties)}
        )

    def _count_drop(self) -> None:
        counters = self._counters
        with counters.cv:
            counters.dropped += 1

    def _enqueue(self, message: Event) -> bool:
        queue = self._queue
        if len(queue) >= self.max_queue_size:
            self._count_drop()
            self._log.warning(
                "task_scopes: queue full (%d events); dropping new events", self.max_queue_size
            )
            return False
        queue.append(message)
        consumer = self._consumer
        if consumer is None:
            consumer = self._start()
        if len(queue) >= self.flush_at:
            consumer.wake()
        return True

    def _start(self) -> Consumer:
        with self._start_lock:
            if self._consumer is None:
                assert self.transport is not None
                consumer = Consumer(
                    self._queue,
                    self.transport,
                    self._counters,
                    flush_at=self.flush_at,
                    flush_interval=self.flush_interval,
                )
                consumer.start()
                self._consumer = consumer
            return self._consumer

    # -- flush / shutdown ----------------------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> int:
        """Send everything queued now, whatever ``flush_interval`` says.

        Args:
            timeout: seconds (float) to wait; None waits forever.

        Returns:
            The number of events still undelivered (queued or in flight) when it returned.
        """
        consumer = self._consumer
        if consumer is None:
            return len(self._queue)
        return consumer.wait_idle(timeout)

    def shutdown(self, timeout: float | None = 10.0) -> int:
        """Flush, then stop the consumer thread. A later ``capture()`` starts a new one.

        Args:
            timeout: seconds (float) for flush and stop together; None waits forever.

        Returns:
            The number of events still undelivered.
        """
        with self._start_lock:
            consumer, self._consumer = self._consumer, None
        if consumer is None:
            return len(self._queue)
        undelivered = consumer.wait_idle(timeout)
        consumer.stop()
        if undelivered == 0:
            consumer.join(timeout)
        return undelivered

    def stats(self) -> ClientStats:
        """A snapshot of this client's counters in this process."""
        counters = self._counters
        with counters.cv:
            queued = len(self._queue)
            return ClientStats(
                captured=counters.taken + queued,
                queued=queued,
                in_flight=counters.in_flight,
                delivered=counters.delivered,
                failed=counters.failed,
                dropped=counters.dropped,
            )


def _enable_debug_logging() -> None:
    if not debug_logger.handlers:
        debug_logger.addHandler(logging.StreamHandler())
    debug_logger.setLevel(logging.DEBUG)


def live_clients() -> list[Client]:
    """Every enabled client of this process that is still referenced."""
    with _clients_lock:
        return [client for client in _clients if not client.disabled]


def flush_all(timeout: float | None, *, stop: bool = False) -> int:
    """Flush every enabled client (``stop=True``: shut each down), within one deadline.

    Args:
        timeout: seconds (float) for all clients together; None waits forever.
        stop: shut the clients down after flushing (a later ``capture()`` restarts one).

    Returns:
        The number of events still undelivered, summed over the clients.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    left = 0
    for client in live_clients():
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        left += client.shutdown(remaining) if stop else client.flush(remaining)
    return left


_exit_flush_registered = False
_exit_timeout = _defaults.SHUTDOWN_TIMEOUT


def _flush_at_exit() -> None:
    left = flush_all(_exit_timeout, stop=True)
    if left:
        logger.warning("task_scopes: %d events undelivered at exit", left)


def register_exit_flush(timeout: float | None = None) -> None:
    """Flush and shut down every client at interpreter exit, registered once per process.

    Args:
        timeout: seconds (float) the exit flush may take in all; None keeps the current
            bound (default 10 s). The Celery plugin sets its ``task_scopes_shutdown_timeout``.
    """
    global _exit_flush_registered, _exit_timeout
    with _clients_lock:
        if timeout is not None:
            _exit_timeout = timeout
        if not _exit_flush_registered:
            atexit.register(_flush_at_exit)
            _exit_flush_registered = True


def _after_fork_in_child() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()  # another thread may have held it at the fork
    for client in list(_clients):
        client._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
