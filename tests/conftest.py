"""Shared fixtures: the guard re-raises, brokers are reached or the test fails under CI.

Redis: the suite starts a ``redis-server`` of its own (:mod:`tests.harness.redis_server`)
and never connects to another one. RabbitMQ: the local broker, where each test's queue
and exchanges are named after ``unique_queue`` and deleted after the test
(:mod:`tests.harness.rabbitmq`).
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from collections.abc import Iterator
from typing import NoReturn
from urllib.parse import urlparse

import pytest

from task_scopes import _internal
from tests.harness import rabbitmq
from tests.harness.redis_server import DATABASES, RedisServer, RedisServerMissing

pytest_plugins = ["celery.contrib.pytest"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REDIS_SERVER = os.environ.get("TASK_SCOPES_TEST_REDIS_SERVER", "redis-server")
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


def unavailable(message: str) -> NoReturn:
    """Skip the test because a broker is missing; under ``CI=true`` fail it instead."""
    if IN_CI:
        pytest.fail(message + " (CI=true: broker tests must not skip)")
    pytest.skip(message)


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=2):
            return True
    except OSError:
        return False


def require_broker(url: str) -> None:
    """Skip when the broker at ``url`` is unreachable; under ``CI=true`` fail instead."""
    if not _reachable(url):
        parsed = urlparse(url)
        unavailable(f"broker {parsed.scheme}://{parsed.hostname}:{parsed.port} unreachable")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's private ``redis-server`` (``TASK_SCOPES_TEST_REDIS_SERVER``, default
    ``redis-server`` on ``PATH``), started at the first test that needs Redis and stopped,
    with its data, at the end of the session."""
    server = RedisServer(REDIS_SERVER)
    try:
        server.start()
    except RedisServerMissing as exc:
        unavailable(f"{exc}: the tests run a private Redis with it")
    try:
        yield server
    finally:
        server.stop()


_redis_dbs = itertools.cycle(range(1, DATABASES))


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A URL of a database of the private server for this test alone, emptied first.

    Databases are handed out in turn; a test stops its workers before the next starts,
    so a database is reused only after 255 tests, by then long idle.
    """
    import redis

    url = redis_server.url(next(_redis_dbs))
    with redis.Redis.from_url(url) as client:
        client.flushdb()  # our own server: this deletes only what an earlier test left
    return url


@pytest.fixture
def amqp_url() -> str:
    """The RabbitMQ URL. Tests name their queue with ``unique_queue``, which deletes it
    (and the exchanges named after it) when the test used RabbitMQ."""
    require_broker(AMQP_URL)
    return AMQP_URL


@pytest.fixture
def unique_queue(request: pytest.FixtureRequest) -> Iterator[str]:
    """A queue name no other test or worker uses; also the name of the test's exchanges
    (see :func:`tests.harness.rabbitmq.celery_settings`).

    Fixtures that start workers or producers on it request it, so it is torn down after
    them: once every worker stopped, when the test used RabbitMQ, the queue and exchanges
    named after it are deleted there. On Redis nothing is deleted: the server is ours.
    """
    name = f"task_scopes_test_{uuid.uuid4().hex[:12]}"
    yield name
    if "amqp_url" in request.fixturenames:
        rabbitmq.delete(AMQP_URL, name)
