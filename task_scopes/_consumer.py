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
    survive ``shutdown()`` and a restart. ``oldest``: ``time.monotonic()`` when an event
    last went into an empty queue (written by ``capture()`` without the lock: a hint for
    when a partial batch is due, never a count).
    """

    __slots__ = ("cv", "delivered", "dropped", "failed", "in_flight", "oldest", "taken")

    def __init__(self) -> None:
        self.cv = threading.Condition(threading.Lock())
        self.oldest = 0.0
        self.taken = 0
        self.in_flight = 0
        self.delivered = 0
        self.failed = 0
        self.dropped = 0


class Consumer(threading.Thread):
    """One daemon thread per client and process.

    Sends a batch when ``flush_at`` events are queued (``capture()`` wakes it; at
    :attr:`wake_at`, more, while the capturing thread starves this one), when the
    oldest queued event has waited ``flush_interval`` seconds, and on ``flush()`` and
    shutdown; at other wake-ups a partial batch waits. A batch takes everything queued, up
    to 5 MiB a request, so batches grow with the backlog: a consumer that falls behind (a
    busy thread holding the GIL makes each request slow) sends fewer, larger requests
    instead of dropping events. ``flush_at`` is when to send, not a cap on a request. The
    queue holds events already validated and serialized by ``capture()`` (JSON strings of
    <= 900 KiB), so the consumer only joins them: nothing it takes can be refused by the
    collector.

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
        # the queue length at which capture() wakes this thread: flush_at, raised by
        # Client._hand_over while the capturing thread starves this one of the GIL, and
        # back to flush_at when a partial batch comes due by the interval (a hint both
        # threads write; a stale read only moves one wake-up)
        self.wake_at = flush_at
        self.flush_interval = flush_interval
        self._wake = threading.Event()
        self._stopping = False
        # flush(): the events queued up to then go now, partial batch or not; those
        # captured after it wait for flush_at or flush_interval as usual (a producer that
        # goes on capturing after a flush() would otherwise get a request per event or
        # two, until the consumer happened to find the queue empty)
        self._flush_to = 0  # compared with counters.taken

    def wake(self) -> None:
        """Look at the queue now: send if ``flush_at`` events are queued or a partial batch
        is due (``capture()`` calls this at ``flush_at``)."""
        self._wake.set()

    def flush_now(self) -> None:
        """Send everything queued now, whatever ``flush_interval`` says (``flush()``); what
        is captured after this call is batched as usual."""
        with self.cv:
            self._flush_here()

    def _flush_here(self) -> None:
        """:meth:`flush_now` with :attr:`cv` held: ``_take`` pops events before it counts
        them, so the two figures are read together."""
        self._flush_to = self.counters.taken + len(self.queue)
        self._wake.set()

    def stop(self) -> None:
        """Send what is queued, then end the thread."""
        self._stopping = True
        self._wake.set()

    def pending(self) -> int:
        """Events queued or in flight. Call with :attr:`cv` held for a consistent figure."""
        return len(self.queue) + self.counters.in_flight

    def run(self) -> None:
        timeout = self.flush_interval
        while True:
            if not self._wake.wait(timeout) and self.queue:
                # a partial batch came due by the interval: capture() no longer fills
                # batches faster than they go, so it wakes this thread at flush_at again
                self.wake_at = self.flush_at
            self._wake.clear()
            with guard("consumer"):
                self._drain()
            if self._stopping and not self.queue:
                return
            timeout = self._until_due()

    def _until_due(self) -> float:
        """Seconds until the oldest queued event has waited ``flush_interval`` (the whole
        interval when the queue is empty: ``capture()`` wakes the consumer at
        ``flush_at``, and the next look happens an interval later at the latest)."""
        if not self.queue:
            return self.flush_interval
        return max(self.counters.oldest + self.flush_interval - time.monotonic(), 0.0)

    def _drain(self) -> None:
        while True:
            with self.cv:
                queued = len(self.queue)
                due = (
                    queued >= self.flush_at
                    or self.counters.taken < self._flush_to
                    or self._stopping
                    or time.monotonic() - self.counters.oldest >= self.flush_interval
                )
                batch = self._take() if queued and due else []
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
        """Pop what is queued, <= 5 MiB in all (at least one event). Holds :attr:`cv`."""
        batch: list[str] = []
        size = 0
        queue = self.queue
        while queue:
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
        self.flush_now()
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
                self._flush_here()
            return self.pending() + counters.failed - lost_before
