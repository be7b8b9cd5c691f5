"""Fixtures of the PostHog interop tests: the collector and a ``celery worker`` subprocess
instrumented with one library (task_scopes or PostHog), on Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from task_scopes.testing import CaptureServer
from tests.harness.worker import Worker

from . import ph_worker_app

# Generous: the machine is small and shared. Waits end as soon as the condition holds.
READY_TIMEOUT = 60.0
EVENT_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

Event = dict[str, Any]


class InteropWorker(Worker):
    """One ``celery worker -P prefork -c 2`` subprocess instrumented with one library."""

    def __init__(self, side: str, broker: str, queue: str, host: str, log_path: Path) -> None:
        env: dict[str, str | None] = {
            ph_worker_app.ENV_BROKER: broker,
            ph_worker_app.ENV_QUEUE: queue,
            ph_worker_app.ENV_HOST: host,
            ph_worker_app.ENV_SIDE: side,
            # The capture wire protocol is PostHog's default (/batch/), whatever the
            # caller's environment says.
            "POSTHOG_CAPTURE_MODE": None,
        }
        super().__init__(
            "tests.interop.ph_worker_app",
            name=f"interop{uuid.uuid4().hex[:8]}",
            queue=queue,
            log_path=log_path,
            env=env,
        )
        self.side = side

    def problems(self) -> list[str]:
        """Errors either library logged: task_scopes' guard, PostHog's handlers and
        consumer (``posthog`` logger: "Failed to ...", "error uploading")."""
        markers = ("task_scopes: internal error", "Failed to ", "error uploading", "Traceback")
        return [line for line in self.log().splitlines() if any(m in line for m in markers)]


StartWorker = Callable[[str], InteropWorker]


@pytest.fixture
def capture_server() -> Iterator[CaptureServer]:
    """The loopback collector both libraries send to."""
    with CaptureServer() as server:
        yield server


@pytest.fixture
def queue() -> str:
    return f"task_scopes_interop_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def start_worker(
    redis_url: str, queue: str, capture_server: CaptureServer, tmp_path: Path
) -> Iterator[StartWorker]:
    """Factory: ``start_worker("task_scopes" | "posthog") -> InteropWorker``, ready.

    Teardown stops it warm and fails the test when it needed SIGKILL, exited non-zero, or
    either library logged an error. The collector outlives it, so exit flushes reach it.
    """
    workers: list[InteropWorker] = []

    def start(side: str) -> InteropWorker:
        worker = InteropWorker(
            side, redis_url, queue, capture_server.url, tmp_path / f"{side}{len(workers)}.log"
        )
        workers.append(worker)
        return worker.start(READY_TIMEOUT)

    yield start

    found: list[str] = []
    for worker in workers:
        code = worker.stop(STOP_TIMEOUT) if worker.proc is not None else None
        if worker.killed:
            found.append(f"{worker.side} worker ignored SIGTERM and was killed")
        elif code not in (0, None):
            found.append(f"{worker.side} worker exited with {code}")
        errors = worker.problems()
        if errors:
            found.append(f"{worker.side} worker logged errors: {errors[:5]}")
        if found:
            found.append(worker.log_tail())
    if found:
        pytest.fail("\n".join(found))


def wait_events(
    server: CaptureServer,
    predicate: Callable[[Event], bool],
    count: int,
    worker: InteropWorker,
    timeout: float = EVENT_TIMEOUT,
) -> list[Event]:
    """Wait until ``count`` received events match ``predicate``; fail with the worker's
    log on timeout or when the worker died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        # Slices of a second so that a dead worker is noticed early.
        remaining = max(0.0, min(deadline - time.monotonic(), 1.0))
        events = server.wait_until(lambda evs: sum(map(predicate, evs)) >= count, remaining)
        found = [e for e in events if predicate(e)]
        if len(found) >= count:
            return found
        if not worker.alive() or time.monotonic() >= deadline:
            break
    names = sorted({str(e.get("event")) for e in server.events})
    pytest.fail(
        f"{len(found)} of {count} events arrived within {timeout:.0f}s (the collector has "
        f"{len(server.events)} events named {names}; requests {server.requests})\n"
        f"{worker.log_tail()}"
    )
