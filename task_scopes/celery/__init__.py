"""Celery plugin: the caller's context travels with the task; failures are captured once.

Install it where the Celery app is defined, so producers and workers both run it::

    app = Celery("shop", broker="redis://127.0.0.1:6379/0")
    app.conf.task_scopes_api_key = "phc_..."
    app.conf.task_scopes_host = "https://us.i.posthog.com"
    task_scopes.celery.install(app)

    # in a web request
    with task_scopes.new_context():
        task_scopes.identify_context(user.id)
        task_scopes.tag("plan", user.plan)
        charge.delay(order_id)        # the task's capture() is attributed to user.id

Which client: with ``task_scopes_api_key`` set, a client for the app is bound to the
isolation scope of each of its task runs, so two apps with two keys send each task's
events, its ``$exception`` included, with their own key and options. That client is the
one of ``task_scopes.init()`` when it has the same API key and host (one project, one
client: its ``before_send`` and batching apply); else one made from the app's settings on
first use (apps with equal settings share it). Without an API key, task events go to
whatever the scopes resolve (the client of ``task_scopes.init()``). ``install()`` never
replaces a client made with ``init()``.

Lifecycle, through Celery's signals only (no monkeypatching):

=============================  ============  ================================================
Celery signal                  process       task_scopes
=============================  ============  ================================================
``before_task_publish``        caller, or    encodes the caller's distinct ID, session ID,
                               the worker    window ID, groups and tags and the publish time
                               child for     into one top-level header, ``task_scopes``
                               retries and   (signed: ``task_scopes_sig``); chain steps,
                               canvas        chord bodies, callbacks and retries carry the
                                             running task's context
``task_prerun``                where the     opens the task's isolation scope from that
                               task runs     header, tagged ``celery_task_id``,
                                             ``celery_task_name``, ``celery_queue``,
                                             ``celery_retry_count``, ``celery_hostname``,
                                             ``celery_queue_latency_ms``, and binds the
                                             app's client to it
``task_postrun``               same          closes exactly that scope (token reset),
                                             whatever happened: success, failure, retry,
                                             ``Ignore``, ``Reject``
``task_failure``               child         ``$exception`` once per task, in its scope
``task_failure``               main          hard time limit or lost child: the scope is
                                             rebuilt from the received header; captured
                                             once (Celery 5.7 fires it twice)
``task_retry``                 child         the retry event (``task_events``); each
                                             retried attempt's ``$exception`` only with
                                             ``capture_retries``
``task_received``              main          under prefork, keeps the task's context
                                             headers (bounded) for failures reported there
``worker_init``                main          keeps received headers only under prefork
``task_internal_error``        eager caller  ``task_eager_propagates`` / ``apply(throw=
                                             True)``: Celery sends no ``task_failure``;
                                             the run's scope is reopened and the failure
                                             captured as a worker would
``worker_process_init``        child         forgets the main process's bounded maps
``worker_process_shutdown``    child         bounded flush of every client (children leave
                                             with ``os._exit``; atexit never runs there)
``worker_shutdown``, atexit    main          bounded flush and shutdown of every client
=============================  ============  ================================================

``Retry``, ``Ignore``, ``Reject`` and ``task.throws`` are never captured; with retries, only
the final failure. Eager runs (``task_always_eager``, ``.apply()``) take the caller's
context through the same encode -> decode path as a published task (caps, ``propagate``,
signing), so they give the same events as a worker, also with ``task_eager_propagates``;
nothing the task sets leaks back.

Settings (``app.conf``; keyword overrides to :func:`install` drop the prefix):

==================================  =============  ===========================================
key                                 default        meaning
==================================  =============  ===========================================
``task_scopes_api_key``             None           project API key of this app's client;
                                                   None: the scopes' client (the one of
                                                   ``task_scopes.init()``, else disabled)
``task_scopes_host``                PostHog US     capture host
``task_scopes_enabled``             True           master switch
``task_scopes_propagate``           True           write / read the context header
``task_scopes_capture_exceptions``  True           capture failed tasks
``task_scopes_capture_retries``     False          also capture each retried attempt
``task_scopes_task_events``         False          ``celery task started/success/failure/
                                                   retry`` events
``task_scopes_task_filter``         None           ``(task_name) -> bool`` or a dotted path;
                                                   False: no capture for that task
``task_scopes_posthog_headers``     False          also write PostHog's ``X-POSTHOG-*``
``task_scopes_secret``              None           HMAC key: sign, and refuse unsigned or
                                                   forged context on receive
``task_scopes_max_header_bytes``    8192           cap of the encoded context (tags dropped
                                                   largest first, with a warning)
``task_scopes_max_tags``            64             cap on propagated tags
``task_scopes_max_key_chars``       200            longer keys are not propagated
``task_scopes_max_value_chars``     1000           a longer string tag is not propagated
                                                   (named in a warning); nested strings
                                                   are cut
``task_scopes_encode_bytes``        False          bytes tag values as base64 (else dropped)
``task_scopes_flush_at``            100            queued events that wake the sender (a
                                                   request takes all queued, <= 5 MiB)
``task_scopes_flush_interval``      0.5            seconds a partial batch waits
``task_scopes_max_queue_size``      10000          events held in memory per process
``task_scopes_timeout``             10.0           seconds per HTTP attempt
``task_scopes_retry_window``        30.0           seconds a failing batch is retried
``task_scopes_shutdown_timeout``    10.0           bound of every exit flush, seconds; to
                                                   ride out a collector outage at exit,
                                                   set it above the outage + 4 s
==================================  =============  ===========================================
"""

