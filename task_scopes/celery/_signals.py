"""One ``_on_<signal_name>`` per Celery signal; every handler runs inside the guard.

State lives in :data:`REGISTRY` (installed apps and their options) and in a few bounded
per-process structures; nothing here grows with the number of tasks.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import _state
from celery.exceptions import Ignore, Reject, Retry

from .. import _api, _defaults
from .._client import Client, flush_all
from .._internal import RateLimitedLog, guard, logger
from .._scope import Scope, enter_scope, exit_scope, get_global_scope, merged_context
from ._header import (
    HEADER,
    POSTHOG_DISTINCT_ID,
    POSTHOG_SESSION_ID,
    POSTHOG_TAGS,
    SIG_HEADER,
    Limits,
    WireContext,
    WireError,
    encode,
    sign,
)
from ._options import Options
from ._request import CARRIED, carried_headers, read_context, task_tags

__all__ = ["REGISTRY", "Installed"]

_RUN_ATTR = "_task_scopes_run"
# Guards of the per-task paths, made once (a guard holds no per-use state).
_GUARD_BEFORE_TASK_PUBLISH = guard("before_task_publish")
_GUARD_TASK_PRERUN = guard("task_prerun")
_GUARD_TASK_POSTRUN = guard("task_postrun")
_NOT_CAPTURED = (Retry, Ignore, Reject)


# One client per distinct (api_key, host, client options): apps with equal settings share it.
_app_clients: dict[tuple[Any, ...], Client] = {}


@dataclass(frozen=True)
class Installed:
    """What ``install()`` decided for one app: its options and the caps of its header."""

    options: Options
    limits: Limits

    @functools.cached_property
    def client_key(self) -> tuple[Any, ...] | None:
        """What makes two apps' clients the same; None without an API key."""
        options = self.options
        if options.api_key is None:
            return None
        return (options.api_key, options.host, tuple(options.client_options().items()))

    def client(self) -> Client | None:
        """The client to bind to this app's task runs; None without an API key (the
        scopes' client applies). The client of ``task_scopes.init()`` when it has the same
        API key and host, else one made from these options on first use."""
        options = self.options
        if options.api_key is None:
            return None
        bound = get_global_scope().client
        if bound is not None and bound.api_key == options.api_key and bound.host == options.host:
            return bound
        key = self.client_key
        assert key is not None
        client = _app_clients.get(key)
        if client is None:
            with REGISTRY.lock:
                client = _app_clients.get(key)
                if client is None:
                    # Flushed at exit by flush_at_exit() below, within the app's
                    # task_scopes_shutdown_timeout.
                    client = Client(options.api_key, options.host, **options.client_options())
                    _app_clients[key] = client
        return client


@dataclass
class _Registry:
    apps: weakref.WeakKeyDictionary[Any, Installed] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    last: Installed | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def unused_client(self, installed: Installed | None) -> Client | None:
        """Forget the client made for ``installed`` when no installed app shares its
        settings any more, and return it for the caller to shut down outside the lock.
        Call with :attr:`lock` held."""
        key = installed.client_key if installed is not None else None
        if key is None or any(i.client_key == key for i in self.apps.values()):
            return None
        return _app_clients.pop(key, None)

    def for_task(self, task: Any) -> Installed | None:
        app = getattr(task, "app", None) if task is not None else None
        return self.apps.get(app) if app is not None else None

    def for_publish(self, task_name: Any) -> Installed | None:
        """The options for publishing ``task_name``, or None when its app is not installed.

        ``before_task_publish`` does not say which app publishes. The app that registers
        the task decides; a task no app registers (``send_task("name")``) goes with the
        current app if it is installed, else the last installed one.
        """
        active = _state._get_active_apps()
        if len(active) == 1 and len(self.apps) == 1 and self.last is not None:
            return self.last  # the usual process: one app, installed; it is the publisher
        registering = [app for app in active if task_name in getattr(app, "_tasks", ())]
        for app in registering:
            found = self.apps.get(app)
            if found is not None:
                return found
        if registering:
            return None
        return self.apps.get(_state.get_current_app()) or self.last


