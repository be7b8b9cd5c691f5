"""Helpers of the reliability tests: in-thread workers on ``memory://``, log counting."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

import task_scopes
from task_scopes import _internal
from task_scopes._client import Client


def memory_app(name: str, **conf: Any) -> Celery:
    """A Celery app on ``memory://`` with an in-process result backend and its own queue."""
    app = Celery(name, broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(
        # memory:// polls; its default of one second would make each task a second
        broker_transport_options={"polling_interval": 0.005},
        # the in-thread worker must not take the root logger's handlers (pytest's, ours)
        worker_hijack_root_logger=False,
        task_default_queue=f"{name}-{uuid.uuid4().hex[:8]}",
    )
    app.conf.update(conf)
    return app


@contextmanager
def running(app: Celery) -> Iterator[None]:
    """A solo worker for ``app`` in a thread of this process, for the block."""
    app.finalize(auto=True)
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        yield


@contextmanager
def default_client(client: Client) -> Iterator[Client]:
    """Bind ``client`` to the global scope for the block; shut it down after."""
    scope = task_scopes.get_global_scope()
    previous = scope.client
    scope.set_client(client)
    try:
        yield client
    finally:
        scope.set_client(previous)
        client.shutdown(timeout=5)


@contextmanager
def swallowing() -> Iterator[None]:
    """The guard swallows and logs, as in production (the suite's fixture makes it raise)."""
    previous = _internal.set_reraise(False)
    try:
        yield
    finally:
        _internal.set_reraise(previous)


class Records(logging.Handler):
    """Keeps the records of one logger at or above ``level`` while installed."""

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def containing(self, text: str) -> list[logging.LogRecord]:
        return [r for r in self.records if text in r.getMessage()]

    @contextmanager
    def on(self, name: str = "") -> Iterator[Records]:
        """Installed on logger ``name``, whose level is lowered to ours for the block (the
        in-thread worker sets the root logger to ERROR)."""
        logger = logging.getLogger(name)
        previous = logger.level
        logger.setLevel(self.level)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(previous)
