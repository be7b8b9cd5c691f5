"""Blocks that make scopes active: the sentry-shaped context managers, the per-Context
bookkeeping of ``new_context``, and the resumptions of a decorated generator.

Everything goes through :func:`task_scopes._scope.enter_scope` / ``exit_scope``, so exits
never raise (see ``_scope``), and entering never raises either: when task_scopes itself
fails there, the failure is logged (re-raised under the test suite's switch) and the block
runs in the scopes that were active before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import NamedTuple

from ._internal import RateLimitedLog, guard
from ._scope import Scope, Tokens, active_scopes, enter_scope, exit_scope, fork_active

__all__ = [
    "Resumed",
    "Suspended",
    "enter_keyed",
    "exit_keyed",
    "isolation_scope",
    "new_scope",
    "resume",
    "suspend",
    "use_isolation_scope",
]

_GUARD_ENTER = guard("enter scope")
_GUARD_EXIT = guard("exit scope")
_exit_log = RateLimitedLog(60.0)

Make = Callable[[], "tuple[Scope | None, Scope]"]


def _guarded_enter(make: Make) -> Tokens | None:
    try:
        isolation, current = make()
        return enter_scope(isolation, current)
    except Exception:
        _GUARD_ENTER.failed()  # our bug: logged; the block runs in the enclosing scopes
        return None


# -- the sentry-shaped context managers ------------------------------------------------------


@contextmanager
def isolation_scope() -> Iterator[Scope]:
    """Fork the isolation and current scopes for the block; yield the new isolation scope.

    Example::

        tag("plan", "pro")
        with isolation_scope() as scope:
            scope.set_tag("plan", "free")   # only inside the block
        assert get_tags()["plan"] == "pro"
    """
    tokens = _guarded_enter(fork_active)
    try:
        yield (tokens and tokens.entered_isolation) or Scope()
    finally:
        if tokens is not None:
            exit_scope(tokens, "isolation_scope")


def _fork_current() -> tuple[None, Scope]:
    current = active_scopes()[1]
    return None, current.fork() if current is not None else Scope()


@contextmanager
def new_scope() -> Iterator[Scope]:
    """Fork the current scope for the block; yield it. The isolation scope is shared."""
    tokens = _guarded_enter(_fork_current)
    try:
        yield tokens.entered_current if tokens is not None else Scope()
    finally:
        if tokens is not None:
            exit_scope(tokens, "new_scope")


@contextmanager
def use_isolation_scope(scope: Scope) -> Iterator[Scope]:
    """Make an existing scope the isolation scope for the block (the current scope is forked).

    The running thread or task becomes the scope's owner, so top-level setters write into
    it rather than into a copy.
    """
    tokens = _guarded_enter(lambda: (scope, _fork_current()[1]))
    try:
        yield scope
    finally:
        if tokens is not None:
            exit_scope(tokens, "use_isolation_scope")


# -- new_context: the tokens of each entry, kept per Context --------------------------------


class _Open:
    """One block entered here and not exited yet; ``below`` is the one entered before."""

    __slots__ = ("below", "key", "tokens")

    def __init__(self, key: object, tokens: Tokens | None, below: _Open | None) -> None:
        self.key, self.tokens, self.below = key, tokens, below


# Innermost first. A ContextVar, so each thread and task (and each copy of a context) has
# its own stack: one block object entered by 8 threads at once, or nested in itself, keeps
# the tokens of every entry apart.
_open_var: ContextVar[_Open | None] = ContextVar("task_scopes_open", default=None)


def enter_keyed(key: object, make: Make) -> Scope:
    """Enter the scopes ``make()`` returns, the tokens kept in this Context under ``key``
    (the block object) for :func:`exit_keyed`. Returns the isolation scope entered (a
    detached one when entering failed). Never raises."""
    tokens = _guarded_enter(make)
    _open_var.set(_Open(key, tokens, _open_var.get()))
    return (tokens and tokens.entered_isolation) or Scope()


def exit_keyed(key: object, where: str) -> None:
    """Exit the innermost block entered here under ``key``. Never raises.

    Blocks above it that were never exited here (a generator suspended inside one) go
    with it. A Context holding no open entry of ``key`` has nothing of it active: that
    is logged, and nothing changes.
    """
    try:
        entry = _open_var.get()
        while entry is not None and entry.key is not key:
            entry = entry.below
        if entry is None:
            _exit_log.warning(
                "task_scopes: %s exited in a contextvars.Context where it is not open "
                "(entered elsewhere, e.g. a generator finalized in another thread, or an "
                "enclosing block was exited first); nothing to restore there",
                where,
            )
            return
        _open_var.set(entry.below)
        if entry.tokens is not None:
            exit_scope(entry.tokens, where)
    except Exception:
        _GUARD_EXIT.failed()


# -- a decorated generator: its own scopes around each resumption ----------------------------


class Suspended(NamedTuple):
    """A generator's scopes between two resumptions: what to make active again."""

    isolation: Scope
    current: Scope
    blocks: _Open | None = None


class Resumed(NamedTuple):
    """What :func:`suspend` needs to restore the caller's scopes."""

    tokens: Tokens
    blocks: Token[_Open | None]


def resume(state: Suspended) -> Resumed:
    """Make a generator's scopes active here for one resumption; the running thread or
    task owns them while it runs the body. Raises only for task_scopes' own bugs."""
    return Resumed(enter_scope(state.isolation, state.current), _open_var.set(state.blocks))


def suspend(resumed: Resumed, where: str) -> Suspended:
    """Keep the scopes active at the end of a resumption (the body may have forked them
    or opened blocks of its own across its ``yield``), then restore the caller's exactly.
    Never raises."""
    isolation, current = active_scopes()
    tokens = resumed.tokens
    state = Suspended(
        isolation or tokens.entered_isolation or Scope(),
        current or tokens.entered_current,
        _open_var.get(),
    )
    exit_scope(tokens, where)
    try:
        _open_var.reset(resumed.blocks)  # same resumption, so the same Context
    except Exception:
        _GUARD_EXIT.failed()
    return state
