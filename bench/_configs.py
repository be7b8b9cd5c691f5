"""The configurations under comparison, built the same way in every benchmark process.

Each configuration gives a Celery app with one task, ``bench.work``, a ``capture`` function
the task calls once, a caller context (a user, a session and three tags) and a ``flush``.

* ``bare``: Celery alone. The task builds the same properties dict and does not capture;
  the caller context is a no-op (Celery has none).
* ``task_scopes``: ``task_scopes.celery.install(app)`` with an API key and the loopback
  collector as host; the task calls ``task_scopes.capture()``.
* ``posthog``: PostHog's ``PosthogCeleryIntegration(capture_task_lifecycle_events=False)``
  on the module-level client (``host`` = loopback collector, other options default); the
  task calls ``posthog.capture()``.
* ``sentry``: ``sentry_sdk.init(dsn=<loopback receiver>, integrations=[CeleryIntegration()],
  traces_sample_rate=None, auto_enabling_integrations=False)``. Default integrations stay
  on (what every Sentry user has); auto-enabling ones are off so that Sentry's Redis
  integration does not instrument the benchmark's own counter. The task calls
  ``sentry_sdk.capture_event({"message": ..., "level": "info", "extra": properties})``,
  Sentry's closest equivalent of an analytics event. Sentry has no session ID: the caller
  context puts it in a fourth tag.

Everything is imported lazily so a ``bare`` process never imports a peer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

CONFIGS = ("bare", "task_scopes", "posthog", "sentry")
API_KEY = "phc_bench"
EVENT = "bench task done"
TASK_NAME = "bench.work"

USER = "user-42"
SESSION = "0190b6c4-5b9e-7f4c-9a57-5e3a0b0c1d2e"
TAGS = {"plan": "pro", "region": "eu-west-1", "feature": "checkout"}

Capture = Callable[[str, dict[str, Any]], object]


@dataclass
class Built:
    """One configuration, set up in this process."""

    name: str
    app: Any
    work: Any
    capture: Capture | None
    caller_context: Callable[[], contextlib.AbstractContextManager[object]]
    flush: Callable[[], object]


def available(name: str) -> str | None:
    """None when ``name`` can run here, else why not."""
    if name == "bare":
        return None
    if name == "task_scopes":
        if importlib.util.find_spec("task_scopes.celery") is None:
            return "task_scopes.celery not importable"
        import task_scopes.celery

        if not hasattr(task_scopes.celery, "install"):
            return "task_scopes.celery.install() not there yet"
        return None
    if name == "posthog":
        return None if importlib.util.find_spec("posthog") else "posthog not installed"
    if name == "sentry":
        return None if importlib.util.find_spec("sentry_sdk") else "sentry-sdk not installed"
    return f"unknown configuration {name!r}"


def _counter(redis_url: str | None) -> Callable[[str, int], None]:
    """``count(key, target)``: INCR ``key``; the increment that reaches ``target`` also
    stores this process's monotonic clock under ``key:done`` (the worker's finish time;
    CLOCK_MONOTONIC is system-wide on Linux, so the driver can compare it)."""
    client: Any = None

    def count(key: str, target: int) -> None:
        nonlocal client
        if client is None:
            import redis

            client = redis.Redis.from_url(redis_url or "redis://")
        if client.incr(key) == target:
            client.set(key + ":done", repr(time.perf_counter()))

    return count


def build(
    name: str,
    *,
    broker: str,
    queue: str,
    eager: bool = False,
    collector_url: str | None = None,
    sentry_dsn: str | None = None,
    redis_url: str | None = None,
) -> Built:
    """Set up configuration ``name`` in this process and return its app and hooks."""
    from celery import Celery

    app = Celery("bench", broker=broker, set_as_current=True)
    app.conf.update(
        task_default_queue=queue,
        task_always_eager=eager,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    capture: Capture | None = None
    caller_context: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext
    flush: Callable[[], object] = lambda: None  # noqa: E731

    if name == "task_scopes":
        import task_scopes
        import task_scopes.celery

        # The recommended set-up: init() for the process, install() with the same key and
        # host, so the app's task runs use init()'s client.
        host = collector_url or "http://127.0.0.1:9"
        task_scopes.init(API_KEY, host)
        app.conf.task_scopes_api_key = API_KEY
        app.conf.task_scopes_host = host
        task_scopes.celery.install(app)

        def capture(event: str, properties: dict[str, Any]) -> object:
            return task_scopes.capture(event, properties=properties)

        @contextlib.contextmanager
        def caller_context() -> Iterator[object]:
            with task_scopes.new_context():
                task_scopes.identify_context(USER)
                task_scopes.set_context_session(SESSION)
                for key, value in TAGS.items():
                    task_scopes.tag(key, value)
                yield None

        flush = task_scopes.flush

    elif name == "posthog":
        import posthog
        from posthog.integrations.celery import PosthogCeleryIntegration

        posthog.project_api_key = API_KEY
        posthog.host = collector_url or "http://127.0.0.1:9"
        posthog.setup()
        PosthogCeleryIntegration(capture_task_lifecycle_events=False).instrument()

        def capture(event: str, properties: dict[str, Any]) -> object:
            return posthog.capture(event, properties=properties)

        @contextlib.contextmanager
        def caller_context() -> Iterator[object]:
            with posthog.new_context():
                posthog.identify_context(USER)
                posthog.set_context_session(SESSION)
                for key, value in TAGS.items():
                    posthog.tag(key, value)
                yield None

        flush = posthog.flush

    elif name == "sentry":
        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration

        sentry_sdk.init(
            dsn=sentry_dsn or "http://key@127.0.0.1:9/1",
            integrations=[CeleryIntegration()],
            traces_sample_rate=None,
            auto_enabling_integrations=False,
        )

        def capture(event: str, properties: dict[str, Any]) -> object:
            return sentry_sdk.capture_event(
                {"message": event, "level": "info", "extra": properties}
            )

        @contextlib.contextmanager
        def caller_context() -> Iterator[object]:
            with sentry_sdk.isolation_scope() as scope:
                scope.set_user({"id": USER})
                scope.set_tag("session_id", SESSION)
                for key, value in TAGS.items():
                    scope.set_tag(key, value)
                yield None

        flush = sentry_sdk.flush

    elif name != "bare":
        raise ValueError(f"unknown configuration {name!r}")

    count = _counter(redis_url)
    do_capture = capture

    # The same body in every configuration; bare skips only the capture call.
    @app.task(name=TASK_NAME, ignore_result=True)  # type: ignore[untyped-decorator]
    def work(i: int, key: str | None = None, target: int = 0) -> int:
        properties = {"i": i, "source": "bench"}
        if do_capture is not None:
            do_capture(EVENT, properties)
        if key is not None:
            count(key, target)
        return i

    return Built(name, app, work, capture, caller_context, flush)


def build_from_env() -> Built:
    """Build from ``BENCH_*`` environment variables (the worker subprocess)."""
    env = os.environ
    return build(
        env["BENCH_CONFIG"],
        broker=env["BENCH_BROKER"],
        queue=env["BENCH_QUEUE"],
        collector_url=env.get("BENCH_COLLECTOR") or None,
        sentry_dsn=env.get("BENCH_SENTRY_DSN") or None,
        redis_url=env.get("BENCH_REDIS") or None,
    )
