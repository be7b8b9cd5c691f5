"""Checks of user-given options, shared by :class:`task_scopes.Client` (and so ``init()``)
and the Celery plugin's ``app.conf`` settings.

Each check takes the name to show (``"flush_at"``, ``"task_scopes_flush_at"``) and the
value, and returns the value as the library uses it, or raises naming it: ``TypeError``
for a value of the wrong type, ``ValueError`` for one out of range. Values are shown
shortened, and never for secrets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

__all__ = [
    "boolean",
    "count",
    "http_url",
    "optional_callable",
    "optional_count",
    "optional_text",
    "seconds",
]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is True or False (not 1, "yes"...)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__}")
    return value


def count(name: str, value: Any, minimum: int = 1) -> int:
    """An ``int`` (not a bool, not a float) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {_shown(value)}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def optional_count(name: str, value: Any, minimum: int = 0) -> int | None:
    """None, or :func:`count` with ``minimum``."""
    return None if value is None else count(name, value, minimum)


def seconds(name: str, value: Any) -> float:
    """A finite number of seconds > 0, as a float (``inf`` would overflow the timers that
    wait on it, ``nan`` compares false with everything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected seconds > 0 (a number), got {_shown(value)}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected finite seconds > 0, got {value!r}")
    return float(value)


def optional_text(name: str, value: Any) -> str | None:
    """None, or a non-empty string. The value is not shown (API keys, secrets)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a non-empty string or None, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name}: expected a non-empty string or None, got ''")
    return value


def http_url(name: str, value: Any) -> str:
    """An ``http://`` or ``https://`` URL with a host, e.g. ``https://eu.i.posthog.com``.

    Without a scheme (``eu.i.posthog.com``) or a host (``http://``) no request can be
    made: every batch would be lost, one log line at a time.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected an http(s) URL string, got {type(value).__name__}")
    problem = None
    try:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            problem = "expected an http:// or https:// URL"
        elif not parts.hostname:
            problem = "expected a URL with a host"
        elif any(c.isspace() for c in value):
            problem = "expected a URL without spaces"
        else:
            parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        problem = f"not a URL ({exc})"
    if problem is not None:
        raise ValueError(f"{name}: {problem}, got {_shown(value)}")
    return value


def optional_callable(name: str, value: Any) -> Callable[..., Any] | None:
    """None, or something callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{name}: expected a callable or None, got {type(value).__name__}")
    return cast("Callable[..., Any] | None", value)
