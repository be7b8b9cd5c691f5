"""Fixtures of the PostHog interop tests: the collector and a ``celery worker`` subprocess
instrumented with one library (task_scopes or PostHog), on Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from task_scopes.testing import CaptureServer

from . import ph_worker_app

ROOT = Path(__file__).resolve().parents[2]
# Generous: the machine is small and shared. Waits end as soon as the condition holds.
READY_TIMEOUT = 60.0
EVENT_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

Event = dict[str, Any]


class InteropWorker:
    """One ``celery worker -P prefork -c 2`` subprocess in a process group of its own."""

    def __init__(self, side: str, broker: str, queue: str, host: str, log_path: Path) -> None:
        self.side = side
        self.broker = broker
        self.queue = queue
        self.host = host
        self.log_path = log_path
        self.name = f"interop{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False

    @property
    def hostname(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def start(self) -> InteropWorker:
        env = dict(os.environ)
        env.update(
            {
                ph_worker_app.ENV_BROKER: self.broker,
                ph_worker_app.ENV_QUEUE: self.queue,
                ph_worker_app.ENV_HOST: self.host,
                ph_worker_app.ENV_SIDE: self.side,
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
                ),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # The capture wire protocol is PostHog's default (/batch/), whatever the caller's
        # environment says.
        env.pop("POSTHOG_CAPTURE_MODE", None)
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.interop.ph_worker_app", "worker",
            "-P", "prefork", "-c", "2", "-Q", self.queue,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "info", "-n", f"{self.name}@%h",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        marker = f"{self.name}@"
        while time.monotonic() < deadline:
            if any(
                marker in line and line.rstrip().endswith("ready.")
                for line in self.log().splitlines()
            ):
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"{self.side} worker exited before it was ready\n{self.log_tail()}")
            # Polling a log file: there is no readiness event to block on.
            time.sleep(0.1)
        pytest.fail(f"{self.side} worker not ready after {READY_TIMEOUT:.0f}s\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """Warm shutdown: SIGTERM, wait; SIGKILL the group only if it did not exit."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # Still unreaped, so its pid (the group id) cannot have been reused.
                self.killed = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        return proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log().splitlines()[-lines:]
        return f"--- {self.side} worker log (last {len(tail)} lines) ---\n" + "\n".join(tail)

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
        return worker.start()

    yield start

    found: list[str] = []
    for worker in workers:
        code = worker.stop()
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