REGISTRY = _Registry()


@dataclass
class _Run:
    tokens: Any
    started: float
    installed: Installed


class _Bounded(OrderedDict[str, Any]):
    """An insertion-ordered dict that forgets its oldest entries past ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        if len(self) > self.limit:
            self.popitem(last=False)


# Worker main process only: headers of received tasks, for failures reported there without
# the task's request (hard time limit: Request.on_timeout fires task_failure with an empty
# request), and the task ids already captured there (Celery 5.7 fires task_failure twice
# for a hard time limit).
_received = _Bounded(4096)
# Only a prefork pool reports failures in the main process (hard time limit, lost child);
# under solo, threads, gevent or eventlet the task's own request has its headers.
_keep_received = True
_captured_in_main = _Bounded(4096)
_bad_header_log = RateLimitedLog(60.0)
_dropped_logs: dict[frozenset[str], RateLimitedLog] = {}


def reset_process_state() -> None:
    """Forget the main process's bounded maps (called in a fresh pool child)."""
    _received.clear()
    _captured_in_main.clear()


def _warn_dropped(keys: list[str], limits: Limits) -> None:
    keyset = frozenset(keys)
    log = _dropped_logs.get(keyset)
    if log is None:
        if len(_dropped_logs) > 256:
            _dropped_logs.clear()
        log = _dropped_logs[keyset] = RateLimitedLog(60.0)
    log.warning(
        "task_scopes: tags not propagated to the task (unencodable, key over %d chars, or "
        "over the cap of %d tags / %d bytes): %s",
        limits.max_key_chars,
        limits.max_tags,
        limits.max_bytes,
        ", ".join(sorted(keys)),
    )


# -- publish -------------------------------------------------------------------------------


def _on_before_task_publish(sender: Any = None, headers: Any = None, **_: Any) -> None:
    if not REGISTRY.apps or not isinstance(headers, dict):
        return
    with _GUARD_BEFORE_TASK_PUBLISH:
        installed = REGISTRY.for_publish(headers.get("task", sender))
        if installed is not None:
            _inject(installed, headers, posthog=installed.options.posthog_headers)


def _inject(installed: Installed, headers: dict[str, Any], *, posthog: bool) -> None:
    """Write the caller's context into ``headers`` as a published task carries it.

    Nothing is written when ``propagate`` is off or the context is empty (so a caller's
    own ``apply_async(headers={"task_scopes": ...})`` stands).
    """
    options = installed.options
    if not options.propagate:
        return
    context = merged_context(include_global=False)
    if not (context.distinct_id or context.session_id or context.window_id or context.tags):
        return
    header, dropped = encode(
        context.distinct_id, context.session_id, context.tags, installed.limits, context.window_id
    )
    # Top level only, never headers["headers"]: see task_scopes.celery._header (celery#4875).
    headers[HEADER] = header
    if options.secret is not None:
        headers[SIG_HEADER] = sign(header, options.secret)
    if posthog:
        _write_posthog_headers(headers, header)
    if dropped:
        _warn_dropped(dropped, installed.limits)


def _write_posthog_headers(headers: dict[str, Any], header: str) -> None:
    """PostHog's ``X-POSTHOG-*`` headers, from our header: cleaned and capped the same way.

    Top level, like ours. A nested ``headers["headers"]`` dict is never created (it makes
    ``retry()`` drop top-level headers), but when another library already made one
    (sentry-sdk does inside a transaction), Celery shows PostHog's worker only that dict
    as ``request.headers``, so the values are copied into it too.
    """
    payload = json.loads(header)
    values: dict[str, str] = {}
    if "d" in payload:
        values[POSTHOG_DISTINCT_ID] = payload["d"]
    if "s" in payload:
        values[POSTHOG_SESSION_ID] = payload["s"]
    if payload.get("t"):
        values[POSTHOG_TAGS] = json.dumps(payload["t"], separators=(",", ":"), ensure_ascii=False)
    headers.update(values)
    nested = headers.get("headers")
    if isinstance(nested, dict):
        nested.update(values)


