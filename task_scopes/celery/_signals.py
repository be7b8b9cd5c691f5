"""One ``_on_<signal_name>`` per Celery signal; every handler runs inside the guard.

State lives in :data:`~task_scopes.celery._registry.REGISTRY` (installed apps and their
options) and in a few bounded per-process structures; nothing here grows with the number
of tasks.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery.exceptions import Retry

from .. import _api, _defaults
from .._client import flush_all
from .._internal import RateLimitedLog, guard, logger
from .._scope import (
    Scope,
    enter_scope,
    exit_scope,
)
from ._failure import NOT_CAPTURED, capture_failure, expected, summary, wanted
from ._header import (
    HEADER,
    POSTHOG_DISTINCT_ID,
    POSTHOG_SESSION_ID,
    POSTHOG_TAGS,
    SIG_HEADER,
    Limits,
    WireContext,
    WireError,
    sign,
)
from ._memo import context_header, decode_rest, with_publish_time
from ._registry import REGISTRY, Installed
from ._request import CARRIED, carried_headers, read_context, task_tags

__all__ = ["REGISTRY", "Installed"]

_RUN_ATTR = "_task_scopes_run"
# Guards of the per-task paths, made once (a guard holds no per-use state).
_GUARD_BEFORE_TASK_PUBLISH = guard("before_task_publish")
_GUARD_TASK_PRERUN = guard("task_prerun")
_GUARD_TASK_POSTRUN = guard("task_postrun")
_LATENCY = "celery_queue_latency_ms"
_CONTEXT_HEADERS = (HEADER, POSTHOG_DISTINCT_ID, POSTHOG_SESSION_ID, POSTHOG_TAGS)


@dataclass(slots=True)
class _Run:
    tokens: Any
    started: float
    installed: Installed
    isolation: Scope
    current: Scope


# The eager run whose exception is escaping apply() (task_eager_propagates / throw=True),
# from its task_postrun to the task_internal_error Celery sends next, in the same thread.
_escaping = threading.local()


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
# request), the task ids already captured there (Celery 5.7 fires task_failure twice for a
# hard time limit), and the worker's Requests while they live (their time_start dates a
# run for the latency).
_received = _Bounded(4096)
# Only a prefork pool reports failures in the main process (hard time limit, lost child);
# under solo, threads, gevent or eventlet the task's own request has its headers.
_keep_received = True
_captured_in_main = _Bounded(4096)
_live_requests: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_bad_header_log = RateLimitedLog(60.0)
_dropped_logs: dict[frozenset[str], RateLimitedLog] = {}


def reset_process_state() -> None:
    """Forget the main process's bounded maps (called in a fresh pool child)."""
    _received.clear()
    _captured_in_main.clear()
    _live_requests.clear()


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
    try:  # the guard as try/except: cheaper than a with block on this hot path
        installed = REGISTRY.for_publish(headers.get("task", sender))
        if installed is not None:
            _inject(installed, headers, posthog=installed.options.posthog_headers)
    except Exception:
        _GUARD_BEFORE_TASK_PUBLISH.failed()


