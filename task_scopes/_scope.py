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
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ._client import Client

__all__ = [
    "Scope",
    "Tokens",
    "active_isolation_scope",
    "bound_client",
    "enter_scope",
    "exit_scope",
    "fork_active",
    "get_current_scope",
    "get_global_scope",
    "get_isolation_scope",
    "isolation_scope",
    "merged_context",
    "merged_groups",
    "new_scope",
    "override_client",
    "use_isolation_scope",
]


def _owner() -> object:
    """The running asyncio task, else the running thread's ``Thread`` object.

    Objects, not ``threading.get_ident()``: a scope keeps its owner alive, so the owner's
    identity cannot be reused, whereas a dead thread's ident is handed to the next thread
    (glibc reuses them at once) which would then write into the dead thread's scopes in
    place, through every context copied from it. ``_get_running_loop()`` returns None
    outside a loop where ``current_task()`` would raise; it is in ``asyncio.__all__``.
    """
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        loop = asyncio._get_running_loop()
        if loop is not None:
            task = asyncio.current_task(loop)
            if task is not None:
                return task
    return threading.current_thread()


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

    def set_session_id(self, session_id: str | None) -> None:
        """Set (or with None, unset) the session ID of this scope."""
        self._session_id = session_id

    def set_window_id(self, window_id: str | None) -> None:
        """Set (or with None, unset) the window ID (``$window_id``) of this scope."""
        self._window_id = window_id

    def set_group(self, group_type: str, group_key: str | int | None) -> None:
        """Attribute this scope's events to a group (PostHog's ``$groups``), e.g.
        ``set_group("company", "acme")``; None removes the group type."""
        if group_key is None:
            self._groups.pop(group_type, None)
        else:
            self._groups[group_type] = group_key

    def set_tag(self, key: str, value: Any) -> None:
        """Set one tag; ``key`` is a property name, ``value`` anything JSON can carry."""
        self._tags[key] = value

    def update_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags at once; later keys win, as with ``dict.update``."""
        self._tags.update(tags)

    def remove_tag(self, key: str) -> None:
        """Remove one tag of this scope; a missing key is ignored."""
        self._tags.pop(key, None)

    def clear(self) -> None:
        """Forget distinct ID, session ID, window ID, groups and tags."""
        self._distinct_id = None
        self._session_id = None
        self._window_id = None
        self._groups = {}
        self._tags = {}
        self._client = None


_global_scope = Scope()
_isolation_var: ContextVar[Scope | None] = ContextVar("task_scopes_isolation", default=None)
_current_var: ContextVar[Scope | None] = ContextVar("task_scopes_current", default=None)


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
    return _writable(_isolation_var)


def active_isolation_scope() -> Scope | None:
    """The isolation scope active here, or None; unlike :func:`get_isolation_scope` it
    neither creates nor forks one."""
    return _isolation_var.get()


def get_current_scope() -> Scope:
    """The current scope of this thread or asyncio task, created on first use."""
    return _writable(_current_var)


class Tokens(NamedTuple):
    """What :func:`enter_scope` returns and :func:`exit_scope` takes."""

    isolation: Token[Scope | None]
    current: Token[Scope | None]


def enter_scope(isolation: Scope, current: Scope | None = None) -> Tokens:
    """Make ``isolation`` (and ``current``, default a new empty scope) active here.

    Returns the tokens :func:`exit_scope` needs; that pair restores exactly what was active
    before, whatever happened in between. Used where a ``with`` block cannot span the
    work, e.g. Celery's ``task_prerun`` / ``task_postrun``.
    """
    me = _owner()
    isolation._owner = me
    if current is None:
        current = Scope()
    current._owner = me
    return Tokens(_isolation_var.set(isolation), _current_var.set(current))


def exit_scope(tokens: Tokens) -> None:
    """Restore what was active before the :func:`enter_scope` that returned ``tokens``.

    Raises:
        ValueError / RuntimeError: from ``ContextVar.reset`` when the tokens were already
            used or belong to another ``contextvars.Context``.
    """
    _current_var.reset(tokens.current)
    _isolation_var.reset(tokens.isolation)


def fork_active() -> tuple[Scope, Scope]:
    """Copies of the active isolation and current scopes (new empty ones where none is
    active), for a block that must inherit everything and leak nothing back."""
    isolation = _isolation_var.get()
    current = _current_var.get()
    return (
        isolation.fork() if isolation is not None else Scope(),
        current.fork() if current is not None else Scope(),
    )


@contextmanager
def isolation_scope() -> Iterator[Scope]:
    """Fork the isolation and current scopes for the block; yield the new isolation scope.

    Example::

        tag("plan", "pro")
        with isolation_scope() as scope:
            scope.set_tag("plan", "free")   # only inside the block
        assert get_tags()["plan"] == "pro"
    """
    isolation, current = fork_active()
    tokens = enter_scope(isolation, current)
    try:
        yield isolation
    finally:
        exit_scope(tokens)


@contextmanager
def new_scope() -> Iterator[Scope]:
    """Fork the current scope for the block; yield it. The isolation scope is shared."""
    current = _current_var.get()
    forked = current.fork() if current is not None else Scope()
    forked._owner = _owner()
    token = _current_var.set(forked)
    try:
        yield forked
    finally:
        _current_var.reset(token)


@contextmanager
def use_isolation_scope(scope: Scope) -> Iterator[Scope]:
    """Make an existing scope the isolation scope for the block (the current scope is forked).

    The running thread or task becomes the scope's owner, so top-level setters write into
    it rather than into a copy.
    """
    current = _current_var.get()
    tokens = enter_scope(scope, current.fork() if current is not None else Scope())
    try:
        yield scope
    finally:
        exit_scope(tokens)


class MergedContext(NamedTuple):
    """What :func:`merged_context` returns: ``tags`` is a new dict the caller may keep."""

    distinct_id: str | None
    session_id: str | None
    tags: dict[str, Any]
    window_id: str | None


def merged_context(include_global: bool = True) -> MergedContext:
    """The context as seen from here: current -> isolation -> global.

    Tags are a new dict the caller may keep or change. ``include_global=False`` leaves the
    global scope out: what a task published from here carries (the global scope describes
    the producer process, and the worker has its own).
    """
    isolation = _isolation_var.get()
    current = _current_var.get()
    tags = _global_scope._tags.copy() if include_global else {}
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
    if isolation is not None and isolation._tags:
        tags.update(isolation._tags)
    if current is not None and current._tags:
        tags.update(current._tags)
    if include_global:
        if distinct_id is None:
            distinct_id = _global_scope._distinct_id
        if session_id is None:
            session_id = _global_scope._session_id
        if window_id is None:
            window_id = _global_scope._window_id
    return MergedContext(distinct_id, session_id, tags, window_id)


def merged_groups(include_global: bool = True) -> dict[str, str | int]:
    """Groups as seen from here, a new dict: global, then isolation, then current scope
    (later wins per group type); ``include_global`` as in :func:`merged_context`."""
    groups = _global_scope._groups.copy() if include_global else {}
    for scope in (_isolation_var.get(), _current_var.get()):
        if scope is not None and scope._groups:
            groups.update(scope._groups)
    return groups


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
