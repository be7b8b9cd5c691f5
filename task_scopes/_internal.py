"""Logger, the one guard, and rate-limited logging.

Instrumentation must never break the host application: every signal handler and every
background path runs inside :func:`guard`, which logs on the ``task_scopes`` logger and
swallows. Tests make it re-raise (:func:`set_reraise`) so a swallowed bug fails loudly.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from types import TracebackType
from typing import Any, ClassVar, TypeAlias

logger = logging.getLogger("task_scopes")

# What logging accepts as exc_info: True, or an (type, value, traceback) triple.
ExcInfo: TypeAlias = "bool | tuple[Any, Any, Any]"

_reraise = False


def set_reraise(value: bool) -> bool:
    """Make :func:`guard` re-raise (tests only). Returns the previous value."""
    global _reraise
    previous, _reraise = _reraise, value
    return previous


class RateLimitedLog:
    """Logs each distinct message at most once per ``interval`` seconds, counting what it
    suppressed.

    A message is its format string, plus the ``key`` a caller passes to tell problems of
    one format apart (a status code, an exception type): a later, different problem on
    the same code path is logged at once rather than hidden behind the first one. The
    map of messages is bounded (``max_keys``; the least recently logged is forgotten).
    Thread-safe. ``warning("...%s", arg)`` returns True when the line was written.
    """

    __slots__ = ("_interval", "_lock", "_max_keys", "_seen")

    def __init__(self, interval: float = 60.0, *, max_keys: int = 256) -> None:
        self._interval = interval
        self._max_keys = max_keys
        # message -> [monotonic time it was last written, lines suppressed since]
        self._seen: OrderedDict[Hashable, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _due(self, message: Hashable) -> int | None:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(message)
            if seen is not None and now - seen[0] < self._interval:
                seen[1] += 1
                return None
            suppressed = int(seen[1]) if seen is not None else 0
            self._seen[message] = [now, 0]
            self._seen.move_to_end(message)
            if len(self._seen) > self._max_keys:
                self._seen.popitem(last=False)
            return suppressed

    def log(
        self,
        level: int,
        msg: str,
        *args: object,
        exc_info: ExcInfo = False,
        key: Hashable = None,
    ) -> bool:
        """Log ``msg % args`` on the ``task_scopes`` logger unless the same message (``msg``
        and ``key``) was logged less than ``interval`` seconds ago."""
        suppressed = self._due(msg if key is None else (msg, key))
        if suppressed is None:
            return False
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, msg: str, *args: object, key: Hashable = None) -> bool:
        return self.log(logging.WARNING, msg, *args, key=key)

    def clear(self) -> None:
        """Forget every message: each is logged again at its next occurrence."""
        with self._lock:
            self._seen.clear()


class guard:  # noqa: N801 - used as ``with guard("where"):``
    """Run a block of instrumentation code; log and swallow the ``Exception`` it raises.

    Args:
        where: short name of the code path, e.g. ``"task_prerun"``; it appears in the log.

    For bugs of task_scopes only: a mistake of the caller (a bad argument, a callback
    that raises) is checked for and logged as such where it is made, never here.
    Logged with its traceback at most once a minute per ``where`` and exception type (a
    broken transport or encoder would otherwise log once per task), with the count of
    what was suppressed. A class rather than a generator-based context manager: it costs
    a fraction of that on the hot paths (publish, prerun, capture), and an instance holds
    no per-use state, so one can be kept and reused. ``BaseException``
    (``KeyboardInterrupt``, ``SystemExit``) always propagates.
    """

    __slots__ = ("where",)
    _logs: ClassVar[RateLimitedLog] = RateLimitedLog(60.0, max_keys=1024)

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
        guard._logs.log(
            logging.ERROR,
            "task_scopes: internal error in %s (swallowed)",
            self.where,
            exc_info=(exc_type, exc, tb),
            key=(self.where, exc_type),
        )
        return True

    def failed(self) -> None:
        """In an ``except Exception:`` block: what leaving ``with self:`` would do. Logs
        and returns (the caller goes on with a fallback), or re-raises under
        :func:`set_reraise`. For hot paths, where a ``try`` costs less than a ``with``."""
        if not self.__exit__(*sys.exc_info()):
            raise  # the exception the caller is handling
