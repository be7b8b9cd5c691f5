"""Flushing every client of the process: at interpreter exit and on the exit paths of
integrations (a Celery pool child's shutdown), saying what could not be delivered."""

from __future__ import annotations

import atexit
import time
from typing import TYPE_CHECKING

from . import _client, _defaults
from ._internal import logger

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["flush_all", "live_clients", "register_exit_flush"]


def live_clients() -> list[Client]:
    """Every enabled client of this process that is still referenced."""
    with _client._clients_lock:
        return [client for client in _client._clients if not client.disabled]


def flush_all(timeout: float | None, *, stop: bool = False) -> int:
    """Flush every enabled client (``stop=True``: shut each down), within one deadline.

    A client left with undelivered events is named in a warning, with how many and why
    (the transport's last failure, or that the collector did not answer in time): this
    runs on the exit paths, where nothing else would tell.

    Args:
        timeout: seconds (float) for all clients together; None waits forever.
        stop: shut the clients down after flushing (a later ``capture()`` restarts one).

    Returns:
        The number of events still undelivered, summed over the clients.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    clients = live_clients()
    for client in clients:  # all start sending now: one slow collector delays no other
        client.send_now()
    left = 0
    for client in clients:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        undelivered = client.shutdown(remaining) if stop else client.flush(remaining)
        if undelivered:
            _warn_undelivered(client, undelivered, timeout)
        left += undelivered
    return left


def _warn_undelivered(client: Client, count: int, timeout: float | None) -> None:
    failure = client.last_failure()
    waited = "" if timeout is None else f" within {timeout:.1f} s"
    reason = (
        f"the last attempt failed: {failure}"
        if failure
        else f"the collector did not accept them{waited}"
    )
    logger.warning(
        "task_scopes: %d event%s not delivered to %s at exit; %s",
        count,
        "" if count == 1 else "s",
        _target(client),
        reason,
    )


def _target(client: Client) -> str:
    """Where ``client`` sends: the collector's origin (never credentials), or the
    transport's class."""
    origin = getattr(client.transport, "origin", None)
    return origin if isinstance(origin, str) else type(client.transport).__qualname__


_exit_flush_registered = False
_exit_timeout = _defaults.SHUTDOWN_TIMEOUT


def _flush_at_exit() -> None:
    flush_all(_exit_timeout, stop=True)  # warns about what it could not send


def register_exit_flush(timeout: float | None = None) -> None:
    """Flush and shut down every client at interpreter exit, registered once per process.

    Args:
        timeout: seconds (float) the exit flush may take in all; None keeps the current
            bound (default 10 s). The Celery plugin sets its ``task_scopes_shutdown_timeout``.
    """
    global _exit_flush_registered, _exit_timeout
    with _client._clients_lock:
        if timeout is not None:
            _exit_timeout = timeout
        if not _exit_flush_registered:
            atexit.register(_flush_at_exit)
            _exit_flush_registered = True
