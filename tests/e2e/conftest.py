"""Fixtures of the end-to-end tests: brokers, the collector, workers and producers."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import task_scopes
from task_scopes.testing import CaptureServer

from . import worker_app
from .harness import API_KEY, Broker, MakeProducer, StartWorker, Worker, e2e_worker, worker_settings


@pytest.fixture
def run_id() -> str:
    """A short id that makes this test's labels and names unique."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, redis_url: str, unique_queue: str) -> Broker:
    """Each broker in turn; Redis also serves as result backend and counter store."""
    if request.param == "redis":
        return Broker("redis", redis_url, unique_queue, redis_url)
    amqp_url: str = request.getfixturevalue("amqp_url")
    return Broker("amqp", amqp_url, unique_queue, redis_url)


@pytest.fixture
def redis_broker(redis_url: str, unique_queue: str) -> Broker:
    return Broker("redis", redis_url, unique_queue, redis_url)


@pytest.fixture
def amqp_broker(amqp_url: str, redis_url: str, unique_queue: str) -> Broker:
    return Broker("amqp", amqp_url, unique_queue, redis_url)


@pytest.fixture
def capture_server() -> Iterator[CaptureServer]:
    """The loopback collector every process of the test sends its events to."""
    with CaptureServer() as server:
        yield server


@pytest.fixture
def start_worker(
    capture_server: CaptureServer, tmp_path: Path, run_id: str, unique_queue: str
) -> Iterator[StartWorker]:
    """Factory: ``start_worker(broker, pool="prefork", concurrency=2, extra_args=(),
    settings={...overrides}, plugin=True) -> Worker``, started and ready.

    At teardown every worker is stopped warm (a test may have stopped it already), and the
    test fails if one needed SIGKILL or logged a task_scopes internal error. The collector
    outlives the workers, so their exit flushes reach it; so does ``unique_queue``, whose
    teardown deletes the test's queue and exchanges from RabbitMQ after the workers stopped.
    """
    workers: list[Worker] = []

    def start(
        broker: Broker,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        extra_args: tuple[str, ...] = (),
        settings: dict[str, Any] | None = None,
        plugin: bool = True,
    ) -> Worker:
        name = f"e2e{run_id}n{len(workers)}"
        conf: dict[str, Any] = broker.celery_settings()
        if broker.kind == "amqp":
            # A 2 s AMQP heartbeat puts a timer in the worker's event loop every second.
            # Without one (Celery 5.7, measured without task_scopes) the loop sleeps up to
            # ~10 s in epoll with frames already read: SIGTERM takes ~6 s to act on, and a
            # solo worker stalls between deliveries.
            conf["broker_heartbeat"] = 2.0
        conf.update(settings or {})
        worker = e2e_worker(
            broker,
            worker_settings(capture_server, **conf),
            tmp_path / f"{name}.log",
            name=name,
            pool=pool,
            concurrency=concurrency,
            extra_args=extra_args,
            plugin=plugin,
        )
        workers.append(worker)
        return worker.start()

    yield start

    problems: list[str] = []
    for worker in workers:
        if worker.proc is not None and worker.returncode is None:
            worker.stop()
        found: list[str] = []
        if worker.killed:
            found.append(f"worker {worker.name} ignored SIGTERM and was killed")
        errors = worker.internal_errors()
        if errors:
            found.append(f"worker {worker.name} logged internal errors: {errors[:3]}")
        if found:
            problems += [*found, worker.log_tail()]
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def make_producer(capture_server: CaptureServer, unique_queue: str) -> Iterator[MakeProducer]:
    """Factory: ``make_producer(broker, plugin=True, backend=False, settings={...}) -> Celery``.

    The producer is this test process, with the same tasks as the worker. With ``plugin``
    it runs ``task_scopes.celery.install(app)`` with the collector as host (which makes
    the default client send there too); without, it is a plain Celery app.
    """
    apps: list[tuple[Celery, bool]] = []

    def make(
        broker: Broker,
        *,
        plugin: bool = True,
        backend: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> Celery:
        conf: dict[str, Any] = broker.celery_settings()
        if plugin:
            conf.update(
                task_scopes_api_key=API_KEY,
                task_scopes_host=capture_server.url,
                task_scopes_flush_interval=0.1,
            )
        conf.update(settings or {})
        app = worker_app.make_app(
            broker.url,
            queue=broker.queue,
            backend=broker.redis_url if backend else None,
            settings=conf,
        )
        if plugin:
            from task_scopes.celery import install

            # The test process's own events (outside tasks) go to init()'s client, which
            # the app's task runs share: same key and host.
            task_scopes.init(API_KEY, capture_server.url, flush_interval=0.1)
            install(app)
        apps.append((app, plugin))
        return app

    yield make

    # AsyncResults left unreferenced unsubscribe from the Redis backend when collected:
    # let that happen now, before the backend's connections are closed.
    gc.collect()
    for app, plugin in reversed(apps):
        if plugin:
            from task_scopes.celery import uninstall

            uninstall(app)
        if app.conf.result_backend:
            # The Redis result backend keeps its own pool; left open it warns (-W error).
            app.backend.result_consumer.stop()
            app.backend.client.connection_pool.disconnect()
        app.close()
    if any(plugin for _, plugin in apps):
        # Flushes the client init() made, and leaves a disabled one for later tests.
        task_scopes.init()
