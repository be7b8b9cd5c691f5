"""The end-to-end harness: a ``celery worker`` subprocess, producers, and event waits.

Everything here synchronises on something observable (a log line, an event, a counter, a
process exit) with a deadline; nothing sleeps in place of waiting.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import task_scopes
from task_scopes.testing import CaptureServer

from . import worker_app

ROOT = Path(__file__).resolve().parents[2]
INTERNAL_ERROR = "task_scopes: internal error"
API_KEY = "phc_test"

# Generous: the machine is small and shared. Waits end as soon as the condition holds.
READY_TIMEOUT = 90.0
EVENT_TIMEOUT = 60.0
STOP_TIMEOUT = 90.0

Event = dict[str, Any]
Predicate = Callable[[Event], bool]
# The factories the conftest fixtures ``start_worker`` and ``make_producer`` yield.
StartWorker = Callable[..., "Worker"]
MakeProducer = Callable[..., Celery]


@dataclass(frozen=True)
class Broker:
    """Where a test's messages go.

    ``kind`` is ``"redis"`` or ``"amqp"``; ``queue`` is used by this test only;
    ``redis_url`` is a Redis database of the test's own, used as result backend (chords)
    and for counters, whatever the broker.
    """

    kind: str
    url: str
    queue: str
    redis_url: str


def worker_settings(server: CaptureServer, **overrides: Any) -> dict[str, Any]:
    """``app.conf`` keys for a worker that sends its events to ``server``."""
    settings: dict[str, Any] = {
        "task_scopes_api_key": API_KEY,
        "task_scopes_host": server.url,
        "task_scopes_flush_interval": 0.2,
    }
    settings.update(overrides)
    return settings


class Worker:
    """One ``celery worker`` subprocess, in a process group of its own, logging to a file."""

    def __init__(
        self,
        broker: Broker,
        settings: dict[str, Any],
        log_path: Path,
        *,
        name: str,
        pool: str = "prefork",
        concurrency: int = 2,
        extra_args: Sequence[str] = (),
        plugin: bool = True,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.log_path = log_path
        self.name = name
        self.pool = pool
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        self.plugin = plugin
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False
        self.returncode: int | None = None
        self._sentinel = f"e2e:sentinel:{name}"

    @property
    def hostname(self) -> str:
        """The node name Celery gives this worker (``-n name@%h``)."""
        return f"{self.name}@{socket.gethostname()}"

    def start(self, timeout: float = READY_TIMEOUT) -> Worker:
        """Start the worker and return once its log says it is ready.

        Raises:
            pytest.fail.Exception: it exited or was not ready within ``timeout`` seconds.
        """
        env = dict(os.environ)
        env.update(
            {
                worker_app.ENV_BROKER: self.broker.url,
                worker_app.ENV_BACKEND: self.broker.redis_url,
                worker_app.ENV_QUEUE: self.broker.queue,
                worker_app.ENV_REDIS: self.broker.redis_url,
                worker_app.ENV_SETTINGS: json.dumps(self.settings),
                worker_app.ENV_PLUGIN: "1" if self.plugin else "0",
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
                ),
                "PYTHONUNBUFFERED": "1",
            }
        )
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.e2e.worker_app",
            "worker",
            "-P",
            self.pool,
            "-c",
            str(self.concurrency),
            "-Q",
            self.broker.queue,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "info",
            "-n",
            f"{self.name}@%h",
            *self.extra_args,
        ]
        import redis

        with redis.Redis.from_url(self.broker.redis_url, socket_timeout=5) as client:
            client.set(self._sentinel, "1", ex=3600)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        marker = f"{self.name}@"
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if marker in line and line.rstrip().endswith("ready."):
                    return
            if self.proc.poll() is not None:
                pytest.fail(
                    f"worker {self.name} exited with {self.proc.returncode} before it was "
                    f"ready\n{self.log_tail()}"
                )
            # Polling a log file: there is no readiness event to block on.
            time.sleep(0.1)
        pytest.fail(f"worker {self.name} not ready after {timeout:.0f}s\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Warm shutdown: SIGTERM, wait up to ``timeout`` s, then SIGKILL the whole group.

        Returns the exit status; :attr:`killed` tells whether SIGKILL was needed.
        """
        proc = self.proc
        if proc is None:
            raise RuntimeError("worker not started")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Still unreaped, so its pid (the group id) cannot have been reused: the
                # group is the worker and its pool children, nothing else.
                self.killed = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        self.returncode = proc.returncode
        return proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        tail = self.log().splitlines()[-lines:]
        text = f"--- worker {self.name} log (last {len(tail)} lines) ---\n" + "\n".join(tail)
        if not self.redis_intact():
            text = (
                f"NOTE: the Redis database {self.broker.redis_url} was flushed by another "
                "process during the test (queued messages and counters were lost with it)\n" + text
            )
        return text

    def redis_intact(self) -> bool:
        """False when the sentinel key set at start is gone: another test process reused
        and flushed this Redis database (they are handed out 1-15 in turn per process)."""
        import redis

        try:
            with redis.Redis.from_url(self.broker.redis_url, socket_timeout=5) as client:
                return bool(client.exists(self._sentinel))
        except redis.RedisError:
            return True  # unknown; the log tail says the rest

    def internal_errors(self) -> list[str]:
        return [line for line in self.log().splitlines() if INTERNAL_ERROR in line]