# -- worker: open and close the task's isolation scope ------------------------------------


def _restore(installed: Installed, headers: Mapping[str, Any], task_id: Any) -> WireContext | None:
    if not installed.options.propagate or not headers:
        return None
    try:
        return read_context(headers, installed.options.secret, installed.limits)
    except WireError as exc:
        _bad_header_log.warning(
            "task_scopes: ignored the context header of task %s (%s); the task runs with an "
            "empty context",
            task_id,
            exc,
        )
        return None


def _apply(scope: Scope, context: WireContext | None) -> None:
    if context is None:
        return
    if context.distinct_id is not None:
        scope.set_distinct_id(context.distinct_id)
    if context.session_id is not None:
        scope.set_session_id(context.session_id)
    if context.window_id is not None:
        scope.set_window_id(context.window_id)
    if context.tags:
        scope.update_tags(context.tags)


def _on_task_prerun(task: Any = None, sender: Any = None, **_: Any) -> None:
    task = task if task is not None else sender
    installed = REGISTRY.for_task(task)
    if installed is None:
        return
    with _GUARD_TASK_PRERUN:
        request = task.request
        headers = carried_headers(request)
        if getattr(request, "is_eager", False):
            # Eager: no publish happened. Take the caller's context through the same
            # encode -> decode path a published task takes (caps, propagate, signing), so
            # eager and worker runs give the same events by construction.
            _inject(installed, headers, posthog=False)
        isolation = Scope()
        _apply(isolation, _restore(installed, headers, request.id))
        isolation.update_tags(task_tags(task, request))
        client = installed.client()
        if client is not None:
            isolation.set_client(client)
        run = _Run(enter_scope(isolation, Scope()), time.monotonic(), installed)
        setattr(request, _RUN_ATTR, run)
        if installed.options.task_events and _wanted(installed, task):
            _api.get_client().capture("celery task started", properties={"celery_state": "STARTED"})


def _on_task_postrun(task: Any = None, sender: Any = None, state: Any = None, **_: Any) -> None:
    task = task if task is not None else sender
    if task is None:
        return
    request = task.request
    run: _Run | None = getattr(request, _RUN_ATTR, None)
    if run is None:
        return
    with _GUARD_TASK_POSTRUN:
        try:
            if (
                state == "SUCCESS"
                and run.installed.options.task_events
                and _wanted(run.installed, task)
            ):
                _api.get_client().capture(
                    "celery task success",
                    properties={"celery_state": state, "celery_duration_ms": _ms(run)},
                )
        finally:
            setattr(request, _RUN_ATTR, None)
            exit_scope(run.tokens)


def _ms(run: _Run) -> float:
    return round((time.monotonic() - run.started) * 1000, 3)


# -- failures -------------------------------------------------------------------------------


def _wanted(installed: Installed, task: Any) -> bool:
    task_filter = installed.options.task_filter
    if task_filter is None:
        return True
    try:
        return bool(task_filter(getattr(task, "name", "")))
    except Exception:
        logger.exception("task_scopes: task_filter raised; capturing anyway")
        return True


def _expected(task: Any, exc: BaseException) -> bool:
    if isinstance(exc, _NOT_CAPTURED):
        return True
    throws = getattr(task, "throws", ()) or ()
    return bool(throws) and isinstance(exc, tuple(throws))


def _capture_failure(installed: Installed, task: Any, exc: BaseException, run: _Run | None) -> None:
    options = installed.options
    if not _wanted(installed, task):
        return
    client = _api.get_client()
    if options.capture_exceptions and not _expected(task, exc):
        client.capture_exception(exc, mechanism="celery", handled=False)
    if options.task_events:
        props: dict[str, Any] = {"celery_state": "FAILURE", "celery_exception": type(exc).__name__}
        if run is not None:
            props["celery_duration_ms"] = _ms(run)
        client.capture("celery task failure", properties=props)


