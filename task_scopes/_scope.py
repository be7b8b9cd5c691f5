"""Scopes: global, isolation and current, in the shape of sentry-python 2.x.

* The **global scope** is one object per process (release, service name).
* The **isolation scope** follows one unit of work: a web request, one task execution.
* The **current scope** wraps a smaller block inside it.

Reading a value walks current -> isolation -> global; the nearest scope that has it wins.
Tags merge global, then isolation, then current (later wins). Isolation and current scopes
live in :class:`contextvars.ContextVar`\\ s, so threads and asyncio tasks are isolated.

Unlike sentry-python, a scope remembers which thread or asyncio task installed it. When
another thread or task writes through the top-level API (a thread pool run with a copied
context, tasks made by ``asyncio.gather``) the scope is forked first, so siblings never see
each other's writes (copy-on-write). Every enter and exit is a ContextVar set/reset: O(1) in
the depth of nesting, no parent chain.

The copy is made by the writer that is not the owner, so it protects the parent from its
children and siblings from each other. The owner itself writes in place: a child that has
not written yet still reads its parent's scope, including what the parent sets after
spawning it. A child that must not see that opens its own ``new_context()`` (or writes)
before the parent changes anything.

Exits never raise. A block exited in another ``contextvars.Context`` than it was entered
in (an async generator closed from another task, say) cannot reset its tokens there: the
failure is logged (rate-limited) and, where the scope being left is still the active one,
what was active before it is put back.

After ``os.fork()`` the child starts with no isolation or current scope active, in every
``contextvars.Context`` (also those copied before the fork); the global scope, and the
client ``init()`` bound to it, are kept. Like posthog-python's contexts: a server that
forks workers while a request's context is active must not attribute the workers' events
to that request's user. A child that should go on with a scope is handed it explicitly
(``use_isolation_scope(scope)``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, NamedTuple

from ._internal import RateLimitedLog, guard
from ._running import running_owner as _owner

if TYPE_CHECKING:
    from ._client import Client

__all__ = [
    "Scope",
    "Tokens",
    "active_isolation_scope",
    "active_scopes",
    "active_stamps",
    "bound_client",
    "enter_scope",
    "exit_scope",
    "fork_active",
    "get_current_scope",
    "get_global_scope",
    "get_isolation_scope",
    "merged_context",
    "override_client",
]


# Every scope state gets a stamp never used before in this process (creation, fork and
# every change take a new one), so (isolation stamp, current stamp) names the exact
# context active: a key for memos of what is derived from it. itertools.count is atomic
# under the GIL.
_next_stamp = itertools.count(1).__next__


class Scope:
    """Distinct ID, session ID, window ID, groups and tags of one scope.

    A scope is a plain mutable holder; which scope a call reads or writes is decided by the
    module-level functions. ``fork()`` copies it (tags are copied, values and the bound
    client are shared).

    Example::

        scope = Scope(distinct_id="user-1", tags={"plan": "pro"})
        child = scope.fork()
        child.set_tag("plan", "free")
        assert scope.tags["plan"] == "pro"
    """

    __slots__ = (
        "_client",
        "_distinct_id",
        "_groups",
        "_owner",
        "_session_id",
        "_stamp",
        "_tags",
        "_window_id",
    )

    def __init__(
        self,
        *,
        distinct_id: str | None = None,
        session_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        window_id: str | None = None,
        groups: Mapping[str, str | int] | None = None,
    ) -> None:
        self._distinct_id = distinct_id
        self._session_id = session_id
        self._window_id = window_id
        self._groups: dict[str, str | int] = dict(groups) if groups else {}
        self._tags: dict[str, Any] = dict(tags) if tags else {}
        self._owner: object = None
        self._client: Client | None = None
        self._stamp = _next_stamp()

    @classmethod
    def _owning(
        cls,
        distinct_id: str | None,
        session_id: str | None,
        window_id: str | None,
        tags: dict[str, Any],
        groups: dict[str, str | int],
    ) -> Scope:
        """A scope that keeps ``tags`` and ``groups`` themselves, not copies: for a
        caller that built them for it (a task run's isolation scope, once per task)."""
        scope = cls.__new__(cls)
        scope._distinct_id = distinct_id
        scope._session_id = session_id
        scope._window_id = window_id
        scope._groups = groups
        scope._tags = tags
        scope._owner = None
        scope._client = None
        scope._stamp = _next_stamp()
        return scope

    def __repr__(self) -> str:
        return (
            f"Scope(distinct_id={self._distinct_id!r}, session_id={self._session_id!r}, "
            f"window_id={self._window_id!r}, tags={self._tags!r})"
        )

    def fork(self) -> Scope:
        """Return a copy that can be changed without touching this scope."""
        child = Scope.__new__(Scope)
        child._distinct_id = self._distinct_id
        child._session_id = self._session_id
        child._window_id = self._window_id
        child._groups = self._groups.copy()
        child._tags = self._tags.copy()
        child._owner = None
        child._client = self._client
        child._stamp = _next_stamp()
        return child

    @property
    def distinct_id(self) -> str | None:
        """Distinct ID set on this scope itself (not inherited), or None."""
        return self._distinct_id

    @property
    def session_id(self) -> str | None:
        """Session ID set on this scope itself (not inherited), or None."""
        return self._session_id

    @property
    def window_id(self) -> str | None:
        """posthog-js window (browser tab) ID set on this scope itself, or None."""
        return self._window_id

    @property
    def groups(self) -> Mapping[str, str | int]:
        """Groups set on this scope itself (group type -> group key), a read-only copy."""
        return dict(self._groups)

    @property
    def tags(self) -> Mapping[str, Any]:
        """Tags set on this scope itself, as a read-only copy."""
        return dict(self._tags)

    @property
    def client(self) -> Client | None:
        """The client bound to this scope itself (not inherited), or None."""
        return self._client

    def set_client(self, client: Client | None) -> None:
        """Bind ``client`` to this scope (None unbinds): events captured while this scope is
        active go to it, unless a nearer scope has one. See :func:`task_scopes.get_client`.
        """
        self._client = client

    def set_distinct_id(self, distinct_id: str | None) -> None:
        """Set (or with None, unset) the distinct ID of this scope."""
        self._distinct_id = distinct_id
        self._stamp = _next_stamp()

    def set_session_id(self, session_id: str | None) -> None:
        """Set (or with None, unset) the session ID of this scope."""
        self._session_id = session_id
        self._stamp = _next_stamp()

    def set_window_id(self, window_id: str | None) -> None:
        """Set (or with None, unset) the window ID (``$window_id``) of this scope."""
        self._window_id = window_id
        self._stamp = _next_stamp()

    def set_group(self, group_type: str, group_key: str | int | None) -> None:
        """Attribute this scope's events to a group (PostHog's ``$groups``), e.g.
        ``set_group("company", "acme")``; None removes the group type."""
        if group_key is None:
            self._groups.pop(group_type, None)
        else:
            self._groups[group_type] = group_key
        self._stamp = _next_stamp()

    def set_tag(self, key: str, value: Any) -> None:
        """Set one tag; ``key`` is a property name, ``value`` anything JSON can carry."""
        self._tags[key] = value
        self._stamp = _next_stamp()

    def update_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags at once; later keys win, as with ``dict.update``."""
        self._tags.update(tags)
        self._stamp = _next_stamp()

    def remove_tag(self, key: str) -> None:
        """Remove one tag of this scope; a missing key is ignored."""
        self._tags.pop(key, None)
        self._stamp = _next_stamp()

    def clear(self) -> None:
        """Forget distinct ID, session ID, window ID, groups and tags (a bound client
        stays: :meth:`set_client` unbinds it)."""
        self._distinct_id = None
        self._session_id = None
        self._window_id = None
        self._groups = {}
        self._tags = {}
        self._stamp = _next_stamp()


_global_scope = Scope()
_isolation_var: ContextVar[Scope | None] = ContextVar("task_scopes_isolation", default=None)
_current_var: ContextVar[Scope | None] = ContextVar("task_scopes_current", default=None)
# Bumped in a forked child, which also gets new ContextVars (see _clear_in_child).
_generation = 0
_exit_log = RateLimitedLog(60.0)
_GUARD_GET = guard("get scope")
_GUARD_EXIT = guard("exit scope")


def _writable(var: ContextVar[Scope | None]) -> Scope:
    scope = var.get()
    me = _owner()
    if scope is None:
        scope = Scope()
    elif scope._owner is me:
        return scope
    else:
        scope = scope.fork()
    scope._owner = me
    var.set(scope)
    return scope


def get_global_scope() -> Scope:
    """The process-wide scope: tags every event of this process carries."""
    return _global_scope


def get_isolation_scope() -> Scope:
    """The isolation scope of this thread or asyncio task, created on first use.

    Outside any ``isolation_scope()`` / ``new_context()`` this is a scope private to the
    running thread or task, so a ``tag()`` there is never a silent no-op and never leaks
    to a sibling.
    """
    try:
        return _writable(_isolation_var)
    except Exception:
        _GUARD_GET.failed()  # our bug: logged; the caller writes into a detached scope
        return Scope()


def active_isolation_scope() -> Scope | None:
    """The isolation scope active here, or None; unlike :func:`get_isolation_scope` it
    neither creates nor forks one."""
    return _isolation_var.get()


def active_scopes() -> tuple[Scope | None, Scope | None]:
    """The isolation and current scopes active here (None where none is); neither
    created nor forked."""
    return _isolation_var.get(), _current_var.get()


def active_stamps() -> tuple[int, int]:
    """Stamps of the isolation and current scopes active here (0 where none is): equal
    pairs mean the same context, as :func:`merged_context` without the global scope
    would give it (a mutable tag value changed in place excepted). Neither creates nor
    forks a scope."""
    isolation = _isolation_var.get()
    current = _current_var.get()
    return (
        isolation._stamp if isolation is not None else 0,
        current._stamp if current is not None else 0,
    )


def get_current_scope() -> Scope:
    """The current scope of this thread or asyncio task, created on first use."""
    try:
        return _writable(_current_var)
    except Exception:
        _GUARD_GET.failed()
        return Scope()


class Tokens(NamedTuple):
    """What :func:`enter_scope` returns and :func:`exit_scope` takes: the ContextVar
    tokens (no isolation token when only the current scope was entered), the scopes
    entered, and the process generation (see ``os.fork()`` in the module docstring)."""

    isolation: Token[Scope | None] | None
    current: Token[Scope | None]
    entered_isolation: Scope | None
    entered_current: Scope
    generation: int


def enter_scope(isolation: Scope | None, current: Scope | None = None) -> Tokens:
    """Make ``isolation`` (None: leave the isolation scope as it is) and ``current``
    (default a new empty scope) active here; the running thread or task owns them.

    Returns the tokens :func:`exit_scope` needs; they restore exactly what was active
    before, whatever happened in between. Used where a ``with`` block cannot span the
    work, e.g. Celery's ``task_prerun`` / ``task_postrun``.
    """
    if current is None:
        current = Scope()
    me = _owner()
    iso_token = None
    if isolation is not None:
        isolation._owner = me
        iso_token = _isolation_var.set(isolation)
    current._owner = me
    return Tokens(iso_token, _current_var.set(current), isolation, current, _generation)


def _reset(var: ContextVar[Scope | None], token: Token[Scope | None], entered: Scope) -> bool:
    """``var.reset(token)``; True when that failed: the token belongs to another Context
    or was used already. Then, if ``entered`` is still the active scope here, the value
    before it is put back; otherwise this Context is left alone (it may be one that never
    saw the block, e.g. a generator finalized by the garbage collector in another thread).
    """
    try:
        var.reset(token)
        return False
    except (ValueError, RuntimeError, LookupError):
        if var.get() is entered:
            previous = token.old_value
            var.set(None if previous is Token.MISSING else previous)
        return True


def exit_scope(tokens: Tokens, where: str = "scope") -> None:
    """Restore what was active before the :func:`enter_scope` that returned ``tokens``.

    Never raises. Tokens of another ``contextvars.Context`` (or used already) are logged,
    rate-limited, and the scopes they entered are taken off where still active. Tokens
    from before an ``os.fork()`` are ignored in the child, which starts with none active.

    Args:
        where: what is exited, for the log line (``"new_context"``, ``"task_postrun"``).
    """
    try:
        if tokens.generation != _generation:
            return
        failed = _reset(_current_var, tokens.current, tokens.entered_current)
        if tokens.isolation is not None and tokens.entered_isolation is not None:
            failed = _reset(_isolation_var, tokens.isolation, tokens.entered_isolation) or failed
        if failed:
            _exit_log.warning(
                "task_scopes: %s exited in another contextvars.Context than it was entered "
                "in (e.g. an async generator closed from another task); its scope was "
                "taken off here where it was still the active one",
                where,
            )
    except Exception:
        _GUARD_EXIT.failed()


def fork_active() -> tuple[Scope, Scope]:
    """Copies of the active isolation and current scopes (new empty ones where none is
    active), for a block that must inherit everything and leak nothing back."""
    isolation = _isolation_var.get()
    current = _current_var.get()
    return (
        isolation.fork() if isolation is not None else Scope(),
        current.fork() if current is not None else Scope(),
    )


class MergedContext(NamedTuple):
    """What :func:`merged_context` returns: ``tags`` and ``groups`` (group type -> group
    key) are new dicts the caller may keep."""

    distinct_id: str | None
    session_id: str | None
    tags: dict[str, Any]
    window_id: str | None
    groups: dict[str, str | int]


def merged_context(include_global: bool = True) -> MergedContext:
    """The context as seen from here: current -> isolation -> global.

    Tags are a new dict the caller may keep or change. ``include_global=False`` leaves the
    global scope out: what a task published from here carries (the global scope describes
    the producer process, and the worker has its own).
    """
    isolation = _isolation_var.get()
    current = _current_var.get()
    tags = _global_scope._tags.copy() if include_global else {}
    groups = _global_scope._groups.copy() if include_global else {}
    distinct_id = session_id = window_id = None
    for scope in (current, isolation):
        if scope is None:
            continue
        if distinct_id is None:
            distinct_id = scope._distinct_id
        if session_id is None:
            session_id = scope._session_id
        if window_id is None:
            window_id = scope._window_id
    if isolation is not None:
        if isolation._tags:
            tags.update(isolation._tags)
        if isolation._groups:
            groups.update(isolation._groups)
    if current is not None:
        if current._tags:
            tags.update(current._tags)
        if current._groups:
            groups.update(current._groups)
    if include_global:
        if distinct_id is None:
            distinct_id = _global_scope._distinct_id
        if session_id is None:
            session_id = _global_scope._session_id
        if window_id is None:
            window_id = _global_scope._window_id
    return MergedContext(distinct_id, session_id, tags, window_id, groups)


# Set by task_scopes.testing.capture_events(): wins over every binding, in every thread.
_override: Client | None = None


def override_client(client: Client | None) -> Client | None:
    """Make ``client`` win over every scope's binding, process-wide (None: stop). Returns
    the previous override. For ``task_scopes.testing.capture_events()``."""
    global _override
    previous, _override = _override, client
    return previous


def bound_client() -> Client | None:
    """The client events captured here go to: the override, else the nearest scope's
    (current -> isolation -> global), else None."""
    if _override is not None:
        return _override
    current = _current_var.get()
    if current is not None and current._client is not None:
        return current._client
    isolation = _isolation_var.get()
    if isolation is not None and isolation._client is not None:
        return isolation._client
    return _global_scope._client


def _clear_in_child() -> None:
    """After ``os.fork()``, in the child: no isolation or current scope is active, in any
    Context. New ContextVars do that for every Context at once, copies made before the
    fork included; tokens of the old ones are recognised by :data:`_generation`. (One
    pair of ContextVars per fork of a process: bounded.)"""
    global _isolation_var, _current_var, _generation
    _generation += 1
    _isolation_var = ContextVar("task_scopes_isolation", default=None)
    _current_var = ContextVar("task_scopes_current", default=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_clear_in_child)
