"""Logger, the one guard, and rate-limited logging.

Instrumentation must never break the host application: every signal handler and every
background path runs inside :func:`guard`, which logs on the ``task_scopes`` logger and
swallows. Tests (and ``debug=True``) make it re-raise so a swallowed bug fails loudly.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

logger = logging.getLogger("task_scopes")

_reraise = False


def set_reraise(value: bool) -> bool:
    """Make :func:`guard` re-raise (tests, ``debug=True``). Returns the previous value."""
    global _reraise
    previous, _reraise = _reraise, value
    return previous


class guard:  # noqa: N801 - used as ``with guard("where"):``
    """Run a block of instrumentation code; log and swallow the ``Exception`` it raises.

    Args:
        where: short name of the code path, e.g. ``"task_prerun"``; it appears in the log.

    A class rather than a generator-based context manager: it costs a fraction of that on
    the hot paths (publish, prerun, capture), and an instance holds no per-use state, so
    one can be kept and reused. ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``)
    always propagates.
    """

    __slots__ = ("where",)

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None or not issubclass(exc_type, Exception) or _reraise:
            return False
        logger.error(
            "task_scopes: internal error in %s (swallowed)",
            self.where,
            exc_info=(exc_type, exc, tb),  # type: ignore[arg-type]
        )
        return True


class RateLimitedLog:
    """Logs a message at most once per ``interval`` seconds, counting what it suppressed.

    Thread-safe. ``warning("...%s", arg)`` returns True when the line was written.
    """

    __slots__ = ("_interval", "_last", "_lock", "_suppressed")

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._last = -float("inf")
        self._suppressed = 0
        self._lock = threading.Lock()

    def _due(self) -> int | None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                self._suppressed += 1
                return None
            self._last = now
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        suppressed = self._due()
        if suppressed is None:
            return False
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, msg, *args)
