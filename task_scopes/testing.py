"""Helpers for tests, ours and our users': in-memory capture and a loopback collector.

Example::

    from task_scopes.testing import capture_events

    def test_checkout_is_attributed():
        with capture_events() as captured:
            with task_scopes.new_context():
                task_scopes.identify_context("user-1")
                checkout()
        assert [e["distinct_id"] for e in captured.events] == ["user-1"]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._client import Client
from ._scope import override_client
from ._transport import InMemoryTransport
from .collector import CaptureServer, Reply, RequestRecord

__all__ = [
    "CaptureServer",
    "CapturedEvents",
    "InMemoryTransport",
    "Reply",
    "RequestRecord",
    "capture_events",
]


class CapturedEvents:
    """What :func:`capture_events` yields: the events captured so far, flushed on read."""

    def __init__(self, client: Client, transport: InMemoryTransport) -> None:
        self.client = client
        self.transport = transport

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event captured so far (flushes first), as dicts in PostHog's format."""
        self.client.flush(timeout=10.0)
        return list(self.transport.events)

    def named(self, event: str) -> list[dict[str, Any]]:
        """The captured events called ``event``."""
        return [e for e in self.events if e["event"] == event]

    def clear(self) -> None:
        """Forget what was captured so far."""
        self.client.flush(timeout=10.0)
        self.transport.clear()


@contextmanager
def capture_events(**client_options: Any) -> Iterator[CapturedEvents]:
    """Send every event captured during the block to memory; yield what it captures.

    Inside the block its client wins over every other, in every thread: the one of
    ``task_scopes.init()``, and those an installed Celery app binds to its task runs
    (also when ``install()`` runs inside the block). Afterwards everything is as before.
    Not for nesting across threads: one block at a time per process. ``client_options``
    are :class:`~task_scopes.Client` keyword options (``before_send``...).
    """
    transport = InMemoryTransport()
    client_options.setdefault("flush_interval", 0.05)
    client = Client(transport=transport, **client_options)
    previous = override_client(client)
    try:
        yield CapturedEvents(client, transport)
    finally:
        override_client(previous)
        client.shutdown(timeout=10.0)
