"""Exception -> PostHog ``$exception_list``.

Outermost exception first, then its ``__cause__`` (or, when not suppressed, its
``__context__``), each with a raw stack trace whose frames run oldest call first, as
PostHog's error tracking expects.
"""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
import traceback
from types import TracebackType
from typing import Any

__all__ = ["exception_list", "exception_message", "mark_captured"]

_MAX_CHAIN = 10
_MAX_FRAMES = 100
_MAX_VALUE = 2_000
_MARK = "__task_scopes_captured__"

_NOT_IN_APP = tuple(
    {os.path.realpath(p) + os.sep for p in sysconfig.get_paths().values() if p}
    | {os.path.realpath(sys.prefix) + os.sep, os.path.realpath(sys.base_prefix) + os.sep}
)


def mark_captured(exc: BaseException) -> bool:
    """Mark ``exc`` as captured. Returns False when it already was (capture it once)."""
    if getattr(exc, _MARK, False):
        return False
    try:
        setattr(exc, _MARK, True)
    except Exception:  # exceptions without __dict__: capture, cannot dedupe
        pass
    return True


def _in_app(abs_path: str) -> bool:
    if "site-packages" in abs_path or "dist-packages" in abs_path:
        return False
    return not abs_path.startswith(_NOT_IN_APP)


def _frames(tb: TracebackType | None) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    for frame, lineno in traceback.walk_tb(tb):
        code = frame.f_code
        filename = code.co_filename
        abs_path = os.path.abspath(filename) if filename and filename[0] != "<" else filename
        frames.append(
            {
                "filename": filename,
                "abs_path": abs_path,
                "function": code.co_name,
                "module": frame.f_globals.get("__name__"),
                "lineno": lineno,
                "context_line": linecache.getline(filename, lineno).strip() or None,
                "in_app": _in_app(abs_path),
                "platform": "python",
            }
        )
    if len(frames) > _MAX_FRAMES:  # keep both ends: entry point and raise site
        half = _MAX_FRAMES // 2
        frames = frames[:half] + frames[-half:]
    return frames


def exception_message(exc: BaseException) -> str:
    """``str(exc)``, cut to 2,000 characters; a placeholder when its ``__str__`` raises."""
    try:
        value = str(exc)
    except Exception:
        value = "<unprintable exception>"
    return value[:_MAX_VALUE]


def exception_list(
    exc: BaseException, *, mechanism: str = "generic", handled: bool = True
) -> list[dict[str, Any]]:
    """Describe ``exc`` and its chain as PostHog ``$exception_list`` entries.

    Args:
        exc: the exception; its ``__traceback__`` gives the frames.
        mechanism: who caught it, e.g. ``"celery"``; only the outermost entry carries it,
            chained entries are ``"chained"``.
        handled: False when the exception escaped user code (a failed task).

    Returns:
        A list of dicts, outermost exception first; cycles and chains longer than 10 cut.
    """
    entries: list[dict[str, Any]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(entries) < _MAX_CHAIN:
        seen.add(id(current))
        cls = type(current)
        entries.append(
            {
                "type": cls.__qualname__,
                "value": exception_message(current),
                "module": cls.__module__,
                "mechanism": {
                    "type": mechanism if not entries else "chained",
                    "handled": handled,
                    "synthetic": False,
                },
                "stacktrace": {"type": "raw", "frames": _frames(current.__traceback__)},
            }
        )
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return entries
