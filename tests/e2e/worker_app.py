"""The Celery app of the end-to-end tests: one module for the worker and the producer.

The worker subprocess runs ``celery -A tests.e2e.worker_app worker ...``; the module-level
``app`` is then configured from the environment variables below, which the harness sets.
The test process calls :func:`make_app` with the same broker, backend and queue to publish.
Task names are explicit (``e2e.*``), so both sides agree whatever the module is called.

Every task that captures puts its ``label`` in the event properties: that is how a test
finds its events among all the others.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import threading
import time
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import Ignore, Reject
from kombu import Exchange, Queue, binding

import task_scopes
from task_scopes import _scope

ENV_BROKER = "TS_E2E_BROKER"
ENV_BACKEND = "TS_E2E_BACKEND"
ENV_QUEUE = "TS_E2E_QUEUE"
ENV_REDIS = "TS_E2E_REDIS"
# JSON object merged into app.conf (task_scopes_* keys included).
ENV_SETTINGS = "TS_E2E_SETTINGS"
# "1": task_scopes.celery.install(app); "0": only a plain task_scopes.init() client, which
# is how the harness itself is checked without the plugin.
ENV_PLUGIN = "TS_E2E_PLUGIN"

USER_HEADER = "x-user-header"
# Keys of ENV_SETTINGS that configure this module rather than the app:
# a second app installed after the first, with this API key (queue: QUEUE + "_second")
SECOND_API_KEY = "e2e_second_api_key"
# "1": the worker runs the second app's tasks
SERVE_SECOND = "e2e_serve_second"
# "1": task_scopes.init() with the same key and host and a before_send that drops "email"
INIT_SCRUBBER = "e2e_init_scrubber"
# "1": the queue is bound through two more exchanges (see ROUTES), in the worker and in the
# producer alike (make_app reads it)
ROUTED = "e2e_routed"
# (exchange, type, routing key) of those bindings
ROUTES = (("e2e_direct", "direct", "e2e.routed"), ("e2e_topic", "topic", "e2e.events.#"))


class HoldsALock(Exception):
    """No class in its MRO pickles with these arguments, so Celery hands task_failure an
    UnpickleableExceptionWrapper instead."""

    def __init__(self, message: str) -> None:
        super().__init__(message, threading.Lock())
        self.message = message

    def __str__(self) -> str:
        return self.message


def make_app(
    broker: str,
    *,
    queue: str,
    backend: str | None = None,
    settings: dict[str, Any] | None = None,
) -> Celery:
    """A Celery app with every e2e task registered, routed to ``queue`` by default."""
    app = Celery("e2e", broker=broker, backend=backend, set_as_current=False)
    settings = dict(settings or {})
    if settings.pop(ROUTED, False):
        bindings = [binding(Exchange(name, kind), routing_key=key) for name, kind, key in ROUTES]
        # Still reached through the default exchange ("") by its name, as every queue is.
        app.conf.task_queues = [Queue(queue, bindings=bindings)]
    app.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        # Not worker_prefetch_multiplier=1: on RabbitMQ a solo worker started
        # --without-heartbeat then stalls ~10 s between messages (measured with Celery 5.7
        # and no task_scopes at all), which turns 1,000 tasks into minutes.
    )
    if settings:
        app.conf.update(settings)
    _register_tasks(app)
    return app


def _report(task: Task, event: str, label: str, **extra: Any) -> None:
    """Capture ``event`` with what the task sees of its request."""
    request = task.request
    headers = request.headers or {}
    task_scopes.capture(
        event,
        properties={
            "label": label,
            "attempt": request.retries,
            "user_header_attr": getattr(request, USER_HEADER, None),
            "user_header_headers": headers.get(USER_HEADER) if isinstance(headers, dict) else None,
            "pid": os.getpid(),
            "thread": threading.current_thread().name,
            **extra,
        },
    )


_redis_clients: dict[int, Any] = {}


def _redis() -> Any:
    import redis

    client = _redis_clients.get(os.getpid())
    if client is None:
        client = _redis_clients[os.getpid()] = redis.Redis.from_url(os.environ[ENV_REDIS])
    return client


def _sleep_until(seconds: float) -> None:
    # Short sleeps so that a soft time limit (raised from a signal handler) lands in this
    # function's frame promptly.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


def _register_tasks(app: Celery) -> None:
    # shared=False: a shared task would be added to every app created later in this process
    # (the producers of other tests) as well.
    @app.task(shared=False, name="e2e.report", bind=True)
    def report(self: Task, label: str, mutate: bool = False) -> dict[str, Any]:
        _report(self, "e2e.report", label)
        if mutate:
            task_scopes.tag("mutated_by_task", True)
            task_scopes.identify_context("task-user")
            task_scopes.set_context_session("task-session")
        return {
            "distinct_id": task_scopes.get_context_distinct_id(),
            "session_id": task_scopes.get_context_session_id(),
            "tags": sorted(task_scopes.get_tags()),
        }

    @app.task(shared=False, name="e2e.step", bind=True)
    def step(self: Task, prev: Any = None, *, label: str) -> str:
        _report(self, "e2e.report", label, prev=prev)
        return label

    @app.task(shared=False, name="e2e.collect", bind=True)
    def collect(self: Task, results: list[Any], *, label: str) -> str:
        _report(self, "e2e.report", label, results=len(results))
        return label

    @app.task(shared=False, name="e2e.on_success", bind=True)
    def on_success(self: Task, result: Any, *, label: str) -> None:
        _report(self, "e2e.report", label, parent_result=str(result))

    # Not bound and taking (task_id, ...): Celery publishes it as a task of its own.
    @app.task(shared=False, name="e2e.on_error_published")
    def on_error_published(task_id: str, *, label: str) -> None:
        task_scopes.capture("e2e.report", properties={"label": label, "failed_task": task_id})

    # Not bound and taking (request, exc, traceback): Celery calls it inline, in the
    # process of the failed task.
    @app.task(shared=False, name="e2e.on_error_inline")
    def on_error_inline(request: Any, exc: Any, traceback: Any, *, label: str) -> None:
        task_scopes.capture("e2e.report", properties={"label": label, "failed_task": request.id})

    @app.task(shared=False, name="e2e.fail", bind=True)
    def fail(self: Task, label: str) -> None:
        _report(self, "e2e.before_raise", label)
        raise ValueError(f"failing on purpose: {label}")

    @app.task(shared=False, name="e2e.retry_twice", bind=True, max_retries=5)
    def retry_twice(self: Task, label: str) -> str:
        _report(self, "e2e.report", label)
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        _report(self, "e2e.done", label)
        return label

    @app.task(
        shared=False,
        name="e2e.autoretry_fail",
        bind=True,
        autoretry_for=(ValueError,),
        max_retries=2,
        default_retry_delay=0,
        retry_kwargs={"countdown": 0},
        retry_backoff=False,
        retry_jitter=False,
    )
    def autoretry_fail(self: Task, label: str) -> None:
        _report(self, "e2e.report", label)
        raise ValueError(f"always failing: {label}")

    @app.task(shared=False, name="e2e.retry_once", bind=True, max_retries=3)
    def retry_once(self: Task, label: str) -> str:
        _report(self, "e2e.report", label)
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        _report(self, "e2e.done", label)
        return label

    @app.task(shared=False, name="e2e.ignore")
    def ignore(label: str) -> None:
        raise Ignore()

    @app.task(shared=False, name="e2e.ignore_capture", bind=True)
    def ignore_capture(self: Task, label: str) -> None:
        _report(self, "e2e.before_raise", label)
        raise Ignore()

    @app.task(shared=False, name="e2e.reject", bind=True)
    def reject(self: Task, label: str) -> None:
        _report(self, "e2e.before_raise", label)
        raise Reject("rejected on purpose", requeue=False)

    @app.task(shared=False, name="e2e.unpicklable", bind=True)
    def unpicklable(self: Task, label: str) -> None:
        _report(self, "e2e.before_raise", label)
        raise HoldsALock(f"lock held: {label}")

    @app.task(shared=False, name="e2e.fail_with_groups", bind=True)
    def fail_with_groups(self: Task, label: str) -> None:
        task_scopes.capture("e2e.report", properties={"label": label}, groups={"project": "p1"})
        raise ValueError(f"failing with groups: {label}")

    @app.task(shared=False, name="e2e.throws", bind=True, throws=(KeyError,))
    def throws(self: Task, label: str) -> None:
        _report(self, "e2e.before_raise", label)
        raise KeyError(label)

    @app.task(shared=False, name="e2e.probe", bind=True)
    def probe(self: Task, label: str) -> None:
        gc.collect()
        _report(
            self,
            "e2e.probe",
            label,
            isolation_before_prerun=_isolation_before_prerun.pop(self.request.id, "missing"),
            live_scopes=sum(1 for o in gc.get_objects() if type(o) is _scope.Scope),
            gc_objects=len(gc.get_objects()),
        )

    @app.task(shared=False, name="e2e.capture_props", bind=True)
    def capture_props(self: Task, label: str, properties: dict[str, Any]) -> None:
        _report(self, "e2e.report", label, **properties)

    @app.task(shared=False, name="e2e.count", bind=True)
    def count(self: Task, label: str, key: str) -> None:
        _report(self, "e2e.count", label)
        _redis().incr(key)

    @app.task(shared=False, name="e2e.sleep", bind=True)
    def sleep_task(self: Task, label: str, seconds: float) -> None:
        _report(self, "e2e.started", label)
        _sleep_until(seconds)

    @app.task(shared=False, name="e2e.kill_self", bind=True)
    def kill_self(self: Task, label: str) -> None:
        _report(self, "e2e.started", label)
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(shared=False, name="e2e.interleave", bind=True)
    def interleave(self: Task, label: str) -> None:
        # Sleeps hand the GIL to the other pool threads between the reads and the write.
        _report(self, "e2e.start", label)
        time.sleep(0.02)
        task_scopes.tag("seen_label", label)
        time.sleep(0.02)
        _report(self, "e2e.end", label)


# task id -> repr of the isolation scope active when the probe's task_prerun began, i.e.
# what the previous task left behind in this worker's base context (should be None).
_isolation_before_prerun: dict[str, str] = {}


def _record_isolation_before_prerun(
    sender: Any = None, task_id: str | None = None, **_: Any
) -> None:
    if getattr(sender, "name", None) == "e2e.probe" and task_id is not None:
        _isolation_before_prerun[task_id] = repr(_scope.active_isolation_scope())


def _scrub_email(event: dict[str, Any]) -> dict[str, Any]:
    event["properties"].pop("email", None)
    return event


def _worker_app_from_env() -> Celery:
    settings = json.loads(os.environ.get(ENV_SETTINGS, "{}"))
    second_key = settings.pop(SECOND_API_KEY, None)
    serve_second = settings.pop(SERVE_SECOND, False)
    if settings.pop(INIT_SCRUBBER, False):
        task_scopes.init(
            settings["task_scopes_api_key"],
            settings["task_scopes_host"],
            flush_interval=0.2,
            before_send=_scrub_email,
        )
    worker_app = make_app(
        os.environ.get(ENV_BROKER, "memory://"),
        queue=os.environ.get(ENV_QUEUE, "e2e"),
        backend=os.environ.get(ENV_BACKEND) or None,
        settings=settings,
    )
    if "task_scopes_api_key" not in settings:
        return worker_app
    # Connected before the plugin's own handler, so it runs first (receivers are called in
    # the order they were connected).
    signals.task_prerun.connect(
        _record_isolation_before_prerun, weak=False, dispatch_uid="e2e_before_prerun"
    )
    if os.environ.get(ENV_PLUGIN, "1") == "1":
        from task_scopes.celery import install

        install(worker_app)
        if second_key is not None:
            second = make_app(
                os.environ.get(ENV_BROKER, "memory://"),
                queue=os.environ.get(ENV_QUEUE, "e2e") + "_second",
                backend=os.environ.get(ENV_BACKEND) or None,
                settings={**settings, "task_scopes_api_key": second_key},
            )
            install(second)  # installed last: it must not take the first app's events
            if serve_second:
                return second
    else:
        task_scopes.init(
            settings["task_scopes_api_key"],
            settings["task_scopes_host"],
            flush_interval=settings.get("task_scopes_flush_interval", 0.2),
        )
    return worker_app


app = _worker_app_from_env()
