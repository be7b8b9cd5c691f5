"""Workers, bookkeeping and memory sampling shared by ``soak.py`` and the reliability tests.

A :class:`Worker` is a real ``celery worker`` subprocess (prefork) running
``_soak_app``; a :class:`Ledger` reads what the tasks and worker processes wrote to Redis
(see ``_soak_app``); an :class:`RssSampler` samples the resident memory of a worker's main
process and its pool children.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import redis

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Settings:
    """What the worker app is configured with (passed as ``SOAK_*`` environment)."""

    broker: str
    collector: str
    queue: str = field(default_factory=lambda: f"soak-{uuid.uuid4().hex[:10]}")
    prefix: str = field(default_factory=lambda: f"soak:{uuid.uuid4().hex[:10]}")
    flush_interval: float = 0.5
    flush_at: int = 100
    shutdown_timeout: float = 30.0
    http_timeout: float = 3.0

    def env(self) -> dict[str, str]:
        return {
            "SOAK_BROKER": self.broker,
            "SOAK_COLLECTOR": self.collector,
            "SOAK_QUEUE": self.queue,
            "SOAK_PREFIX": self.prefix,
            "SOAK_FLUSH_INTERVAL": str(self.flush_interval),
            "SOAK_FLUSH_AT": str(self.flush_at),
            "SOAK_SHUTDOWN_TIMEOUT": str(self.shutdown_timeout),
            "SOAK_HTTP_TIMEOUT": str(self.http_timeout),
        }

    def app_module(self) -> Any:
        """Import ``_soak_app`` in this process (the producer side) with these settings.

        The module reads its configuration at import, so this works once per process.
        """
        os.environ.update(self.env())
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        import _soak_app

        if self.prefix != _soak_app.PREFIX:
            raise RuntimeError("_soak_app was already imported with other settings")
        return _soak_app


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` every ``interval`` seconds until it holds or ``timeout`` seconds
    passed. Returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class Worker:
    """One ``celery -A _soak_app worker -P prefork`` subprocess.

    Args:
        settings: the app configuration.
        name: node name prefix (``{name}@%h``) and log file stem.
        log_dir: where ``{name}.log`` (the worker's stdout and stderr) goes.
        concurrency: pool children.
        extra: more ``celery worker`` arguments, e.g. ``["--max-tasks-per-child", "5"]``.
    """

    def __init__(
        self,
        settings: Settings,
        name: str,
        log_dir: Path,
        *,
        concurrency: int = 2,
        extra: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.concurrency = concurrency
        self.extra = list(extra)
        self.popen: subprocess.Popen[bytes] | None = None
        self._store = redis.Redis.from_url(settings.broker)

    @property
    def pid(self) -> int:
        assert self.popen is not None, "worker not started"
        return self.popen.pid

    def start(self, ready_timeout: float = 60.0) -> Worker:
        """Start the worker and wait until it consumes (its ``worker_ready`` fired).

        Raises:
            RuntimeError: it exited or was not ready within ``ready_timeout`` seconds.
        """
        env = {**os.environ, **self.settings.env(), "PYTHONPATH": str(BENCH)}
        argv = [
            sys.executable, "-m", "celery", "-A", "_soak_app", "worker",
            "-P", "prefork", "-c", str(self.concurrency), "-Q", self.settings.queue,
            "-n", f"{self.name}@%h", "-l", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *self.extra,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                argv, cwd=BENCH, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        ready_key = f"{self.settings.prefix}:ready:{self.popen.pid}"
        ready = wait_for(
            lambda: (
                self.popen is not None
                and (self.popen.poll() is not None or bool(self._store.exists(ready_key)))
            ),
            ready_timeout,
        )
        if not ready or self.popen.poll() is not None:
            self.kill()
            raise RuntimeError(f"worker {self.name} did not start; see {self.log_path}")
        return self

    def children(self) -> list[psutil.Process]:
        """The pool children (direct children of the main process) alive now."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> tuple[int, int] | None:
        """``(main + children, largest child)`` resident set size in bytes, or None when
        the main process is gone."""
        try:
            main = psutil.Process(self.pid)
            total = main.memory_info().rss
            largest = 0
            for child in main.children():
                try:
                    size = child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                total += size
                largest = max(largest, size)
            return total, largest
        except psutil.NoSuchProcess:
            return None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the worker's main process."""
        assert self.popen is not None
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """Wait for the main process to exit; its return code, or None on timeout."""
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 90.0) -> int | None:
        """Warm shutdown (SIGTERM) and wait. Returns the exit code (None: still running)."""
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen is not None else None
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the main process and any pool children left (cleanup after a failure)."""
        if self.popen is None:
            return
        orphans = self.children()
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        for child in orphans:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


class Captured(NamedTuple):
    """One event a task's ``capture()`` accepted, as the task recorded it."""

    uuid: str
    pid: int
    at: float  # wall clock, seconds since the epoch
    seq: int


class Ledger:
    """Reads the bookkeeping of one run (``Settings.prefix``) from Redis."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.prefix
        self.store = redis.Redis.from_url(settings.broker, decode_responses=True)

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def tasks_run(self) -> int:
        return int(self.store.get(self.key("run")) or 0)

    def captured(self) -> list[Captured]:
        rows = self.store.lrange(self.key("captured"), 0, -1)
        out = []
        for row in rows:
            uid, pid, at, seq = row.split()
            out.append(Captured(uid, int(pid), float(at), int(seq)))
        return out

    def stats(self) -> dict[int, dict[str, Any]]:
        """``client.stats()`` per process that reported at its exit, by pid."""
        raw = self.store.hgetall(self.key("stats"))
        return {int(pid): json.loads(value) for pid, value in raw.items()}

    def children(self) -> set[int]:
        return {int(pid) for pid in self.store.smembers(self.key("children"))}


class RssSample(NamedTuple):
    at: float  # time.monotonic()
    progress: int  # tasks run when sampled
    worker: str
    total: int  # bytes, main + children
    largest_child: int  # bytes


class RssSampler(threading.Thread):
    """Samples the RSS of the current worker every ``interval`` seconds until stopped.

    ``current`` is a callable returning the worker to sample (it changes on restart).
    """

    def __init__(
        self,
        current: Callable[[], Worker | None],
        progress: Callable[[], int],
        interval: float = 0.25,
    ) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.current = current
        self.progress = progress
        self.interval = interval
        self.samples: list[RssSample] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            worker = self.current()
            if worker is None:
                continue
            rss = worker.rss()
            if rss is not None:
                self.samples.append(RssSample(time.monotonic(), self.progress(), worker.name, *rss))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
