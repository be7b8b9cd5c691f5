"""What a task failure or retry reports: the exception the task raised, by its own type.

Which outcomes are failures: never ``Retry``, ``Ignore``, ``Reject`` or the types in the
task's ``throws``; the ``task_scopes_task_filter`` decides which tasks are captured at all.

Celery hands ``task_failure`` a picklable stand-in when the task's exception cannot be
pickled (``celery.utils.serialization.get_pickleable_exception``): an
``UnpickleableExceptionWrapper``, or an instance of the nearest picklable base class
built from the same arguments. Reported as is, every such failure would fall into one
error group under the wrong type.
"""

from __future__ import annotations

import sys
from typing import Any

from celery.exceptions import Ignore, Reject, Retry
from celery.utils.serialization import UnpickleableExceptionWrapper

from .. import _api
from .._internal import logger
from .._json import clean_str
from ._registry import Installed

__all__ = [
    "NOT_CAPTURED",
    "capture_failure",
    "expected",
    "original_exception",
    "summary",
    "wanted",
]

NOT_CAPTURED = (Retry, Ignore, Reject)


def wanted(installed: Installed, task: Any) -> bool:
    """Whether ``task_scopes_task_filter`` lets ``task`` be captured (True without one,
    and when it raises: the error is logged)."""
    task_filter = installed.options.task_filter
    if task_filter is None:
        return True
    try:
        return bool(task_filter(getattr(task, "name", "")))
    except Exception:
        logger.exception("task_scopes: task_filter raised; capturing anyway")
        return True


def expected(task: Any, exc: BaseException) -> bool:
    """``Retry``, ``Ignore``, ``Reject`` and the task's ``throws``: outcomes, not errors."""
    if isinstance(exc, NOT_CAPTURED):
        return True
    throws = getattr(task, "throws", ()) or ()
    return bool(throws) and isinstance(exc, tuple(throws))


def capture_failure(
    installed: Installed, task: Any, exc: BaseException, duration_ms: float | None
) -> None:
    """Capture a failed run in the active scopes: ``$exception`` (unless expected) and,
    with ``task_scopes_task_events``, ``celery task failure``. ``duration_ms``: the run's
    duration in milliseconds, None where it is not known (the worker's main process)."""
    options = installed.options
    if not wanted(installed, task):
        return
    client = _api.get_client()
    exc = original_exception(exc)
    if options.capture_exceptions and not expected(task, exc):
        client.capture_exception(exc, mechanism="celery", handled=False)
    if options.task_events:
        props: dict[str, Any] = {"celery_state": "FAILURE"}
        props.update(summary(exc, installed.limits.max_value_chars))
        if duration_ms is not None:
            props["celery_duration_ms"] = duration_ms
        client.capture("celery task failure", properties=props)


def original_exception(exc: BaseException) -> BaseException:
    """The exception the task raised, for ``exc`` as a Celery signal gives it.

    Celery sends ``task_failure`` from inside the ``except`` block that caught the task's
    exception, so ``sys.exc_info()`` holds the original there: it is taken when its
    traceback is the one Celery gave the stand-in (the same failure). Elsewhere an
    ``UnpickleableExceptionWrapper`` is restored to an exception of the original class
    name, module and arguments (``exc_cls_name``, ``exc_module``, ``exc_args``), with the
    wrapper's traceback. Anything else is returned unchanged.
    """
    handled = sys.exc_info()[1]
    if (
        handled is not None
        and handled is not exc
        and handled.__traceback__ is not None
        and handled.__traceback__ is exc.__traceback__
    ):
        return handled
    given = exc  # isinstance() below narrows exc to an untyped class
    if not isinstance(exc, UnpickleableExceptionWrapper):
        return given
    try:
        restored: BaseException = exc.restore()
    except Exception:  # arguments the original class does not take
        return given
    return restored.with_traceback(given.__traceback__)


def summary(exc: BaseException, limit: int) -> dict[str, Any]:
    """``celery_exception`` (the type's name) and ``celery_exception_message`` (its
    message, control characters stripped, cut to ``limit`` characters) of ``exc``."""
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable exception>"
    return {
        "celery_exception": type(exc).__name__,
        "celery_exception_message": clean_str(message, limit),
    }
