"""The consumer thread: drains the client's queue into batches for the transport."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

from ._defaults import MAX_BATCH_BYTES, MAX_EVENT_BYTES
from ._internal import RateLimitedLog, guard
from ._json import json_default
from ._transport import Transport

__all__ = ["Consumer", "Counters"]

_dumps = json.JSONEncoder(
    default=json_default, separators=(",", ":"), ensure_ascii=False, check_circular=True
).encode


class Counters:
    """The counters of one client in one process, read and written under :attr:`cv`.

    ``taken``: events the consumer removed from the queue; ``in_flight``: events of the
    batch being sent; ``delivered``; ``failed``: given up by the transport; ``dropped``:
    refused by the client (queue full, ``before_send``) or the consumer (too large,
    unserializable). The client owns them; each consumer it starts adds to them, so they
    survive ``shutdown()`` and a restart.
    """

    __slots__ = ("cv", "delivered", "dropped", "failed", "in_flight", "taken")

    def __init__(self) -> None:
        self.cv = threading.Condition(threading.Lock())
        self.taken = 0
        self.in_flight = 0
        self.delivered = 0
        self.failed = 0
        self.dropped = 0


class Consumer(threading.Thread):
    """One daemon thread per client and process.

    Wakes when the queue reaches ``flush_at`` events, when ``flush_interval`` seconds have
    passed, or when :meth:`wake` is called (``flush()``); then sends everything queued in
    batches of <= ``flush_at`` events and <= 5 MiB. Events over 900 KiB, or that cannot be
    serialized, are dropped and counted.

    It counts what it does in the client's :class:`Counters`.
    """

    def __init__(
        self,
        queue: deque[dict[str, Any]],
        transport: Transport,
        counters: Counters,
        *,
        flush_at: int,
        flush_interval: float,
    ) -> None:
        super().__init__(name="task_scopes-consumer", daemon=True)
        self.queue = queue
        self.transport = transport
        self.counters = counters
        self.cv = counters.cv
        self.flush_at = flush_at
        self.flush_interval = flush_interval
        self._wake = threading.Event()
        self._stopping = False
        self._log = RateLimitedLog(30.0)

    def wake(self) -> None:
        """Send what is queued now, without waiting for ``flush_interval``."""
        self._wake.set()

    def stop(self) -> None:
        """Send what is queued, then end the thread."""
        self._stopping = True
        self._wake.set()

    def pending(self) -> int:
        """Events queued or in flight. Call with :attr:`cv` held for a consistent figure."""
        return len(self.queue) + self.counters.in_flight

    def run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            with guard("consumer"):
                self._drain()
            if self._stopping and not self.queue:
                return

    def _drain(self) -> None:
        while True:
            with self.cv:
                batch = self._take()
                if not batch:
                    self.cv.notify_all()
                    return
            undelivered = len(batch)
            try:
                undelivered = self.transport.send(batch)
            finally:
                counters = self.counters
                with self.cv:
                    counters.in_flight = 0
                    counters.delivered += len(batch) - undelivered
                    counters.failed += undelivered
                    self.cv.notify_all()

    def _take(self) -> list[str]:
        """Pop up to ``flush_at`` events (<= 5 MiB) and serialize them. Holds :attr:`cv`."""
        batch: list[str] = []
        size = 0
        queue = self.queue
        counters = self.counters
        while queue and len(batch) < self.flush_at:
            event = queue.popleft()
            counters.taken += 1
            try:
                item = _dumps(event)
            except Exception as exc:  # one bad event must not take its batch down with it
                # TypeError/ValueError (circular), RecursionError (nested too deep), or
                # whatever a property's own __str__ raised
                counters.dropped += 1
                self._log.log(
                    logging.WARNING,
                    "task_scopes: dropped event %r: cannot serialize (%s)",
                    event.get("event"),
                    type(exc).__name__,
                )
                continue
            if item.isascii():
                n = len(item)
            else:
                try:
                    n = len(item.encode())
                except UnicodeEncodeError:
                    # lone surrogates (os.fsdecode of undecodable bytes) are not UTF-8:
                    # send "?" in their place rather than lose the event
                    item = item.encode("utf-8", "replace").decode()
                    n = len(item.encode())
            if n > MAX_EVENT_BYTES:
                counters.dropped += 1
                self._log.warning(
                    "task_scopes: dropped event %r of %d bytes (limit %d)",
                    event.get("event"),
                    n,
                    MAX_EVENT_BYTES,
                )
                continue
            if batch and size + n > MAX_BATCH_BYTES:
                queue.appendleft(event)
                counters.taken -= 1
                break
            batch.append(item)
            size += n + 1
        counters.in_flight = len(batch)
        return batch

    def wait_idle(self, timeout: float | None) -> int:
        """Block until nothing is queued or in flight, or ``timeout`` seconds passed
        (None waits forever).

        Returns the number of events still undelivered: those queued or in flight now,
        plus those given up or dropped while waiting.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wake()
        counters = self.counters
        with self.cv:
            lost_before = counters.failed + counters.dropped
            while self.pending():
                if not self.is_alive():
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.cv.wait(remaining if remaining is None else min(remaining, 0.5))
                self.wake()
            return self.pending() + counters.failed + counters.dropped - lost_before