def _inject(installed: Installed, headers: dict[str, Any], *, posthog: bool) -> None:
    """Write the caller's context and the publish time into ``headers`` as a published
    task carries them.

    Nothing is written when ``propagate`` is off, or when the context is empty and the
    message already carries a context (the caller's own ``apply_async(headers=...)``, or
    PostHog's integration's ``X-POSTHOG-*`` headers): that one stands.
    """
    options = installed.options
    if not options.propagate:
        return
    rest, dropped, empty = context_header(installed.limits, installed.headers)
    if empty and _carries_context(headers):
        return
    header = with_publish_time(rest, time.time_ns() // 1_000_000)
    # Top level only, never headers["headers"]: see task_scopes.celery._header (celery#4875).
    headers[HEADER] = header
    if options.secret is not None:
        headers[SIG_HEADER] = sign(header, options.secret)
    if posthog:
        _write_posthog_headers(headers, header)
    if dropped:
        _warn_dropped(list(dropped), installed.limits)


def _carries_context(headers: Mapping[str, Any]) -> bool:
    """Whether ``headers`` already carry a context (ours or PostHog's): one the caller's
    empty context leaves in place."""
    return any(name in headers for name in _CONTEXT_HEADERS)


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
        _ignored_header(task_id, exc)
        return None


def _ignored_header(task_id: Any, exc: WireError) -> None:
    _bad_header_log.warning(
        "task_scopes: ignored the context header of task %s (%s); the task runs with an "
        "empty context",
        task_id,
        exc,
    )


def _eager_context(installed: Installed, request: Any) -> tuple[WireContext | None, int | None]:
    """``(context, latency_ms)`` of an eager run: the caller's context, as a worker would
    decode it, and a queue latency of 0 (nothing was queued).

    No publish happened, so the caller's context goes through the encoding a published
    task carries (caps, ``propagate``, the tags that travel) and the decoding a worker
    does, from the same memos: eager and worker runs give the same events by
    construction. What a worker does on top, the header string around the encoding with
    its publish time and signature, is skipped: a signature this process made over its own
    header always verifies. A context the caller passed in the headers itself
    (``apply_async(headers=...)``) is read as a worker reads it, when the caller's own
    context is empty (as :func:`_inject` leaves it in place).
    """
    if not installed.options.propagate:
        return None, None
    found = context_header(installed.limits, installed.headers)
    if found.empty:
        headers = carried_headers(request)
        if _carries_context(headers):
            context = _restore(installed, headers, request.id)
            return context, _latency_ms(context, time.time())
    elif found.dropped:
        _warn_dropped(list(found.dropped), installed.limits)
    try:
        return decode_rest(found.rest, installed.limits), 0
    except WireError as exc:  # as _restore() would have met it
        _ignored_header(request.id, exc)
        return None, None


def _task_scope(task: Any, request: Any, context: WireContext | None, latency: int | None) -> Scope:
    """The isolation scope of a task run: the received ``context`` (None: nothing
    received), the run's ``celery_*`` tags over its tags, then ``celery_queue_latency_ms``
    when ``latency`` (ms) is known. Built in place: one dict for the tags, no copies."""
    received = dict(context.tags) if context is not None and context.tags else {}
    tags = task_tags(task, request, received)
    if latency is not None:
        tags[_LATENCY] = latency
    if context is None:
        return Scope._owning(None, None, None, tags, {})
    return Scope._owning(
        context.distinct_id,
        context.session_id,
        context.window_id,
        tags,
        dict(context.groups) if context.groups else {},
    )


def _latency_ms(context: WireContext | None, started: float | None) -> int | None:
    """Milliseconds from the producer's publish (its clock) to ``started`` (epoch seconds,
    this host's clock), clamped at 0; None without both."""
    if context is None or context.published_ms is None or started is None:
        return None
    if context.published_ms <= 0:  # not a publish time (a crafted header)
        return None
    return max(0, round(started * 1000) - context.published_ms)


def _on_task_prerun(task: Any = None, sender: Any = None, **_: Any) -> None:
    try:  # the guard as try/except: cheaper than a with block on this hot path
        task = task if task is not None else sender
        installed = REGISTRY.for_task(task)
        if installed is None:
            return
        request = task.request
        if getattr(request, "is_eager", False):
            context, latency = _eager_context(installed, request)
        else:
            context = _restore(installed, carried_headers(request), request.id)
            latency = _latency_ms(context, time.time())
        isolation = _task_scope(task, request, context, latency)
        client = installed.client()
        if client is not None:
            isolation.set_client(client)
        current = Scope()
        tokens = enter_scope(isolation, current)
        run = _Run(tokens, time.monotonic(), installed, isolation, current)
        setattr(request, _RUN_ATTR, run)
        if installed.options.task_events and wanted(installed, task):
            _api.get_client().capture("celery task started", properties={"celery_state": "STARTED"})
    except Exception:
        _GUARD_TASK_PRERUN.failed()


def _on_task_postrun(
    task: Any = None, sender: Any = None, task_id: Any = None, state: Any = None, **_: Any
) -> None:
    task = task if task is not None else sender
    if task is None:
        return
    request = task.request
    run: _Run | None = getattr(request, _RUN_ATTR, None)
    if run is None:
        return
    try:  # the guard as try/except: cheaper than a with block on this hot path
        try:
            if (
                state == "SUCCESS"
                and run.installed.options.task_events
                and wanted(run.installed, task)
            ):
                _api.get_client().capture(
                    "celery task success",
                    properties={"celery_state": state, "celery_duration_ms": _ms(run)},
                )
        finally:
            setattr(request, _RUN_ATTR, None)
            exit_scope(run.tokens)
            if state is None and getattr(request, "is_eager", False):
                # No state: an exception is escaping the trace (task_eager_propagates,
                # apply(throw=True)); task_failure was not sent. Celery sends
                # task_internal_error next, with the exception, from the same thread.
                _escaping.run = (task_id, run)
    except Exception:
        _GUARD_TASK_POSTRUN.failed()


def _ms(run: _Run) -> float:
    return round((time.monotonic() - run.started) * 1000, 3)


# -- failures -------------------------------------------------------------------------------


def _on_task_failure(
    sender: Any = None, task_id: Any = None, exception: Any = None, **_: Any
) -> None:
    with guard("task_failure"):
        installed = REGISTRY.for_task(sender)
        if installed is None or not isinstance(exception, BaseException):
            return
        request = sender.request
        run: _Run | None = getattr(request, _RUN_ATTR, None)
        if run is not None:  # in the process that ran the task, inside its scope
            capture_failure(installed, sender, exception, _ms(run))
            return
        # Worker main process: hard time limit or lost child. Rebuild the task's scope.
        if task_id is None or task_id in _captured_in_main:
            return
        _captured_in_main.put(task_id, True)
        if getattr(request, "id", None) == task_id:
            headers = carried_headers(request)
        else:
            headers = _received.get(task_id) or {}
        context = _restore(installed, headers, task_id)
        # The worker's Request (alive: it is reporting this failure) knows when the child
        # accepted the task, in epoch seconds.
        started = getattr(_live_requests.get(task_id), "time_start", None)
        latency = _latency_ms(context, started if isinstance(started, (int, float)) else None)
        isolation = _task_scope(sender, request, context, latency)
        isolation.set_tag("celery_task_id", task_id)
        isolation.set_client(installed.client())
        tokens = enter_scope(isolation, Scope())
        try:
            capture_failure(installed, sender, exception, None)
        finally:
            exit_scope(tokens)


def _on_task_internal_error(
    sender: Any = None, task_id: Any = None, exception: Any = None, **_: Any
) -> None:
    """An eager run's exception escaping ``apply()`` (``task_eager_propagates``,
    ``apply(throw=True)``): Celery skips ``task_failure`` and sends this after
    ``task_postrun``. Capture it as a worker would, in the run's own (reopened) scopes.
    ``Retry`` escapes too (Celery raises it out of ``apply()`` in this mode instead of
    running the next attempt): nothing is captured for it, as nothing failed."""
    escaping = getattr(_escaping, "run", None)
    if escaping is None:
        return
    _escaping.run = None
    escaped_id, run = escaping
    if escaped_id != task_id or not isinstance(exception, Exception):
        return
    with guard("task_internal_error"):
        if isinstance(exception, NOT_CAPTURED):
            return
        tokens = enter_scope(run.isolation, run.current)
        try:
            capture_failure(run.installed, sender, exception, _ms(run))
        finally:
            exit_scope(tokens)


def _on_task_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    with guard("task_retry"):
        installed = REGISTRY.for_task(sender)
        if installed is None:
            return
        options = installed.options
        if not wanted(installed, sender):
            return
        cause = getattr(reason, "exc", None) if isinstance(reason, Retry) else reason
        client = _api.get_client()
        if (
            options.capture_retries
            and isinstance(cause, BaseException)
            and not expected(sender, cause)
        ):
            client.capture_exception(cause, mechanism="celery.retry", handled=False)
        if options.task_events:
            props: dict[str, Any] = {"celery_state": "RETRY"}
            if isinstance(cause, BaseException):  # the exc given to retry(), if any
                props.update(summary(cause, installed.limits.max_value_chars))
            client.capture("celery task retry", properties=props)


def _pool_keeps_received(pool: Any) -> bool:
    """Whether a worker with this ``pool_cls`` (a class from the command line, or a name)
    can report failures in its main process: prefork only. Decided without importing the
    pool (gevent and eventlet must monkey-patch before their pool module is imported)."""
    name = f"{pool.__module__}.{pool.__qualname__}" if isinstance(pool, type) else str(pool)
    return "prefork" in name.lower()


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _keep_received
    with guard("worker_init"):
        _keep_received = _pool_keeps_received(getattr(sender, "pool_cls", None))


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
        try:
            # Weakly, so the entry goes with the request: its time_start dates the run.
            _live_requests[task_id] = request
        except TypeError:  # a request class without weak references
            pass


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
    global _keep_received
    _keep_received = True  # the next worker of this process decides again
    with guard("worker_shutdown"):
        flush_at_exit()


def flush_at_exit() -> None:
    """Shut every client down, bounded by ``task_scopes_shutdown_timeout``."""
    left = flush_all(shutdown_timeout(), stop=True)
    if left:
        logger.warning("task_scopes: %d events undelivered at shutdown", left)
