"""What a test creates on the shared RabbitMQ, and how it deletes it afterwards.

A ``celery worker`` and its producers declare, on the default vhost:

* the task queue and the direct exchange of the same name (Celery's default exchange is
  named after ``task_default_queue``), both durable;
* the remote-control exchanges ``<control_exchange>.pidbox`` (fanout) and
  ``reply.<control_exchange>.pidbox`` (direct), not durable and not auto-deleted: with
  Celery's default ``control_exchange`` they are the ``celery.pidbox`` exchanges every
  Celery app on the vhost shares, which a test must not delete;
* the worker's own pidbox queue, exclusive and auto-deleted: gone when it disconnects;
* the event exchange (``event_exchange``, default ``celeryev``) when events are sent.

:func:`celery_settings` gives a run's apps a ``control_exchange`` and an
``event_exchange`` named after its own queue, so that everything above is the run's own
and :func:`delete` can remove all of it. (The broker's management API, which could give a
run a vhost of its own, is not always enabled; plain AMQP always works.)
"""

from __future__ import annotations

from typing import Any

from kombu import Connection


def celery_settings(name: str) -> dict[str, str]:
    """``app.conf`` keys that name the run's control and event exchanges after ``name``
    (its queue), for the worker and its producers alike."""
    return {"control_exchange": name, "event_exchange": f"{name}.ev"}


def exchanges(name: str) -> list[str]:
    """Every exchange a run with queue ``name`` and :func:`celery_settings` may declare."""
    return [name, f"{name}.pidbox", f"reply.{name}.pidbox", f"{name}.ev"]


def delete(url: str, name: str, **connection: Any) -> None:
    """Delete the queue ``name`` and the exchanges of :func:`exchanges` on the broker at
    ``url``. Deleting what does not exist is not an error in RabbitMQ, so this is
    idempotent.

    Args:
        url: an ``amqp://`` URL.
        name: the run's queue.
        connection: more keyword arguments of ``kombu.Connection``.

    Raises:
        kombu / py-amqp connection errors when the broker cannot be reached.
    """
    with Connection(url, connect_timeout=5, **connection) as conn:
        channel = conn.default_channel
        channel.queue_delete(name)
        for exchange in exchanges(name):
            channel.exchange_delete(exchange)
