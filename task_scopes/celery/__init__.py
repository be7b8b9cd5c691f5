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

What it does, through Celery's signals only (no monkeypatching):

* ``before_task_publish``: encodes the caller's distinct ID, session ID, window ID and tags
  into one top-level message header, ``task_scopes`` (optionally signed: ``task_scopes_sig``).
  Chain steps, chord bodies, callbacks and retries are published from inside the running
  task, so they carry its restored context.
* ``task_prerun`` / ``task_postrun``: opens the task's isolation scope from that header
  (tagged ``celery_task_id``, ``celery_task_name``, ``celery_queue``,
  ``celery_retry_count``, ``celery_hostname``) and closes exactly that scope, whatever
  happened (success, failure, retry, ``Ignore``, ``Reject``). Eager tasks fork the caller's
  scope instead, and leak nothing back.
* ``task_failure``: captures the exception as ``$exception`` once per task, in the child, or
  in the worker's main process for a hard time limit or a lost child. ``Retry``, ``Ignore``,
  ``Reject`` and ``task.throws`` are never captured; with retries, only the final failure.
* ``worker_process_shutdown``, ``worker_shutdown`` and atexit: bounded flush.

Settings (``app.conf``; keyword overrides to :func:`install` drop the prefix):

==================================  =============  ===========================================
key                                 default        meaning
==================================  =============  ===========================================
``task_scopes_api_key``             None           project API key; None leaves the default
                                                   client as it is (disabled unless
                                                   ``task_scopes.init()`` ran)
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
``task_scopes_flush_at``            100            events per batch
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

import atexit
from typing import Any

from celery import signals

from .. import _api
from .._config import ConfigError, Options
from .._wire import Limits
from . import _signals
from ._signals import REGISTRY, Installed

__all__ = ["ConfigError", "Options", "install", "installed_options", "uninstall"]

_HANDLERS = (
    (signals.before_task_publish, _signals._on_before_task_publish),
    (signals.task_prerun, _signals._on_task_prerun),
    (signals.task_postrun, _signals._on_task_postrun),
    (signals.task_failure, _signals._on_task_failure),
    (signals.task_retry, _signals._on_task_retry),
    (signals.task_received, _signals._on_task_received),
    (signals.worker_process_init, _signals._on_worker_process_init),
    (signals.worker_process_shutdown, _signals._on_worker_process_shutdown),
    (signals.worker_shutdown, _signals._on_worker_shutdown),
)
_client_config: tuple[Any, ...] | None = None
_atexit_registered = False


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
    global _client_config, _atexit_registered
    options = Options.from_app(app, overrides)
    if not options.enabled:
        uninstall(app)
        return options
    limits = Limits(
        max_bytes=options.max_header_bytes,
        max_tags=options.max_tags,
        max_key_chars=options.max_key_chars,
        max_value_chars=options.max_value_chars,
        encode_bytes=options.encode_bytes,
    )
    installed = Installed(options, limits)
    with REGISTRY.lock:
        REGISTRY.apps[app] = installed
        REGISTRY.last = installed
        for signal, handler in _HANDLERS:
            signal.connect(handler, weak=False, dispatch_uid=_uid(signal))
        if options.api_key is not None:
            config = (options.api_key, options.host, tuple(options.client_options().items()))
            if config != _client_config or _api.get_client().disabled:
                _api.init(options.api_key, options.host, **options.client_options())
                _client_config = config
        if not _atexit_registered:
            atexit.register(_signals.flush_at_exit)
            _atexit_registered = True
    return options


def uninstall(app: Any) -> bool:
    """Stop instrumenting ``app``. Returns False when it was not installed.

    Signal handlers are disconnected when no installed app is left; the default client is
    left running (``task_scopes.shutdown()`` stops it).
    """
    with REGISTRY.lock:
        installed = REGISTRY.apps.pop(app, None)
        if installed is None:
            return False
        if REGISTRY.last is installed:
            REGISTRY.last = next(iter(REGISTRY.apps.values()), None)
        if not REGISTRY.apps:
            for signal, handler in _HANDLERS:
                signal.disconnect(handler, dispatch_uid=_uid(signal))
    return True


def installed_options(app: Any) -> Options | None:
    """The options in force for ``app``, or None when it is not installed."""
    installed = REGISTRY.apps.get(app)
    return installed.options if installed is not None else None
