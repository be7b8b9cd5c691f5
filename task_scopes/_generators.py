"""Decorated generator functions: the decorator's scopes are active around each resumption
of the body and nowhere else.

A ``with new_context():`` around a ``yield`` would leave the generator's scope active in
the caller between resumptions, and a decorator that wraps the call alone closes it before
the body starts. Here each ``next()`` / ``send()`` / ``throw()`` / ``close()`` makes the
generator's own scopes active (:func:`task_scopes._blocks.resume`), runs the body to its
next ``yield``, keeps what the body left active and restores the caller's exactly
(:func:`task_scopes._blocks.suspend`). The scopes are opened at the first resumption,
forked from the caller's there (unless ``fresh``), and dropped when the generator is done.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Callable, Generator
from types import TracebackType
from typing import Any

from ._blocks import Resumed, Suspended, resume, suspend
from ._internal import guard
from ._scope import Scope

__all__ = ["scoped_async_generator", "scoped_generator"]

Scopes = Callable[[], "tuple[Scope, Scope]"]
OnException = Callable[[BaseException], None]
_GUARD = guard("scoped generator")


class _Resumption:
    """The scopes of one run of a decorated generator, made active around each resumption
    of its body (``with run:``). A generator never runs twice at once, so one object per
    run holds the state of the resumption in progress."""

    __slots__ = ("_on_exception", "_resumed", "_scopes", "_state")

    def __init__(self, scopes: Scopes, on_exception: OnException) -> None:
        self._scopes = scopes
        self._on_exception = on_exception
        self._state: Suspended | None = None
        self._resumed: Resumed | None = None

    def __enter__(self) -> None:
        try:
            if self._state is None:  # the first resumption opens the generator's context
                self._state = Suspended(*self._scopes())
            self._resumed = resume(self._state)
        except Exception:
            _GUARD.failed()  # our bug: logged; this resumption runs in the caller's scopes

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None:
                self._on_exception(exc)  # inside the generator's scopes
        finally:
            resumed, self._resumed = self._resumed, None
            if resumed is not None:
                self._state = suspend(resumed, "scoped generator")


def scoped_generator(
    func: Callable[..., Generator[Any, Any, Any]], scopes: Scopes, on_exception: OnException
) -> Callable[..., Generator[Any, Any, Any]]:
    """Wrap a generator function: each run gets the scopes ``scopes()`` returns at its first
    resumption, active while its body runs; ``on_exception`` sees an exception escaping the
    body (inside those scopes) before it propagates. The wrapper is a generator function
    itself (``inspect.isgeneratorfunction`` holds), passing ``send``/``throw``/``close``
    and the return value through."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        run = _Resumption(scopes, on_exception)
        with run:
            gen = func(*args, **kwargs)
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            with run:
                try:
                    value = gen.send(sent) if thrown is None else gen.throw(thrown)
                except StopIteration as stop:
                    return stop.value
            try:
                sent, thrown = (yield value), None
            except GeneratorExit:
                with run:
                    gen.close()
                raise
            except BaseException as exc:  # thrown in by the caller: on into the body
                sent, thrown = None, exc

    return wrapper


def scoped_async_generator(
    func: Callable[..., AsyncGenerator[Any, Any]], scopes: Scopes, on_exception: OnException
) -> Callable[..., AsyncGenerator[Any, Any]]:
    """:func:`scoped_generator` for async generator functions (``asend``/``athrow``/
    ``aclose`` passed through)."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        run = _Resumption(scopes, on_exception)
        with run:
            agen = func(*args, **kwargs)
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            with run:
                try:
                    if thrown is None:
                        value = await agen.asend(sent)
                    else:
                        value = await agen.athrow(thrown)
                except StopAsyncIteration:
                    return
            try:
                sent, thrown = (yield value), None
            except GeneratorExit:
                with run:
                    await agen.aclose()
                raise
            except BaseException as exc:  # thrown in by the caller: on into the body
                sent, thrown = None, exc

    return wrapper