def _on_task_failure(
    sender: Any = None, task_id: Any = None, exception: Any = None, **_: Any
) -> None:
    installed = REGISTRY.for_task(sender)
    if installed is None or not isinstance(exception, BaseException):
        return
    with guard("task_failure"):
        request = sender.request
        run: _Run | None = getattr(request, _RUN_ATTR, None)
        if run is not None:  # in the process that ran the task, inside its scope
            _capture_failure(installed, sender, exception, run)
            return
        # Worker main process: hard time limit or lost child. Rebuild the task's scope.
        if task_id is None or task_id in _captured_in_main:
            return
        _captured_in_main.put(task_id, True)
        if getattr(request, "id", None) == task_id:
            headers = carried_headers(request)
        else:
            headers = _received.get(task_id) or {}
        isolation = Scope()
        _apply(isolation, _restore(installed, headers, task_id))
        isolation.update_tags(task_tags(sender, request))
        isolation.set_tag("celery_task_id", task_id)
        isolation.set_client(installed.client())
        tokens = enter_scope(isolation, Scope())
        try:
            _capture_failure(installed, sender, exception, None)
        finally:
            exit_scope(tokens)


def _on_task_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    installed = REGISTRY.for_task(sender)
    if installed is None:
        return
    with guard("task_retry"):
        options = installed.options
        if not _wanted(installed, sender):
            return
        cause = getattr(reason, "exc", None) if isinstance(reason, Retry) else reason
        client = _api.get_client()
        if (
            options.capture_retries
            and isinstance(cause, BaseException)
            and not _expected(sender, cause)
        ):
            client.capture_exception(cause, mechanism="celery.retry", handled=False)
        if options.task_events:
            client.capture("celery task retry", properties={"celery_state": "RETRY"})


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _keep_received
    with guard("worker_init"):
        pool = getattr(sender, "pool_cls", None)
        # A class (from the command line) or a name; resolved without importing the pool
        # (gevent and eventlet must monkey-patch before their pool module is imported).
        name = f"{pool.__module__}.{pool.__qualname__}" if isinstance(pool, type) else str(pool)
        _keep_received = "prefork" in name.lower()


def _on_task_received(request: Any = None, **_: Any) -> None:
    if not REGISTRY.apps or not _keep_received:
        return
    with guard("task_received"):
        task_id = getattr(request, "id", None)
        headers_of = getattr(request, "request_dict", None)
        if task_id is None or not isinstance(headers_of, Mapping):
            return
        found = {name: headers_of[name] for name in CARRIED if name in headers_of}
        if found:
            _received.put(task_id, found)


# -- process lifecycle ---------------------------------------------------------------------


def shutdown_timeout() -> float:
    timeouts = [i.options.shutdown_timeout for i in list(REGISTRY.apps.values())]
    return max(timeouts) if timeouts else _defaults.SHUTDOWN_TIMEOUT


def _on_worker_process_init(**_: Any) -> None:
    with guard("worker_process_init"):
        reset_process_state()


def _on_worker_process_shutdown(**_: Any) -> None:
    # Pool children leave with os._exit(): atexit never runs there, so flush now.
    with guard("worker_process_shutdown"):
        left = flush_all(shutdown_timeout())
        if left:
            logger.warning("task_scopes: %d events undelivered at process shutdown", left)


def _on_worker_shutdown(**_: Any) -> None:
    with guard("worker_shutdown"):
        flush_at_exit()


def flush_at_exit() -> None:
    """Shut every client down, bounded by ``task_scopes_shutdown_timeout``."""
    left = flush_all(shutdown_timeout(), stop=True)
    if left:
        logger.warning("task_scopes: %d events undelivered at shutdown", left)
