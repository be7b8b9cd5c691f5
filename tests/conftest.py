"""Shared fixtures: the guard re-raises, brokers are reached or the test fails under CI."""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from task_scopes import _internal

pytest_plugins = ["celery.contrib.pytest"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REDIS_HOST = os.environ.get("TASK_SCOPES_TEST_REDIS", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("TASK_SCOPES_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(autouse=True)
def _guard_reraises() -> Iterator[None]:
    """A bug swallowed by the instrumentation guard fails the test instead."""
    previous = _internal.set_reraise(True)
    _internal.guard._logs.clear()  # each test sees the guard's first log line of its own
    try:
        yield
    finally:
        _internal.set_reraise(previous)


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=2):
            return True
    except OSError:
        return False


def require_broker(url: str) -> None:
    """Skip when the broker at ``url`` is unreachable; under ``CI=true`` fail instead."""
    if _reachable(url):
        return
    parsed = urlparse(url)
    message = f"broker {parsed.scheme}://{parsed.hostname}:{parsed.port} unreachable"
    if IN_CI:
        pytest.fail(message + " (CI=true: broker tests must not skip)")
    pytest.skip(message)


_redis_dbs = itertools.cycle(range(1, 16))


@pytest.fixture
def redis_url() -> str:
    """A Redis URL on a database of its own (1-15 in turn), flushed before use.

    Tests run one at a time and stop their workers, so cycling is enough isolation.
    """
    require_broker(REDIS_HOST)
    import redis

    url = f"{REDIS_HOST}/{next(_redis_dbs)}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def amqp_url() -> str:
    """The RabbitMQ URL (tests use their own queue names: see ``unique_queue``)."""
    require_broker(AMQP_URL)
    return AMQP_URL


@pytest.fixture
def unique_queue() -> str:
    """A queue name no other test or worker uses."""
    return f"task_scopes_test_{uuid.uuid4().hex[:12]}"
