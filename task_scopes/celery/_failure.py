"""What a task failure or retry reports: the exception the task raised, by its own type.

Celery hands ``task_failure`` a picklable stand-in when the task's exception cannot be
pickled (``celery.utils.serialization.get_pickleable_exception``): an
``UnpickleableExceptionWrapper``, or an instance of the nearest picklable base class
built from the same arguments. Reported as is, every such failure would fall into one
error group under the wrong type.
"""

from __future__ import annotations

import sys
from typing import Any

from celery.utils.serialization import UnpickleableExceptionWrapper

from .._json import clean_str

__all__ = ["original_exception", "summary"]


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
