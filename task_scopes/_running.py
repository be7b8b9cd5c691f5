"""Which thread or asyncio task is running: the owner a scope remembers (see ``_scope``)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["running_owner"]

# asyncio's _get_running_loop and current_task, kept once asyncio has finished importing
# (see _find_running_loop); None until then.
_running_loop: Callable[[], Any] | None = None
_current_task: Callable[[Any], Any] | None = None


def _find_running_loop() -> Callable[[], Any] | None:
    """``asyncio._get_running_loop`` once asyncio has finished importing, else None.

    While another thread runs the first ``import asyncio``, ``sys.modules["asyncio"]`` is
    the half-built package, whose names appear one submodule at a time: reading them
    there raised ``AttributeError`` out of ``new_context()`` and killed the caller's
    thread. A name missing there means no loop can be running yet (a loop needs the whole
    package), so the thread owns. Both names there means the submodules defining them have
    run to the end, so both are the final functions (the C versions where built). They are
    kept from then on: no later call reads ``sys.modules``, whatever is put there.
    """
    global _running_loop, _current_task
    asyncio = sys.modules.get("asyncio")
    running_loop: Callable[[], Any] | None = getattr(asyncio, "_get_running_loop", None)
    current_task: Callable[[Any], Any] | None = getattr(asyncio, "current_task", None)
    if not callable(running_loop) or not callable(current_task):
        return None
    _current_task = current_task
    _running_loop = running_loop
    return running_loop


def running_owner() -> object:
    """The running asyncio task, else the running thread's ``Thread`` object.

    Objects, not ``threading.get_ident()``: a scope keeps its owner alive, so the owner's
    identity cannot be reused, whereas a dead thread's ident is handed to the next thread
    (glibc reuses them at once) which would then write into the dead thread's scopes in
    place, through every context copied from it. ``_get_running_loop()`` returns None
    outside a loop where ``current_task()`` would raise; it is in ``asyncio.__all__``.
    Never imports asyncio: a process without it has no tasks.
    """
    running_loop = _running_loop or _find_running_loop()
    if running_loop is not None:
        loop = running_loop()
        if loop is not None and _current_task is not None:
            task = _current_task(loop)
            if task is not None:
                return task
    return threading.current_thread()
