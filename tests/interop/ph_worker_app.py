"""The Celery app of the PostHog interop tests: one module for the worker and the producer.

The worker subprocess runs ``celery -A tests.interop.ph_worker_app worker ...`` with
:data:`ENV_SIDE` naming the one library it is instrumented with:

* ``task_scopes``: ``task_scopes.celery.install(app)`` only; tasks capture with
  ``task_scopes.capture()``. The ``posthog`` package is never imported.
* ``posthog``: PostHog's own ``PosthogCeleryIntegration`` only, with a ``posthog.Posthog``
  client; tasks capture with that client. ``task_scopes`` is never imported.

Both send to the loopback collector at :data:`ENV_HOST`. The test process calls
:func:`make_app` with the same broker and queue to publish, instrumented as the test needs.

Every event a task captures carries its ``label`` (how a test finds its events) and
``wire``: which context headers the task's request exposed, and where (as an attribute,
i.e. a top-level message header, or in ``request.headers``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

ENV_BROKER = "TS_INTEROP_BROKER"
ENV_QUEUE = "TS_INTEROP_QUEUE"
ENV_HOST = "TS_INTEROP_HOST"
ENV_SIDE = "TS_INTEROP_SIDE"
SIDES = ("task_scopes", "posthog")

API_KEY = "phc_test"
# A short interval so that the test does not wait on batching.
FLUSH_INTERVAL = 0.1

POSTHOG_HEADERS = ("X-POSTHOG-DISTINCT-ID", "X-POSTHOG-SESSION-ID", "X-POSTHOG-CONTEXT-TAGS")
OUR_HEADER = "task_scopes"

Emit = Callable[[str, dict[str, Any]], None]


def _no_emit(event: str, properties: dict[str, Any]) -> None:
    raise RuntimeError("this process was not configured as a worker side")


_emit: Emit = _no_emit


def wire_seen(request: Any) -> dict[str, Any]:
    """Which context headers ``request`` exposes: as attributes (top-level message headers)
    and in ``request.headers`` (what PostHog's worker side reads)."""
    headers = request.headers if isinstance(request.headers, dict) else {}
    names = (OUR_HEADER, *POSTHOG_HEADERS)
    return {
        "attr": sorted(n for n in names if getattr(request, n, None) is not None),
        "headers": sorted(n for n in names if headers.get(n) is not None),
    }


def _report(task: Task, label: str) -> None:
    request = task.request
    _emit(
        "interop.report",
        {
            "label": label,
            "attempt": request.retries,
            "wire": wire_seen(request),
            "modules": sorted(m for m in ("posthog", "task_scopes") if m in sys.modules),
        },
    )


def make_app(broker: str, *, queue: str) -> Celery:
    """A Celery app with the interop tasks registered, routed to ``queue`` by default."""
    app = Celery("interop", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
    )

    # shared=False: a shared task would be added to every app this process creates later.
    @app.task(shared=False, name="interop.report", bind=True)
    def report(self: Task, label: str) -> None:
        _report(self, label)

    @app.task(shared=False, name="interop.retry_once", bind=True, max_retries=3)
    def retry_once(self: Task, label: str) -> None:
        _report(self, label)
        if self.request.retries == 0:
            raise self.retry(countdown=0)

    return app


def _configure_task_scopes(app: Celery, host: str) -> Emit:
    import task_scopes
    import task_scopes.celery

    app.conf.update(
        task_scopes_api_key=API_KEY,
        task_scopes_host=host,
        task_scopes_flush_interval=FLUSH_INTERVAL,
    )
    task_scopes.celery.install(app)

    def emit(event: str, properties: dict[str, Any]) -> None:
        task_scopes.capture(event, properties=properties)

    return emit


def _configure_posthog(host: str) -> Emit:
    # As PostHog documents it: a client and the integration set up where the app is
    # defined, in the worker's main process; both are fork-safe, so pool children inherit
    # them (posthog/integrations/celery.py, PosthogCeleryIntegration.instrument).
    from posthog import Posthog
    from posthog.integrations.celery import PosthogCeleryIntegration

    client = Posthog(project_api_key=API_KEY, host=host, flush_interval=FLUSH_INTERVAL)
    PosthogCeleryIntegration(client=client).instrument()

    def emit(event: str, properties: dict[str, Any]) -> None:
        client.capture(event, properties=properties)

    return emit


def _app_from_env() -> Celery:
    global _emit
    app = make_app(
        os.environ.get(ENV_BROKER, "memory://"), queue=os.environ.get(ENV_QUEUE, "interop")
    )
    side = os.environ.get(ENV_SIDE)
    if side is None:  # imported by the test process, which publishes only
        return app
    host = os.environ[ENV_HOST]
    if side == "task_scopes":
        _emit = _configure_task_scopes(app, host)
    elif side == "posthog":
        _emit = _configure_posthog(host)
    else:
        raise ValueError(f"{ENV_SIDE} must be one of {SIDES}, not {side!r}")
    return app


app = _app_from_env()
