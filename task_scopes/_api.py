"""The PostHog-v6-shaped API: contexts, tags, identity, and the client they resolve."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar, cast

from . import _defaults
from ._blocks import enter_keyed, exit_keyed
from ._client import Client, register_exit_flush
from ._generators import scoped_async_generator, scoped_generator
from ._internal import RateLimitedLog, guard
from ._scope import (
    Scope,
    bound_client,
    fork_active,
    get_global_scope,
    get_isolation_scope,
    merged_context,
)

__all__ = [
    "capture",
    "capture_exception",
    "flush",
    "get_client",
    "get_context_distinct_id",
    "get_context_groups",
    "get_context_session_id",
    "get_tags",
    "identify_context",
    "init",
    "new_context",
    "scoped",
    "set",
    "set_context_groups",
    "set_context_session",
    "set_once",
    "shutdown",
    "tag",
]

F = TypeVar("F", bound=Callable[..., Any])

_DISABLED = Client(disabled=True)
# Every public function runs its own work inside a guard: a failure of task_scopes is
# logged and the call returns its "nothing happened" value; the caller's code goes on.
_GUARD_API = guard("api")
_GUARD_CAPTURE = guard("new_context capture_exception")


def get_client() -> Client:
    """The client events captured here go to.

    The nearest scope with a client wins: current, then isolation, then global (where
    :func:`init` binds its client); inside ``task_scopes.testing.capture_events()`` that
    block's client wins over all of them. With none bound, a disabled client whose
    ``capture()`` returns None.

    Example::

        task_scopes.init("phc_main")
        with task_scopes.isolation_scope() as scope:
            scope.set_client(task_scopes.Client("phc_other"))
            get_client().api_key            # "phc_other"
        get_client().api_key                # "phc_main"
    """
    try:
        client = bound_client()
    except Exception:
        _GUARD_API.failed()
        client = None
    return client if client is not None else _DISABLED


def init(api_key: str | None = None, host: str | None = None, **client_options: Any) -> Client:
    """Create a client, bind it to the global scope, and return it.

    Module-level calls (:func:`capture`...) use it wherever no nearer scope has a client
    of its own (a Celery app installed with ``task_scopes_api_key`` binds one to each of
    its task runs). A client that ``init()`` bound before is flushed and shut down (bounded
    by its ``timeout`` option, default 10 s). Every client is flushed at interpreter exit.

    Args:
        api_key: project API key; None gives a disabled client unless ``transport`` is set.
        host: capture host; default ``https://us.i.posthog.com``.
        **client_options: keyword options of :class:`Client`.

    Raises:
        ValueError / TypeError: for invalid options, naming the option.
    """
    client = Client(api_key, host or _defaults.HOST, **client_options)
    scope = get_global_scope()
    old = scope.client
    scope.set_client(client)
    with guard("init"):
        register_exit_flush()
        if old is not None and old is not client and not old.disabled:
            old.shutdown(timeout=client_options.get("timeout", _defaults.TIMEOUT))
    return client


def capture(
    event: str,
    *,
    distinct_id: str | None = None,
    properties: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    uuid: str | None = None,
    groups: Mapping[str, str | int] | None = None,
) -> str | None:
    """Capture an event with the client of :func:`get_client`; see :meth:`Client.capture`.

    Example::

        with new_context():
            identify_context("user-1")
            capture("order_processed")     # distinct_id "user-1"
        capture("order_processed")         # personless: no distinct ID out here
        capture("seat_added", groups={"company": "acme"})   # $groups: {"company": "acme"}
    """
    try:
        return get_client().capture(
            event,
            distinct_id=distinct_id,
            properties=properties,
            timestamp=timestamp,
            uuid=uuid,
            groups=groups,
        )
    except Exception:
        _GUARD_API.failed()
        return None


def capture_exception(
    exc: BaseException | None = None,
    *,
    distinct_id: str | None = None,
    properties: Mapping[str, Any] | None = None,
) -> str | None:
    """Capture an exception with the client of :func:`get_client`; see
    :meth:`Client.capture_exception`."""
    try:
        return get_client().capture_exception(exc, distinct_id=distinct_id, properties=properties)
    except Exception:
        _GUARD_API.failed()
        return None


def set(*, distinct_id: str | None = None, properties: Mapping[str, Any]) -> str | None:  # noqa: A001
    """Set person properties with the client of :func:`get_client` (``$set``)."""
    try:
        return get_client().set(distinct_id=distinct_id, properties=properties)
    except Exception:
        _GUARD_API.failed()
        return None


def set_once(*, distinct_id: str | None = None, properties: Mapping[str, Any]) -> str | None:
    """Set person properties where unset (``$set_once``), with :func:`get_client`'s
    client."""
    try:
        return get_client().set_once(distinct_id=distinct_id, properties=properties)
    except Exception:
        _GUARD_API.failed()
        return None


def flush(timeout: float | None = 10.0) -> int:
    """Flush the client of :func:`get_client`. timeout: seconds (float); None waits forever.
    Returns the number of events still undelivered (when task_scopes itself failed, which
    is logged: the events it holds)."""
    client = get_client()
    try:
        return client.flush(timeout)
    except Exception:
        _GUARD_API.failed()
        return _held(client)


def shutdown(timeout: float | None = 10.0) -> int:
    """Flush and stop the client of :func:`get_client`. timeout: seconds (float); None waits
    forever. Returns the number of events still undelivered (as :func:`flush`)."""
    client = get_client()
    try:
        return client.shutdown(timeout)
    except Exception:
        _GUARD_API.failed()
        return _held(client)


def _held(client: Client) -> int:
    try:
        stats = client.stats()
        return stats.queued + stats.in_flight
    except Exception:
        return 0


# -- contexts --------------------------------------------------------------------------


class new_context:  # noqa: N801 - PostHog's name; a class so it is also a decorator
    """Open a context: an isolation scope for a block of work. Context manager and decorator.

    Args:
        fresh: False (default) inherits distinct ID, session ID, window ID, groups, tags
            and bound client of the enclosing context and may override them; True starts
            empty (the global scope still applies).
        capture_exceptions: capture an exception escaping the block as ``$exception``
            (once), then re-raise it unchanged.

    On exit the enclosing context is restored exactly as it was.

    Example::

        with new_context():
            identify_context("user-1")
            tag("plan", "pro")
            with new_context():
                tag("plan", "free")
                capture("a")              # user-1, plan=free
            capture("b")                  # user-1, plan=pro
            with new_context(fresh=True):
                capture("c")              # personless, no plan

    One object may be entered any number of times, nested in itself and from many threads
    or tasks at once: the tokens of each entry are kept in the Context that entered it. A
    decorated generator or async generator function runs each resumption of its body in a
    context of its own, closed when the generator finishes or is closed; the caller's
    context is left untouched between resumptions. Entering and exiting never raise: an
    exit in another ``contextvars.Context`` (an async generator closed from another task)
    is logged and the scope is taken off where it is still active.
    """

    __slots__ = ("capture_exceptions", "fresh")

    def __init__(self, fresh: bool = False, capture_exceptions: bool = True) -> None:
        self.fresh = fresh
        self.capture_exceptions = capture_exceptions

    def _scopes(self) -> tuple[Scope, Scope]:
        return (Scope(), Scope()) if self.fresh else fork_active()

    def _on_exception(self, exc: BaseException) -> None:
        if self.capture_exceptions:
            _capture_escaping(exc)

    def __enter__(self) -> Scope:
        return enter_keyed(self, self._scopes)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None:
                self._on_exception(exc)
        finally:
            exit_keyed(self, "new_context")

    def __call__(self, func: F) -> F:
        make = functools.partial(new_context, self.fresh, self.capture_exceptions)
        if inspect.isasyncgenfunction(func):
            return cast(F, scoped_async_generator(func, self._scopes, self._on_exception))
        if inspect.isgeneratorfunction(func):
            return cast(F, scoped_generator(func, self._scopes, self._on_exception))
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with make():
                    return await func(*args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with make():
                return func(*args, **kwargs)

        return cast(F, wrapper)


def _capture_escaping(exc: BaseException) -> None:
    """Capture an ``Exception`` escaping a context (unhandled), once."""
    if isinstance(exc, Exception):
        try:
            get_client().capture_exception(exc, mechanism="new_context", handled=False)
        except Exception:
            _GUARD_CAPTURE.failed()


def scoped(fresh: bool = False, capture_exceptions: bool = True) -> Callable[[F], F]:
    """Decorator: run each call of a function in its own :class:`new_context`.

    Sync and async functions, generator and async generator functions (the context is
    active while the body runs, and closed when the generator finishes or is closed).

    Example::

        @scoped(fresh=True)
        async def handle(request):
            identify_context(request.headers["X-POSTHOG-DISTINCT-ID"])
            capture("request_handled")
    """
    return new_context(fresh, capture_exceptions)


def tag(key: str, value: Any) -> None:
    """Set a tag on the isolation scope of this context (created lazily outside one).

    Tags become properties of every event captured in the context and travel with the
    tasks it publishes (see ``task_scopes.celery``).

    Args:
        key: the tag's name, a str. Any other key is refused: the tag is not set and a
            warning names it (events of the context are captured as before).
        value: any value; events convert it as they convert properties.
    """
    if not isinstance(key, str):
        _tag_log.warning(
            "task_scopes: tag(%s, ...) was not set: a tag key must be a str, got %s",
            _shown(key),
            type(key).__qualname__,
            key=type(key).__qualname__,
        )
        return
    get_isolation_scope().set_tag(key, value)


_tag_log = RateLimitedLog(60.0)


def _shown(value: Any) -> str:
    try:
        return repr(value)[:80]
    except Exception:  # its own __repr__ raised
        return f"<{type(value).__qualname__}>"


def identify_context(distinct_id: str) -> None:
    """Attribute everything captured in this context to ``distinct_id``."""
    get_isolation_scope().set_distinct_id(distinct_id)


def set_context_session(session_id: str) -> None:
    """Set the session ID (``$session_id``) of this context."""
    get_isolation_scope().set_session_id(session_id)


def set_context_groups(groups: Mapping[str, str | int | None]) -> None:
    """Attribute everything captured in this context to these groups (PostHog's
    ``$groups``: group type -> group key), e.g. ``{"company": "acme"}``; merged into the
    groups already set, a None key removes that group type. They travel with the tasks
    the context publishes, like the session ID.
    """
    scope = get_isolation_scope()
    for group_type, group_key in groups.items():
        scope.set_group(group_type, group_key)


def get_tags() -> dict[str, Any]:
    """The merged tags seen here (global, then isolation, then current scope), a new dict."""
    try:
        return merged_context()[2]
    except Exception:
        _GUARD_API.failed()
        return {}


def get_context_distinct_id() -> str | None:
    """The distinct ID seen here (current -> isolation -> global), or None."""
    try:
        return merged_context()[0]
    except Exception:
        _GUARD_API.failed()
        return None


def get_context_session_id() -> str | None:
    """The session ID seen here (current -> isolation -> global), or None."""
    try:
        return merged_context()[1]
    except Exception:
        _GUARD_API.failed()
        return None


def get_context_groups() -> dict[str, str | int]:
    """The groups seen here (global, then isolation, then current scope), a new dict."""
    try:
        return merged_context().groups
    except Exception:
        _GUARD_API.failed()
        return {}
