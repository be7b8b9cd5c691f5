"""Reading the propagated context and task metadata from a Celery request.

A request is a ``celery.app.task.Context`` in the process that runs the task (worker
child, solo/threads worker, or eager call), or a ``celery.worker.request.Request`` in the
worker's main process (``task_received``). Helpers return ``X | None`` and never raise
for missing data; decoding raises :class:`~task_scopes.celery._header.WireError` for bad data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._header import (
    HEADER,
    POSTHOG_DISTINCT_ID,
    POSTHOG_SESSION_ID,
    POSTHOG_TAGS,
    SIG_HEADER,
    Limits,
    WireContext,
    WireError,
    decode_posthog,
)
from ._memo import decode_header

__all__ = ["CARRIED", "carried_headers", "read_context", "task_tags"]

# Header names a context may arrive under, ours first, then PostHog's.
CARRIED = (HEADER, SIG_HEADER, POSTHOG_DISTINCT_ID, POSTHOG_SESSION_ID, POSTHOG_TAGS)


def _fields(request: Any) -> Mapping[str, Any]:
    """The request's attributes as a mapping: ``Context`` keeps them in ``__dict__``, and
    reading that avoids an ``AttributeError`` raised and caught per missing header."""
    fields = getattr(request, "__dict__", None)
    return fields if isinstance(fields, dict) else {}


def carried_headers(request: Any) -> dict[str, Any]:
    """The context-carrying headers present on ``request`` (a small dict to keep).

    A top-level header is an attribute of the request (first run and every retry); else
    it is looked up in ``request.headers`` (eager ``apply(headers=...)``, other producers).
    """
    fields = _fields(request)
    headers = fields.get("headers")
    if type(headers) is not dict and not isinstance(headers, Mapping):  # dict: no ABC check
        headers = None
    found = {}
    for name in CARRIED:
        value = fields.get(name)
        if value is None and headers is not None:
            value = headers.get(name)
        if value is not None:
            found[name] = value
    return found


def read_context(
    headers: Mapping[str, Any], secret: str | None, limits: Limits
) -> WireContext | None:
    """The context carried by ``headers`` (from :func:`carried_headers`), or None if none.

    Our header wins; PostHog's ``X-POSTHOG-*`` headers are read when it is absent. With a
    ``secret``, unsigned or forged context is refused, PostHog's (never signed) included.

    Raises:
        WireError: the header is present but invalid, or its signature does not match.
    """
    header = headers.get(HEADER)
    if header is not None:
        return decode_header(header, headers.get(SIG_HEADER), secret, limits)
    distinct_id = headers.get(POSTHOG_DISTINCT_ID)
    session_id = headers.get(POSTHOG_SESSION_ID)
    tags = headers.get(POSTHOG_TAGS)
    if distinct_id is None and session_id is None and tags is None:
        return None
    if secret is not None:
        raise WireError("unsigned PostHog headers refused: a secret is set")
    return decode_posthog(distinct_id, session_id, tags, limits)


def task_tags(task: Any, request: Any, tags: dict[str, Any]) -> dict[str, Any]:
    """Write the tags describing this execution into ``tags`` and return it:
    ``celery_task_id``, ``celery_task_name``, ``celery_retry_count``, ``celery_queue``
    (see :func:`_queue`) and ``celery_hostname`` (when known), in this order."""
    fields = _fields(request)
    tags["celery_task_id"] = fields.get("id")
    tags["celery_task_name"] = getattr(task, "name", None)
    tags["celery_retry_count"] = fields.get("retries") or 0
    delivery_info = fields.get("delivery_info")
    if type(delivery_info) is dict or isinstance(delivery_info, Mapping):
        queue = _queue(task, delivery_info)
        if queue is not None:
            tags["celery_queue"] = queue
    hostname = fields.get("hostname")
    if hostname:
        tags["celery_hostname"] = hostname
    return tags


def _queue(task: Any, delivery_info: Mapping[str, Any]) -> str | None:
    """The name of the queue the message came through, when its routing names one.

    The default exchange (``""``) routes to the queue named by the routing key. Through
    another exchange the routing key is not a queue name: the queue is named only when
    exactly one queue the app declares (``app.amqp.queues``) is bound with that exchange
    and routing key (its own, or one of its ``bindings``). None otherwise (a topic
    pattern, a fanout, an eager run without routing options). sentry-python keeps to the
    default-exchange rule only.
    """
    routing_key = delivery_info.get("routing_key")
    if not routing_key or not isinstance(routing_key, str):
        return None
    exchange = delivery_info.get("exchange")
    if exchange == "":
        return routing_key
    if not exchange:
        return None
    try:
        queues = task.app.amqp.queues
    except AttributeError:
        return None
    found = [name for name, queue in queues.items() if _bound(queue, exchange, routing_key)]
    return found[0] if len(found) == 1 else None


def _bound(queue: Any, exchange: str, routing_key: str) -> bool:
    for bound in (queue, *(getattr(queue, "bindings", None) or ())):
        if bound.routing_key == routing_key and getattr(bound.exchange, "name", None) == exchange:
            return True
    return False