def wait_events(
    server: CaptureServer,
    predicate: Predicate,
    count: int,
    *,
    worker: Worker | None = None,
    timeout: float = EVENT_TIMEOUT,
    what: str = "events",
) -> list[Event]:
    """Wait until ``count`` received events match ``predicate``; return the matching ones.

    Fails the test (with the worker's log) on timeout or when the worker died meanwhile.
    """

    def matching(events: list[Event]) -> list[Event]:
        return [e for e in events if predicate(e)]

    deadline = time.monotonic() + timeout
    found: list[Event] = []
    while True:
        remaining = deadline - time.monotonic()
        # Slices of a second so that a dead worker is noticed early.
        events = server.wait_until(lambda evs: len(matching(evs)) >= count, min(remaining, 1.0))
        found = matching(events)
        if len(found) >= count:
            return found
        if worker is not None and not worker.alive():
            break
        if time.monotonic() >= deadline:
            break
    log = worker.log_tail() if worker is not None else ""
    names = sorted({str(e.get("event")) for e in server.events})
    pytest.fail(
        f"{what}: {len(found)} of {count} arrived within {timeout:.0f}s "
        f"(server has {len(server.events)} events named {names})\n{log}"
    )


def labelled(label: str, event: str | None = "e2e.report") -> Predicate:
    """Events carrying ``properties.label == label`` (and named ``event`` unless None)."""

    def predicate(e: Event) -> bool:
        props = e.get("properties", {})
        return props.get("label") == label and (event is None or e.get("event") == event)

    return predicate


def exceptions(task_name: str | None = None, task_id: str | None = None) -> Predicate:
    """``$exception`` events, of one task name and/or task id when given."""

    def predicate(e: Event) -> bool:
        if e.get("event") != "$exception":
            return False
        props = e.get("properties", {})
        if task_name is not None and props.get("celery_task_name") != task_name:
            return False
        return task_id is None or props.get("celery_task_id") == task_id

    return predicate


def exception_type(event: Event) -> str | None:
    """The outermost exception type of an ``$exception`` event."""
    props = event["properties"]
    listed = props.get("$exception_list") or [{}]
    return props.get("$exception_type") or listed[0].get("type")


def wait_for_value(
    read: Callable[[], Any],
    expected: Any,
    *,
    timeout: float,
    worker: Worker | None = None,
    what: str = "value",
) -> None:
    """Poll ``read()`` (e.g. a Redis counter) until it equals ``expected``."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected:
        if worker is not None and not worker.alive():
            pytest.fail(f"worker died while waiting for {what} ({value!r})\n{worker.log_tail()}")
        if time.monotonic() >= deadline:
            tail = worker.log_tail() if worker is not None else ""
            pytest.fail(f"{what} is {value!r}, expected {expected!r} after {timeout:.0f}s\n{tail}")
        # Polling an external counter: there is nothing to block on.
        time.sleep(0.2)
        value = read()


@contextmanager
def producer_context(
    distinct_id: str,
    session_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """A fresh context of the producer (this test process), as a web request would open."""
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context(distinct_id)
        if session_id is not None:
            task_scopes.set_context_session(session_id)
        for key, value in (tags or {}).items():
            task_scopes.tag(key, value)
        yield


def props(event: Event) -> dict[str, Any]:
    """The properties of an event."""
    properties: dict[str, Any] = event["properties"]
    return properties
