"""The soak's configuration, bookkeeping and memory sampling (``soak.py``, ``_soak_exits.py``).

:class:`Settings` configures ``_soak_app`` (as ``SOAK_*`` environment) in the workers and
the producer; :func:`soak_worker` is the shared worker subprocess
(``tests.harness.worker.Worker``) running it; a :class:`Ledger` reads what the tasks and
worker processes wrote to Redis (see ``_soak_app``); an :class:`RssSampler` samples the
resident memory of a worker's main process and its pool children.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import redis
from _root import BENCH

from tests.harness.redis_server import RedisServer
from tests.harness.worker import Worker

SOAK_APP = "_soak_app"


@contextmanager
def redis_for(spec: str) -> Iterator[str]:
    """The run's Redis URL. ``spec`` ``"private"``: a ``redis-server`` of the run's own on
    a free port, stopped with its data when the block ends. Otherwise ``spec`` is the URL,
    used as is: the run adds keys under its own prefix and queue, and deletes nothing."""
    if spec != "private":
        yield spec
        return
    with RedisServer() as server:
        print(f"private redis-server on 127.0.0.1:{server.port}", file=sys.stderr, flush=True)
        yield server.url(0)


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


def soak_worker(
    settings: Settings,
    name: str,
    log_dir: Path,
    *,
    concurrency: int = 2,
    extra: Sequence[str] = (),
) -> Worker:
    """A (not yet started) ``celery -A _soak_app worker -P prefork`` subprocess.

    Args:
        settings: the app configuration.
        name: node name prefix (``{name}@%h``) and log file stem (``{log_dir}/{name}.log``).
        concurrency: pool children.
        extra: more ``celery worker`` arguments, e.g. ``["--max-tasks-per-child", "5"]``.

    It logs at WARNING (a line per task would weigh on the figures), so its readiness is
    the key its ``worker_ready`` handler sets rather than a log line.
    """
    store = redis.Redis.from_url(settings.broker)
    worker = Worker(
        SOAK_APP,
        name=name,
        queue=settings.queue,
        log_path=log_dir / f"{name}.log",
        env=settings.env(),
        concurrency=concurrency,
        loglevel="WARNING",
        extra_args=extra,
        path=[BENCH],
        ready=lambda: bool(store.exists(f"{settings.prefix}:ready:{worker.pid}")),
    )
    return worker


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
