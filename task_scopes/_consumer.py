"""The consumer thread: drains the client's queue into batches for the transport."""

from __future__ import annotations

import threading
import time
from collections import deque

from ._defaults import MAX_BATCH_BYTES
from ._internal import guard
from ._transport import Transport

__all__ = ["Consumer", "Counters"]


class Counters:
    """The counters of one client in one process, read and written under :attr:`cv`.

    ``taken``: events the consumer removed from the queue; ``in_flight``: events of the
    batch being sent; ``delivered``; ``failed``: given up by the transport; ``dropped``:
    refused by ``capture()`` (invalid, too large, unserializable, queue full,
    ``before_send``). The client owns them; each consumer it starts adds to them, so they
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
    batches of <= ``flush_at`` events and <= 5 MiB. The queue holds events already
    validated and serialized by ``capture()`` (JSON strings of <= 900 KiB), so the
    consumer only joins them: nothing it takes can be refused by the collector.

    It counts what it does in the client's :class:`Counters`.
    """

    def __init__(
        self,
        queue: deque[str],
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
        """Pop up to ``flush_at`` events, <= 5 MiB in all. Holds :attr:`cv`."""
        batch: list[str] = []
        size = 0
        queue = self.queue
        while queue and len(batch) < self.flush_at:
            item = queue[0]
            n = len(item) if item.isascii() else len(item.encode())
            if batch and size + n > MAX_BATCH_BYTES:
                break
            queue.popleft()
            batch.append(item)
            size += n + 1
        self.counters.taken += len(batch)
        self.counters.in_flight = len(batch)
        return batch

    def wait_idle(self, timeout: float | None) -> int:
        """Block until nothing is queued or in flight, or ``timeout`` seconds passed
        (None waits forever).

        Returns the number of events still undelivered: those queued or in flight now,
        plus those the transport gave up while waiting.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wake()
        counters = self.counters
        with self.cv:
            lost_before = counters.failed
            while self.pending():
                if not self.is_alive():
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.cv.wait(remaining if remaining is None else min(remaining, 0.5))
                self.wake()
            return self.pending() + counters.failed - lost_before