from __future__ import annotations

from typing import Any

from celery import signals

from .._client import Client, register_exit_flush
from .._internal import guard
from . import _signals
from ._options import ConfigError, Options
from ._registry import REGISTRY, Installed

__all__ = [
    "ConfigError",
    "Options",
    "app_client",
    "install",
    "installed_options",
    "uninstall",
]

_HANDLERS = (
    (signals.before_task_publish, _signals._on_before_task_publish),
    (signals.task_prerun, _signals._on_task_prerun),
    (signals.task_postrun, _signals._on_task_postrun),
    (signals.task_failure, _signals._on_task_failure),
    (signals.task_retry, _signals._on_task_retry),
    (signals.task_internal_error, _signals._on_task_internal_error),
    (signals.task_received, _signals._on_task_received),
    (signals.worker_init, _signals._on_worker_init),
    (signals.worker_process_init, _signals._on_worker_process_init),
    (signals.worker_process_shutdown, _signals._on_worker_process_shutdown),
    (signals.worker_shutdown, _signals._on_worker_shutdown),
)


def _uid(signal: Any) -> str:
    return f"task_scopes.{signal.name}"


def install(app: Any, **overrides: Any) -> Options:
    """Install the plugin on a Celery app. Idempotent; call it again to re-read options.

    Args:
        app: the ``celery.Celery`` instance.
        **overrides: options named without the ``task_scopes_`` prefix, e.g.
            ``install(app, posthog_headers=True)``; they win over ``app.conf``.

    Returns:
        The validated, frozen options now in force for ``app``.

    Raises:
        ConfigError: an unknown key or an invalid value, naming the key. The only error
            the plugin raises on purpose; its signal handlers never raise into Celery.
    """
    options = Options.from_app(app, overrides)
    if not options.enabled:
        uninstall(app)
        return options
    with REGISTRY.lock:
        installed = Installed(options, options.limits)
        previous = REGISTRY.apps.get(app)
        REGISTRY.set_installed(app, installed)
        for signal, handler in _HANDLERS:
            signal.connect(handler, weak=False, dispatch_uid=_uid(signal))
        # Cold shutdown fires no worker_shutdown: the exit flush covers it.
        register_exit_flush(_signals.shutdown_timeout())
        stale = REGISTRY.unused_client(previous)
    if stale is not None:
        with guard("install: shutting down the replaced client"):
            stale.shutdown(timeout=options.shutdown_timeout)
    return options


def uninstall(app: Any) -> bool:
    """Stop instrumenting ``app``. Returns False when it was not installed.

    Signal handlers are disconnected when no installed app is left. The app's client is
    shut down (bounded by ``task_scopes_shutdown_timeout``) when no other app uses it; a
    client made with ``task_scopes.init()`` is left running.
    """
    with REGISTRY.lock:
        installed = REGISTRY.remove(app)
        if installed is None:
            return False
        if not REGISTRY.apps:
            for signal, handler in _HANDLERS:
                signal.disconnect(handler, dispatch_uid=_uid(signal))
        stale = REGISTRY.unused_client(installed)
    if stale is not None:
        with guard("uninstall: shutting down the app's client"):
            stale.shutdown(timeout=installed.options.shutdown_timeout)
    return True


def installed_options(app: Any) -> Options | None:
    """The options in force for ``app``, or None when it is not installed."""
    installed = REGISTRY.apps.get(app)
    return installed.options if installed is not None else None


def app_client(app: Any) -> Client | None:
    """The client bound to ``app``'s task runs, or None when the app is not installed or
    has no ``task_scopes_api_key``. Made on first use; see "Which client" above."""
    installed = REGISTRY.apps.get(app)
    return installed.client() if installed is not None else None
