"""The harness itself, without the plugin: a worker runs tasks and their events arrive; the
private Redis and the RabbitMQ names leave nothing behind."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
import redis
from amqp.exceptions import NotFound
from kombu import Connection

from task_scopes.testing import CaptureServer
from tests.harness import rabbitmq
from tests.harness.redis_server import RedisServer

from .harness import Broker, MakeProducer, StartWorker, labelled, wait_events

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_plain_worker_runs_a_task_and_its_event_reaches_the_collector(
    broker: Broker,
    capture_server: CaptureServer,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    worker = start_worker(broker, plugin=False)
    app = make_producer(broker, plugin=False)
    label = f"{run_id}-plain"
    app.tasks["e2e.report"].delay(label)
    [event] = wait_events(capture_server, labelled(label), 1, worker=worker)
    # No plugin: nothing carried the (absent) producer context, so the event is personless.
    assert event["properties"]["$process_person_profile"] is False
    assert event["properties"]["pid"] != 0


def test_the_private_redis_server_is_not_the_shared_one_and_leaves_nothing(
    redis_server: RedisServer, redis_url: str
) -> None:
    """A second private server, started as the session's was: its own port and directory,
    no persistence, and stopping it removes its data."""
    with RedisServer(redis_server.binary) as server:
        assert server.port is not None and server.directory is not None
        assert server.port not in (6379, urlparse(redis_url).port)
        directory, url = server.directory, server.url(3)
        with redis.Redis.from_url(url) as client:
            client.set("written", 1)
            config = client.config_get("save") | client.config_get("appendonly")
        assert config == {"save": "", "appendonly": "no"}
        assert directory.is_dir()
    assert not directory.exists()
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(url) as client:
        client.ping()


def test_a_worker_on_rabbitmq_declares_only_names_the_test_deletes(
    amqp_broker: Broker, start_worker: StartWorker, make_producer: MakeProducer, run_id: str
) -> None:
    """The queue and every exchange a worker and its producer declare are named after the
    test's queue, and ``rabbitmq.delete`` removes them all."""
    worker = start_worker(amqp_broker, plugin=False, concurrency=1)
    app = make_producer(amqp_broker, plugin=False)
    # A broadcast with replies declares the two pidbox exchanges, as the worker's mailbox
    # and a control client do.
    assert app.control.ping(destination=[worker.hostname], timeout=10)
    assert worker.stop() == 0
    queue = amqp_broker.queue
    names = rabbitmq.exchanges(queue)
    with Connection(amqp_broker.url) as conn:
        conn.default_channel.queue_declare(queue, passive=True)
        for name in names[:3]:  # no events were sent: no event exchange
            conn.default_channel.exchange_declare(name, "direct", passive=True)
    rabbitmq.delete(amqp_broker.url, queue)
    rabbitmq.delete(amqp_broker.url, queue)  # idempotent: the fixture will delete again
    for kind, name in [("queue", queue)] + [("exchange", n) for n in names]:
        with Connection(amqp_broker.url) as conn, pytest.raises(NotFound):
            if kind == "queue":
                conn.default_channel.queue_declare(name, passive=True)
            else:
                conn.default_channel.exchange_declare(name, "direct", passive=True)
