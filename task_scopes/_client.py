"""Client: builds events, queues them, and hands them to a consumer thread."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

from . import _defaults, _validate
from ._consumer import Consumer, Counters
from ._event import Refused, build, check_properties, freeze, uuid7
from ._exceptions import exception_list, exception_message, mark_captured
from ._exit import flush_all, live_clients, register_exit_flush
from ._internal import RateLimitedLog, guard, logger
from ._transport import HttpTransport, Transport

__all__ = [
    "Client",
    "ClientStats",
    "Event",
    "flush_all",
    "live_clients",
    "register_exit_flush",
    "uuid7",
]

Event = dict[str, Any]
BeforeSend = Callable[[Event], "Event | None"]

_clients: weakref.WeakSet[Client] = weakref.WeakSet()
_clients_lock = threading.Lock()
# A debug client's own log lines go here (and to stderr); other clients never touch it.
debug_logger = logging.getLogger("task_scopes.debug")
_CAPTURE_GUARD = guard("capture")
_FLUSH_GUARD = guard("flush")
_CAPTURE_EXCEPTION_GUARD = guard("capture_exception")


_YIELD_EVERY = 0.001  # seconds between two yields to the consumer, at least
_YIELD_FOR = 0.0001  # seconds one yield sleeps
# captures after a wake-up with the batch still untaken: the consumer is starved of the GIL
_STARVED_AFTER = 8
_HAND_OVER_FOR = 0.005  # seconds one capture waits, at most, for a starved consumer's send


class ClientStats(NamedTuple):
    """Counters of one client in this process since it started (or since ``os.fork()``).

    ``captured``: events accepted by ``capture()``; ``queued``: waiting for the consumer;
    ``in_flight``: in the batch being sent; ``delivered``; ``failed``: given up by the
    transport; ``dropped``: refused by ``capture()`` (invalid, over 900 KiB,
    unserializable, queue full, ``before_send``), which then returned None.
    """

    captured: int
    queued: int
    in_flight: int
    delivered: int
    failed: int
    dropped: int


class Client:
    """Sends events in PostHog's capture format, in batches, from a background thread.

    ``capture()`` never raises: it builds the event from the active scopes, appends it to
    a bounded in-memory queue and returns its UUID. It does not wait for the network,
    with two bounded exceptions that give the consumer thread the GIL when the capturing
    thread keeps it (a loop of eager tasks, say). When the consumer has not taken a batch
    it was woken for eight captures later (and is not busy with a send), that capture
    waits up to 5 ms while the batch is sent, and the next wake-up comes at twice the
    size (up to 500 events by default; back to ``flush_at`` once a partial batch comes
    due by ``flush_interval``); see ``_hand_over``. While a batch is in flight, it sleeps
    0.1 ms at most once a millisecond when that wait ended before the send did (a slow
    collector; until a capture finds nothing in flight), or under a backlog (more than
    ``max(4 * flush_at, max_queue_size // 10)`` events queued), and past three quarters
    of ``max_queue_size`` at every capture (see ``_yield_to_consumer``).

    Args:
        api_key: project API key; None (and no ``transport``) makes a disabled client.
        host: capture host, e.g. ``https://eu.i.posthog.com``.
        flush_at: queued events (int >= 1) that wake the consumer to send at once (more,
            up to 500 by default and never past what the queue holds, while the
            capturing thread starves the consumer of the GIL: see above).
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
        # a backlog that means the consumer is falling behind (see _yield_to_consumer)
        self._yield_at = max(4 * flush_at, max_queue_size // 10)
        self._hard_yield_at = max(self._yield_at, max_queue_size * 3 // 4)
        # the largest wake-up size for a consumer the capturing thread starves (_hand_over):
        # one the queue can hold, with the eight captures that tell starvation
        self._grow_to = max(flush_at, min(self._yield_at // 2, max_queue_size - _STARVED_AFTER))
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
        self._queue: deque[str] = deque()  # events frozen as JSON by capture()
        self._next_yield = 0.0  # see _yield_to_consumer()
        self._taken_at_wake = 0  # counters.taken when capture() last woke the consumer
        self._slow_send = False  # the last hand-over ended before the send did
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
        """Queue one event attributed from the active scopes. Never raises, never waits for
        the network (when the capturing thread starves the consumer thread of the GIL it
        may wait up to 5 ms for a batch to go, and under a backlog sleep 0.1 ms: see the
        class docstring).

        The event is checked and serialized here, in the caller's thread: what the caller
        changes in ``properties`` (or in a tag value) afterwards is not sent, and an
        event PostHog would refuse is refused here, with a warning naming the mistake,
        rather than costing the events batched with it.

        Args:
            event: event name, a non-empty str, e.g. ``"order_processed"``.
            distinct_id: overrides the scopes' distinct ID for this event (str; an int or
                UUID is sent as str). Empty or whitespace counts as None: the scopes'
                distinct ID, else a personless event (as posthog-python).
            properties: event properties (a mapping); they win over tags of the same
                name. Values are converted as the README's table says (non-finite floats
                become null, dataclasses objects, ...).
            timestamp: when it happened (aware datetime or ISO 8601); default now, UTC.
            uuid: event UUID (str or ``uuid.UUID``); default a new UUIDv7. The collector
                dedupes on it.
            groups: group type -> group key, e.g. ``{"company": "acme"}``; merged over the
                scopes' groups (and a ``$groups`` dict in ``properties``) into the
                ``$groups`` property, as posthog-python sends them.

        Returns:
            The event UUID (canonical form), or None when the client is disabled or the
            event was refused: invalid name, distinct ID, properties or UUID, a circular
            reference, over 900 KiB or nested deeper than PostHog accepts as JSON,
            dropped by ``before_send``, or the queue is full. The reason is logged.
        """
        if self.disabled:
            _warn_if_unconfigured(self)
            self._log.log(logging.DEBUG, "task_scopes: client disabled; event not sent")
            return None
        try:  # the guard as try/except: cheaper than a with block on this hot path
            try:
                frozen = self._freeze(event, distinct_id, properties, timestamp, uuid, groups)
            except Refused as refused:
                self._refuse("capture", event, refused)
                return None
            if frozen is None or not self._enqueue(frozen[0]):
                return None
            uid = frozen[1]
            if self.debug:
                debug_logger.debug("task_scopes: %r captured event %r (%s)", self, event, uid)
            return uid
        except Exception:
            _CAPTURE_GUARD.failed()
        return None

    def _freeze(
        self,
        event: Any,
        distinct_id: Any,
        properties: Any,
        timestamp: datetime | str | None,
        uuid: Any,
        groups: Mapping[str, str | int] | None = None,
    ) -> tuple[str, str] | None:
        """``(json, uuid)`` of the event, or None when ``before_send`` dropped it.

        Raises :class:`Refused` for what the caller got wrong.
        """
        message = build(event, distinct_id, properties, timestamp, uuid, groups)
        if self.before_send is None:  # built from checked values: only serialize
            return freeze(message, check_fields=False), message["uuid"]
        kept = self._before_send(message)
        if kept is None:
            return None
        return freeze(kept), kept["uuid"]

    def _before_send(self, message: Event) -> Any:
        """What ``before_send`` returns; None (dropped, and counted) when it raises."""
        assert self.before_send is not None
        name = message["event"]
        try:
            kept = self.before_send(message)
        except Exception as exc:  # the user's callback: their mistake, not ours
            self._count_drop()
            self._log.log(
                logging.WARNING,
                "task_scopes: before_send raised %s on event %r; the event is dropped",
                type(exc).__qualname__,
                name[:100],
                exc_info=True,
                key=type(exc).__qualname__,
            )
            return None
        if kept is None:
            self._count_drop()
            logger.debug("task_scopes: before_send dropped event %r", name[:100])
        return kept

    def _refuse(self, call: str, event: Any, refused: Refused) -> None:
        """Count and log an event ``call`` (``"capture"``...) refused; a user mistake."""
        self._count_drop()
        shown = repr(event[:100]) if isinstance(event, str) else f"<{type(event).__qualname__}>"
        self._log.warning(
            "task_scopes: %s() refused event %s, nothing was sent: %s",
            call,
            shown,
            refused,
            key=(refused.kind, shown),
        )

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

        The same exception object is sent once however often it is captured. An
        exception whose ``str()`` raises is sent with a placeholder message.

        Args:
            exc: the exception; None takes ``sys.exc_info()``.
            mechanism: what caught it (``"celery"``, ``"new_context"``...).
            handled: False when it escaped the user's code.

        Returns:
            The event UUID; None when there is no exception, ``exc`` is not an exception
            (logged), it was captured before, or the client is disabled or refused the
            event (see :meth:`capture`).
        """
        if exc is None:
            exc = sys.exc_info()[1]
        if exc is None or self.disabled:
            return None
        if not isinstance(exc, BaseException):
            self._refuse(
                "capture_exception",
                "$exception",
                Refused(f"it needs an exception, got {type(exc).__qualname__}", "exception"),
            )
            return None
        try:
            properties = check_properties(properties)
        except Refused as refused:
            self._refuse("capture_exception", "$exception", refused)
            return None
        with _CAPTURE_EXCEPTION_GUARD:
            if not mark_captured(exc):
                return None
            props: dict[str, Any] = {
                "$exception_list": exception_list(exc, mechanism=mechanism, handled=handled),
                "$exception_type": type(exc).__name__,
                "$exception_message": exception_message(exc),
            }
            if properties:
                props.update(properties)
            return self.capture("$exception", distinct_id=distinct_id, properties=props)
        return None

    def set(self, *, distinct_id: str | None = None, properties: Mapping[str, Any]) -> str | None:
        """Set person properties (``$set``) on the given or the scopes' distinct ID."""
        return self._person("$set", distinct_id, properties)

    def set_once(
        self, *, distinct_id: str | None = None, properties: Mapping[str, Any]
    ) -> str | None:
        """Set person properties only where unset (``$set_once``)."""
        return self._person("$set_once", distinct_id, properties)

    def _person(self, kind: str, distinct_id: str | None, properties: Any) -> str | None:
        try:
            checked = check_properties(properties)
        except Refused as refused:
            self._refuse(kind.lstrip("$"), "$set", refused)
            return None
        return self.capture("$set", distinct_id=distinct_id, properties={kind: dict(checked or {})})

    def _count_drop(self) -> None:
        counters = self._counters
        with counters.cv:
            counters.dropped += 1

    def _enqueue(self, item: str) -> bool:
        queue = self._queue
        if len(queue) >= self.max_queue_size:
            self._count_drop()
            self._log.warning(
                "task_scopes: queue full (%d events); dropping new events", self.max_queue_size
            )
            return False
        if not queue:
            self._counters.oldest = time.monotonic()
        queue.append(item)
        consumer = self._consumer
        if consumer is None:
            consumer = self._start()
        queued = len(queue)
        wake_at = consumer.wake_at
        counters = self._counters
        if queued == wake_at:  # once per backlog: the consumer takes it all
            consumer.wake()
            self._taken_at_wake = counters.taken
        elif (
            queued == wake_at + _STARVED_AFTER
            and not counters.in_flight  # not busy with a send: woken and never run since
            and counters.taken == self._taken_at_wake
        ):
            self._hand_over(consumer, wake_at)
        elif counters.in_flight:
            if queued >= self._yield_at or self._slow_send:
                self._yield_to_consumer(queued)
        elif self._slow_send:  # the slow send is over
            self._slow_send = False
        return True

    def _hand_over(self, consumer: Consumer, wake_at: int) -> None:
        """Wait, 5 ms at most, while the consumer sends the batch it was woken for.

        Called when, ``_STARVED_AFTER`` captures after the wake-up, the consumer has
        neither taken that batch nor any send in flight: it was woken and has not run
        since, because the capturing thread keeps the GIL. CPython 3.11 hands the GIL to
        a waiting thread only after a switch interval (5 ms) without any hand-over, and a
        thread busy with eager tasks releases it once per task (Celery's ``uuid4()``
        reads ``os.urandom``) and takes it back first every time. Each of those releases
        wakes the consumer on the other core, which finds the GIL taken and sleeps
        again: about 20 µs of system time and a context switch per task, for as long as
        a send needs the GIL (``bench/eager_profile.py`` measures it). Waiting here on
        the consumer's condition lets the whole send (join, gzip, POST) run at once: on
        loopback 1-3 ms per batch of 100-500 events. A consumer busy sending the
        previous batch (a remote collector) is not waited for.

        The consumer's wake-up size doubles each time (``consumer.wake_at``, up to
        ``max(flush_at, min(max(4 * flush_at, max_queue_size // 10) // 2,
        max_queue_size - 8))``: 500 events by default, a batch that goes within the wait
        on loopback, and always one the queue can hold), so a thread that keeps starving
        it hands over once per few hundred events; it is back at ``flush_at`` as soon as
        a partial batch comes due by ``flush_interval`` (the capturing thread slowed
        down). A thread that leaves the consumer the GIL (web requests waiting on I/O, a
        worker waiting on its broker) does not get here: the consumer takes the batch
        long before eight more captures.

        The wait is bounded (a slow collector, a slow custom transport, or a consumer
        blocked on a lock this thread holds) and never happens in the consumer's own
        thread (a transport or a log handler that captures). When it ends before the
        send does, the rest of the send needs the GIL again once the collector answers:
        until a capture finds no batch in flight, ``_yield_to_consumer`` gives it 0.1 ms
        once a millisecond while one is. Measured on a loop of eager tasks: against
        the strict local collector (~10 ms per batch of 500), 153 µs per task against
        169 before; against one that answers after 50 ms, where the consumer is mostly
        busy with a send and not waited for, 165 against 174.
        """
        if threading.current_thread() is consumer:
            return
        consumer.wake_at = min(2 * wake_at, self._grow_to)
        counters = self._counters
        taken = self._taken_at_wake
        with counters.cv:
            self._slow_send = not counters.cv.wait_for(
                lambda: counters.taken != taken and not counters.in_flight, _HAND_OVER_FOR
            )

    def _yield_to_consumer(self, queued: int) -> None:
        """Let the consumer thread run while a batch is in flight and events pile up.

        A thread that keeps the GIL busy and releases it only for short system calls
        (Celery's ``uuid4()`` reads ``os.urandom`` once per task) starves the consumer:
        CPython hands the GIL to a waiting thread only when it asks for it after a
        switch interval (5 ms) without any hand-over, and the releasing thread wins the
        race for it every time. Each of the dozen system calls of a POST then waits, a
        request of a few hundred events took seconds, and the queue overflowed. Here the
        capturing thread sleeps 0.1 ms at most once per millisecond while a batch is
        being sent and either more than ``_yield_at`` events are queued or the last
        hand-over (``_hand_over``) ended before its send: at most a tenth of its time,
        only then, and far less than losing the events or a starved send. Past three
        quarters of ``max_queue_size`` it sleeps 0.1 ms at every capture: the queue is
        about to drop events. That is bounded too: once the queue is full, events are
        dropped without a sleep (during an outage, say).
        """
        now = time.monotonic()
        if queued >= self._hard_yield_at or now >= self._next_yield:
            self._next_yield = now + _YIELD_EVERY
            time.sleep(_YIELD_FOR)

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
                # whatever made this client (init(), the Celery plugin, the user), what
                # it queues is flushed at exit
                register_exit_flush()
            return self._consumer

    def last_failure(self) -> str | None:
        """Why the transport's last delivery attempt failed (cause and host), or None
        when it succeeded or the transport does not say."""
        note = getattr(self.transport, "last_failure", None)
        return note if isinstance(note, str) else None

    # -- flush / shutdown ----------------------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> int:
        """Send everything queued now, whatever ``flush_interval`` says, and wait until it
        is delivered (or given up). Events captured meanwhile, by this thread or another,
        are waited for too; those captured after it returns are batched as usual.

        Args:
            timeout: seconds (float) to wait; None waits forever.

        Returns:
            The number of events still undelivered (queued or in flight) when it returned.
        """
        consumer = self._consumer
        if consumer is None:
            return len(self._queue)
        try:
            return consumer.wait_idle(timeout)
        except Exception:
            _FLUSH_GUARD.failed()
            return len(self._queue)

    def send_now(self) -> None:
        """Make the consumer send what is queued now, without waiting (see :meth:`flush`)."""
        consumer = self._consumer
        if consumer is not None:
            consumer.flush_now()

    def shutdown(self, timeout: float | None = 10.0) -> int:
        """Flush, then stop the consumer thread. A later ``capture()`` starts a new one.

        Args:
            timeout: seconds (float) for flush and stop together; None waits forever.

        Returns:
            The number of events still undelivered.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._start_lock:
            consumer, self._consumer = self._consumer, None
        if consumer is None:
            return len(self._queue)
        try:
            undelivered = consumer.wait_idle(timeout)
        except Exception:
            _FLUSH_GUARD.failed()
            undelivered = len(self._queue)
        consumer.stop()
        if undelivered == 0:
            consumer.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
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


_unconfigured_warned = False


def _warn_if_unconfigured(client: Client) -> None:
    """Once per process: say that events go nowhere because no client has an API key
    (a client disabled on purpose, with a key, stays quiet)."""
    global _unconfigured_warned
    if _unconfigured_warned or client.api_key is not None or client.transport is not None:
        return
    _unconfigured_warned = True
    logger.warning(
        "task_scopes: capture() sent nothing: no client with an API key is set up here. "
        "Call task_scopes.init(api_key=..., host=...) at start-up, or set "
        "task_scopes_api_key in the Celery app's config (logged once per process)"
    )


def _enable_debug_logging() -> None:
    if not debug_logger.handlers:
        debug_logger.addHandler(logging.StreamHandler())
    debug_logger.setLevel(logging.DEBUG)


def _after_fork_in_child() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()  # another thread may have held it at the fork
    for client in list(_clients):
        client._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
