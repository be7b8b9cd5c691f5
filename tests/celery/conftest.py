"""Fixtures for the Celery plugin's in-process tests (helpers: ``plugin_support``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from celery import signals
from plugin_support import Postruns

from task_scopes import _internal
from task_scopes.celery import _signals


@pytest.fixture
def postruns() -> Iterator[Postruns]:
    """A :class:`Postruns` connected for the test (after any ``install()`` made so far)."""
    receiver = Postruns()
    signals.task_postrun.connect(receiver, weak=False)
    try:
        yield receiver
    finally:
        signals.task_postrun.disconnect(receiver)


@pytest.fixture
def guard_swallows() -> Iterator[None]:
    """The production behaviour of the guard: log and swallow (tests otherwise re-raise)."""
    previous = _internal.set_reraise(False)
    try:
        yield
    finally:
        _internal.set_reraise(previous)


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the plugin's rate-limited warnings afresh, so each test sees its own."""
    monkeypatch.setattr(_signals, "_bad_header_log", _internal.RateLimitedLog(60.0))
    monkeypatch.setattr(_signals, "_dropped_logs", {})


class _SignalErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def _no_signal_handler_errors() -> Iterator[None]:
    """Celery's ``Signal.send`` catches and logs what a receiver raises, so the guard's
    re-raise in tests would go unnoticed; fail the test when it happens."""
    handler = _SignalErrors()
    logger = logging.getLogger("celery.utils.dispatch.signal")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.records:
        messages = [r.getMessage() for r in handler.records]
        pytest.fail(f"a signal handler raised into Celery: {messages}")
