"""Logger, the one guard, and rate-limited logging.

Instrumentation must never break the host application: every signal handler and every
background path runs inside :func:`guard`, which logs on the ``task_scopes`` logger and
swallows. Tests (and ``debug=True``) make it re-raise so a swallowed bug fails loudly.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any, ClassVar, TypeAlias

logger = logging.getLogger("task_scopes")

# What logging accepts as exc_info: True, or an (type, value, traceback) triple.
ExcInfo: TypeAlias = "bool | tuple[Any, Any, Any]"

_reraise = False


def set_reraise(value: bool) -> bool:
    """Make :func:`guard` re-raise (tests, ``debug=True``). Returns the previous value."""
    global _reraise
    previous, _reraise = _reraise, value
    return previous


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

    def log(self, level: int, msg: str, *args: object, exc_info: ExcInfo = False) -> bool:
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


class guard:  # noqa: N801 - used as ``with guard("where"):``
    """Run a block of instrumentation code; log and swallow the ``Exception`` it raises.

    Args:
        where: short name of the code path, e.g. ``"task_prerun"``; it appears in the log.

    Logged with its traceback at most once a minute per ``where`` (a broken transport or
    encoder would otherwise log once per task), with the count of what was suppressed.
    A class rather than a generator-based context manager: it costs a fraction of that on
    the hot paths (publish, prerun, capture), and an instance holds no per-use state, so
    one can be kept and reused. ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``)
    always propagates.
    """

    __slots__ = ("where",)
    _logs: ClassVar[dict[str, RateLimitedLog]] = {}

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
        log = guard._logs.get(self.where)
        if log is None:
            if len(guard._logs) > 1024:  # names are static strings; bound it anyway
                guard._logs.clear()
            log = guard._logs.setdefault(self.where, RateLimitedLog(60.0))
        log.log(
            logging.ERROR,
            "task_scopes: internal error in %s (swallowed)",
            self.where,
            exc_info=(exc_type, exc, tb),
        )
        return True

    def failed(self) -> None:
        """In an ``except Exception:`` block: what leaving ``with self:`` would do. Logs
        and returns (the caller goes on with a fallback), or re-raises under
        :func:`set_reraise`. For hot paths, where a ``try`` costs less than a ``with``."""
        if not self.__exit__(*sys.exc_info()):
            raise  # the exception the caller is handling
