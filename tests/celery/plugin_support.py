"""Helpers for the Celery plugin's in-process tests: apps on ``memory://``, an in-thread
worker, raw message reading, and a way to wait until a task's ``task_postrun`` has run.

No sleeps: tests wait on results, on :class:`Postruns` and on ``threading`` primitives.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.contrib.testing.app import setup_default_app
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state

import task_scopes.celery

WAIT = 10.0  # seconds any single wait may take before the test fails


def make_app(name: str, **conf: Any) -> Celery:
    """A Celery app on ``memory://`` with its own default queue (the memory broker is shared
    by every app of the process) and an in-memory result backend."""
    app = Celery(name, broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(
        task_default_queue=f"ts_{name}_{uuid.uuid4().hex[:8]}",
        worker_hijack_root_logger=False,
        # The worker's blocking drain polls the memory transport; keep wake-ups prompt.
        broker_transport_options={"polling_interval": 0.005},
        result_expires=None,
    )
    app.conf.update(conf)

    @app.task(name=f"{name}._wake", shared=False)
    def _wake() -> None:
        """Published at shutdown so the consumer leaves its 2 s drain at once."""

    return app


@contextmanager
def in_thread_worker(app: Celery, pool: str = "solo", concurrency: int = 1) -> Iterator[Any]:
    """Celery's embedded worker (``celery.contrib.testing.worker.start_worker``) in a thread.

    The app's current/default-app changes the worker makes are undone afterwards.
    """
    with (
        setup_default_app(app),
        start_worker(
            app,
            pool=pool,
            concurrency=concurrency,
            perform_ping_check=False,
            shutdown_timeout=30.0,
        ) as worker,
    ):
        try:
            yield worker
        finally:
            # start_worker sets this and joins the thread, which sits in a 2 s blocking
            # drain; set it first and hand the consumer messages so it returns at once.
            # Two: celery.worker.loops.synloop drains once more after maybe_shutdown()
            # raised (try/finally), and that drain needs a message too.
            worker_state.should_terminate = 0
            for _ in range(2):
                app.tasks[f"{app.main}._wake"].delay()


def raw_headers(app: Celery, queue: str) -> dict[str, Any]:
    """Headers of the next message on ``queue`` of the memory broker (consumed)."""
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, no_ack=True)
        try:
            message = simple.get(timeout=WAIT)
            return dict(message.headers)
        finally:
            simple.close()


class Postruns:
    """Counts ``task_postrun`` per task id, from a receiver connected after the plugin's,
    so when :meth:`wait` returns the plugin's postrun (and failure/retry) handlers are done.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.states: dict[str, list[str]] = {}
        self._cv = threading.Condition()

    def __call__(self, task_id: str | None = None, state: str | None = None, **_: Any) -> None:
        with self._cv:
            if task_id is not None:
                self.counts[task_id] += 1
                self.states.setdefault(task_id, []).append(str(state))
            self._cv.notify_all()

    def wait(self, task_id: str, count: int = 1, timeout: float = WAIT) -> list[str]:
        """Wait until ``task_id`` finished ``count`` runs; return their states in order."""
        with self._cv:
            if not self._cv.wait_for(lambda: self.counts[task_id] >= count, timeout):
                raise AssertionError(
                    f"task {task_id} ran {self.counts[task_id]} times, expected {count}"
                )
            return list(self.states[task_id])


@contextmanager
def installed(app: Celery, **overrides: Any) -> Iterator[task_scopes.celery.Options]:
    """``install(app, **overrides)`` for a block, then ``uninstall(app)``."""
    options = task_scopes.celery.install(app, **overrides)
    try:
        yield options
    finally:
        task_scopes.celery.uninstall(app)
