"""Never break the host: a failure of task_scopes' own code inside any public function or
Celery signal handler is logged and swallowed; the application's call returns normally,
and the application's own exceptions pass through unchanged.

Each test injects a fault (an internal function raising :class:`InjectedFault`) with the
guard in production mode, runs the public call, checks what the application sees, and
checks that the fault was reached and logged as ours. The audit:

======================================  ==========================  ==========================
public function / handler               fault injected in           the call then
======================================  ==========================  ==========================
tag, identify_context,                  owner detection             returns None (the write
set_context_session                                                 goes to a detached scope)
get_isolation_scope, get_current_scope  owner detection             returns a detached Scope
get_global_scope                        (no task_scopes code runs)  returns the global scope
get_tags / get_context_distinct_id /    reading the scopes          returns {} / None / None
get_context_session_id
get_client                              finding the bound client    returns a disabled client
capture, set, set_once, Client.capture  building the event          returns None
capture_exception                       building $exception_list    returns None
flush, shutdown                         the consumer's wait         returns what it holds
init                                    the exit flush registration returns the bound client
new_context / scoped (function, async   owner detection on entry;   body runs in the enclosing
function, generator, async generator)   token reset on exit;        context; exit logged; the
                                        capture of an escaping      app's exception passes
                                        exception                   unchanged
isolation_scope, new_scope,             owner detection; token      as new_context
use_isolation_scope                     reset
celery.install / uninstall              shutting down the replaced  returns (raises only
                                        client                      ConfigError, on purpose)
wsgi / asgi ContextMiddleware           owner detection             the response is the app's
_on_before_task_publish                 reading the context         the task is published
_on_task_prerun                         the task tags               the task runs, succeeds
_on_task_postrun                        the duration                the result is the task's
_on_task_failure                        capturing the failure       the task's exception,
                                                                    unchanged
_on_task_retry                          the expected-exception test the retry happens
_on_task_received                       remembering the headers     the task runs
_on_worker_process_init / _shutdown,    resetting / flushing        the signal returns
_on_worker_shutdown
======================================  ==========================  ==========================

``Client(...)`` and ``install()`` raise on purpose for invalid options, naming them; the
test helpers (``task_scopes.testing``, the collector) are for tests and may raise.
``Client.flush`` / ``Client.shutdown`` called directly are marked below: they are not
behind the guard yet.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import pytest
from celery import Celery, signals
from celery.contrib.testing.worker import start_worker

import task_scopes
import task_scopes.celery
from task_scopes import (
    Client,
    InMemoryTransport,
    Scope,
    _api,
    _client,
    _consumer,
    _event,
    _internal,
    _scope,
)
from task_scopes.asgi import ContextMiddleware as AsgiMiddleware
from task_scopes.celery import _memo, _signals
from task_scopes.testing import capture_events
from task_scopes.wsgi import ContextMiddleware as WsgiMiddleware

T = TypeVar("T")


class InjectedFault(RuntimeError):
    """The failure injected into task_scopes' own code."""


class AppError(Exception):
    """The application's own exception."""


def _raise(*_: Any, **__: Any) -> Any:
    raise InjectedFault("injected")


class Faults:
    """Injects faults and reads back what the guard logged."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
        self.monkeypatch = monkeypatch
        self.caplog = caplog

    def inject(self, target: Any, name: str) -> None:
        self.monkeypatch.setattr(target, name, _raise)

    def logged(self) -> list[str]:
        """The ``where`` of every internal error logged with the injected fault."""
        return [
            str(r.args[0]) if r.args else r.getMessage()
            for r in self.caplog.records
            if r.name == "task_scopes"
            and r.exc_info is not None
            and isinstance(r.exc_info[1], InjectedFault)
        ]


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[Faults]:
    """Production mode: the guard logs and swallows (the suite's fixture makes it raise)."""
    previous = _internal.set_reraise(False)
    _internal.guard._logs.clear()
    caplog.set_level(logging.WARNING, logger="task_scopes")
    caplog.set_level(logging.WARNING, logger="celery.utils.dispatch.signal")
    try:
        yield Faults(monkeypatch, caplog)
    finally:
        _internal.set_reraise(previous)
    # Celery's signal dispatcher logs what a receiver raises: nothing may reach it
    dispatched = [r for r in caplog.records if r.name == "celery.utils.dispatch.signal"]
    assert dispatched == [], [r.getMessage() for r in dispatched]


def in_empty_context(func: Callable[[], T]) -> T:
    return contextvars.Context().run(func)


# -- the scope API ----------------------------------------------------------------------------


def test_setters_and_scope_getters_return_normally_when_owner_detection_fails(
    faults: Faults,
) -> None:
    faults.inject(_scope, "_owner")

    def scenario() -> list[Any]:
        return [
            task_scopes.tag("k", 1),
            task_scopes.identify_context("user-1"),
            task_scopes.set_context_session("session-1"),
            type(task_scopes.get_isolation_scope()),
            type(task_scopes.get_current_scope()),
            task_scopes.get_global_scope() is _scope.get_global_scope(),
        ]

    assert in_empty_context(scenario) == [None, None, None, Scope, Scope, True]
    assert faults.logged() == ["get scope"]  # rate-limited: one line per interval


def test_readers_return_empty_values_when_reading_the_scopes_fails(faults: Faults) -> None:
    faults.inject(_api, "merged_context")
    assert task_scopes.get_tags() == {}
    assert task_scopes.get_context_distinct_id() is None
    assert task_scopes.get_context_session_id() is None
    assert faults.logged() == ["api"]


def test_get_client_returns_a_disabled_client_when_finding_the_client_fails(
    faults: Faults,
) -> None:
    faults.inject(_api, "bound_client")
    assert task_scopes.get_client().disabled
    assert task_scopes.capture("nothing") is None
    assert faults.logged() == ["api"]


@pytest.mark.parametrize(
    "call",
    [
        lambda: task_scopes.capture("e"),
        lambda: task_scopes.set(properties={"plan": "pro"}),
        lambda: task_scopes.set_once(properties={"plan": "pro"}),
        lambda: task_scopes.get_client().capture("e"),
    ],
    ids=["capture", "set", "set_once", "Client.capture"],
)
def test_capture_returns_none_when_building_the_event_fails(
    call: Callable[[], Any], faults: Faults
) -> None:
    with capture_events() as captured:
        faults.inject(_event, "merged_context")
        assert call() is None
    assert captured.events == []
    assert faults.logged() == ["capture"]


def test_capture_exception_returns_none_when_building_the_exception_list_fails(
    faults: Faults,
) -> None:
    with capture_events() as captured:
        faults.inject(_client, "exception_list")
        assert task_scopes.capture_exception(AppError("x")) is None
    assert captured.events == []
    assert faults.logged() == ["capture_exception"]


@pytest.mark.parametrize("name", ["flush", "shutdown"])
def test_flush_and_shutdown_return_a_count_when_the_consumer_fails(
    name: str, faults: Faults
) -> None:
    with capture_events() as captured:
        task_scopes.capture("queued")
        faults.inject(_consumer.Consumer, "wait_idle")
        left = getattr(task_scopes, name)(timeout=1)
        faults.monkeypatch.undo()
        captured.client.flush(timeout=5)
    assert isinstance(left, int) and 0 <= left <= 1
    assert faults.logged() == ["flush"]  # caught in the client, below the module-level guard


@pytest.mark.parametrize("name", ["flush", "shutdown"])
def test_client_flush_and_shutdown_return_a_count_when_the_consumer_fails(
    name: str, faults: Faults
) -> None:
    client = Client(transport=InMemoryTransport(), flush_interval=300)
    try:
        client.capture("queued")
        faults.inject(_consumer.Consumer, "wait_idle")
        assert isinstance(getattr(client, name)(timeout=1), int)
        assert faults.logged() == ["flush"]
    finally:
        faults.monkeypatch.undo()
        client.shutdown(timeout=5)


def test_init_returns_its_bound_client_when_registering_the_exit_flush_fails(
    faults: Faults,
) -> None:
    scope = task_scopes.get_global_scope()
    previous = scope.client
    faults.inject(_api, "register_exit_flush")
    try:
        client = task_scopes.init(transport=InMemoryTransport())
        assert task_scopes.get_client() is client
    finally:
        scope.set_client(previous)
    assert faults.logged() == ["init"]


# -- blocks: entering, exiting, the app's own exception ----------------------------------------


def _blocks() -> dict[str, Callable[[], Any]]:
    return {
        "new_context": task_scopes.new_context,
        "isolation_scope": task_scopes.isolation_scope,
        "new_scope": task_scopes.new_scope,
        "use_isolation_scope": lambda: task_scopes.use_isolation_scope(Scope()),
    }


BLOCKS = list(_blocks())


@pytest.mark.parametrize("fault", ["enter", "exit"])
@pytest.mark.parametrize("name", BLOCKS)
def test_a_block_runs_and_exits_normally_when_entering_or_exiting_fails(
    name: str, fault: str, faults: Faults
) -> None:
    faults.inject(_scope, "_owner" if fault == "enter" else "_reset")

    def scenario() -> tuple[Any, str | None]:
        with _blocks()[name]() as scope:
            scope.set_tag("inside", True)
            result = "body ran"
        return result, task_scopes.get_context_distinct_id()

    assert in_empty_context(scenario) == ("body ran", None)
    assert faults.logged() == ["enter scope" if fault == "enter" else "exit scope"]


@pytest.mark.parametrize(
    ("name", "fault"),
    [(name, fault) for name in BLOCKS for fault in ("enter", "exit")]
    + [("new_context", "capture")],  # the one block that captures what escapes it
)
def test_the_apps_exception_passes_a_failing_block_unchanged(
    name: str, fault: str, faults: Faults
) -> None:
    target = {
        "enter": (_scope, "_owner"),
        "exit": (_scope, "_reset"),
        "capture": (_client, "exception_list"),
    }[fault]
    faults.inject(*target)
    raised = AppError("the app's own")

    def scenario() -> None:
        with _blocks()[name]():
            raise raised

    with capture_events(), pytest.raises(AppError) as info:
        in_empty_context(scenario)
    assert info.value is raised
    assert traceback.extract_tb(info.value.__traceback__)[-1].line == "raise raised"
    assert faults.logged()


def _decorated(kind: str) -> Callable[[], Any]:
    """A ``@scoped()`` function of ``kind`` that identifies, then raises AppError; and a
    runner returning what the app sees."""
    if kind == "function":

        @task_scopes.scoped()
        def function() -> None:
            task_scopes.identify_context("user")
            raise AppError(kind)

        return function
    if kind == "async function":

        @task_scopes.scoped()
        async def coroutine() -> None:
            task_scopes.identify_context("user")
            raise AppError(kind)

        return lambda: asyncio.run(coroutine())
    if kind == "generator":

        @task_scopes.scoped()
        def generator() -> Iterator[int]:
            task_scopes.identify_context("user")
            yield 1
            raise AppError(kind)

        return lambda: list(generator())

    @task_scopes.scoped()
    async def async_generator() -> AsyncIterator[int]:
        task_scopes.identify_context("user")
        yield 1
        raise AppError(kind)

    async def drain() -> None:
        async for _ in async_generator():
            pass

    return lambda: asyncio.run(drain())


@pytest.mark.parametrize("kind", ["function", "async function", "generator", "async generator"])
def test_scoped_passes_the_apps_exception_unchanged_when_its_own_code_fails(
    kind: str, faults: Faults
) -> None:
    run = _decorated(kind)
    faults.inject(_scope, "_owner")
    with pytest.raises(AppError, match=f"^{kind}$"):
        in_empty_context(run)
    assert faults.logged()


# -- Celery: install / uninstall and every signal handler --------------------------------------


def _app(**conf: Any) -> Celery:
    app = Celery(f"host-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(
        task_default_queue=f"ts_host_{uuid.uuid4().hex[:8]}",
        result_backend="cache+memory://",
        worker_hijack_root_logger=False,
        broker_transport_options={"polling_interval": 0.005},
    )
    app.conf.update(conf)
    return app


@pytest.fixture
def app() -> Iterator[Celery]:
    app = _app(task_always_eager=True)
    app.conf.task_scopes_task_events = True
    app.conf.task_scopes_capture_retries = True

    @app.task(name="host.add", shared=False)
    def add(x: int, y: int) -> int:
        task_scopes.capture("added")
        return x + y

    @app.task(name="host.fail", shared=False)
    def fail(error: Any) -> None:
        raise error

    attempts: list[int] = []

    @app.task(
        name="host.flaky",
        bind=True,
        shared=False,
        autoretry_for=(ConnectionError,),
        max_retries=1,
        retry_kwargs={"countdown": 0},
    )
    def flaky(self: Any) -> int:
        attempts.append(self.request.retries)
        if self.request.retries == 0:
            raise ConnectionError("first attempt")
        return len(attempts)

    task_scopes.celery.install(app)
    try:
        with capture_events():
            yield app
    finally:
        task_scopes.celery.uninstall(app)


def test_install_and_uninstall_return_when_shutting_down_a_client_fails(faults: Faults) -> None:
    app = _app(task_scopes_api_key="phc_first")
    task_scopes.celery.install(app)
    task_scopes.celery.app_client(app)  # made on first use
    faults.inject(_client.Client, "shutdown")
    try:
        options = task_scopes.celery.install(app, api_key="phc_second")  # replaces it
        assert options.api_key == "phc_second"
        task_scopes.celery.app_client(app)
    finally:
        assert task_scopes.celery.uninstall(app) is True
    assert sorted(faults.logged()) == [
        "install: shutting down the replaced client",
        "uninstall: shutting down the app's client",
    ]


def test_before_task_publish_failing_still_publishes_the_task(faults: Faults) -> None:
    app = _app()

    @app.task(name="host.publish", shared=False)
    def publish() -> None:
        pass

    task_scopes.celery.install(app)
    faults.inject(_memo, "merged_context")
    try:
        with task_scopes.new_context():
            task_scopes.identify_context("user-1")
            result = publish.apply_async()
        with app.connection_for_read() as conn:
            message = conn.default_channel.basic_get(app.conf.task_default_queue)
    finally:
        task_scopes.celery.uninstall(app)
    assert message is not None and message.headers["id"] == result.id
    assert faults.logged() == ["before_task_publish"]


@pytest.mark.parametrize(
    ("handler", "target"),
    [("task_prerun", "task_tags"), ("task_postrun", "_ms")],
)
def test_prerun_or_postrun_failing_the_task_still_runs_and_returns_its_value(
    handler: str, target: str, app: Celery, faults: Faults
) -> None:
    faults.inject(_signals, target)
    result = app.tasks["host.add"].apply((2, 3))
    assert result.successful() and result.get() == 5
    assert handler in faults.logged()


def test_task_failure_failing_the_tasks_own_exception_passes_unchanged(
    app: Celery, faults: Faults
) -> None:
    faults.inject(_signals, "capture_failure")
    raised = AppError("the task's own")
    result = app.tasks["host.fail"].apply((raised,))
    assert result.failed()
    assert result.result is raised
    with pytest.raises(AppError) as info:
        result.get()
    assert info.value is raised
    assert faults.logged() == ["task_failure"]


def test_task_retry_failing_the_retry_still_happens(app: Celery, faults: Faults) -> None:
    faults.inject(_signals, "expected")
    result = app.tasks["host.flaky"].apply()
    assert result.successful() and result.get() == 2  # the first attempt, then the retry
    assert "task_retry" in faults.logged()


def test_task_received_failing_the_worker_still_runs_the_task(faults: Faults) -> None:
    app = _app()

    @app.task(name="host.received", shared=False)
    def received() -> str | None:
        return task_scopes.get_context_distinct_id()

    class BrokenMap:
        def put(self, key: str, value: Any) -> None:
            raise InjectedFault("injected")

        def get(self, key: str, default: Any = None) -> Any:
            return default

    task_scopes.celery.install(app)
    faults.monkeypatch.setattr(_signals, "_received", BrokenMap())
    # Headers are remembered only for a prefork pool's main process: as if this were one.
    faults.monkeypatch.setattr(_signals, "_pool_keeps_received", lambda pool: True)
    try:
        app.finalize(auto=True)
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            with task_scopes.new_context():
                task_scopes.identify_context("user-1")
                result = received.apply_async()
            assert result.get(timeout=20) == "user-1"
    finally:
        task_scopes.celery.uninstall(app)
    assert faults.logged() == ["task_received"]


@pytest.mark.parametrize(
    ("signal", "target", "where"),
    [
        (signals.worker_process_init, "reset_process_state", "worker_process_init"),
        (signals.worker_process_shutdown, "flush_all", "worker_process_shutdown"),
        (signals.worker_shutdown, "flush_at_exit", "worker_shutdown"),
    ],
    ids=["worker_process_init", "worker_process_shutdown", "worker_shutdown"],
)
def test_worker_lifecycle_handlers_failing_the_signal_returns(
    signal: Any, target: str, where: str, app: Celery, faults: Faults
) -> None:
    faults.inject(_signals, target)
    responses = signal.send(sender=None, pid=0, exitcode=0)
    handler = getattr(_signals, f"_on_{where}")
    assert [response for receiver, response in responses if receiver is handler] == [None]
    assert faults.logged() == [where]


# -- web middleware -----------------------------------------------------------------------------


def test_wsgi_middleware_serves_the_apps_response_when_entering_the_scope_fails(
    faults: Faults,
) -> None:
    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"the app's body"]

    statuses: list[str] = []
    middleware = WsgiMiddleware(wsgi_app)
    faults.inject(_scope, "_owner")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "x", "SERVER_PORT": "80"}
    environ["wsgi.url_scheme"] = "http"
    body = middleware(environ, lambda status, headers: statuses.append(status))  # type: ignore[arg-type]
    assert list(body) == [b"the app's body"]
    assert statuses == ["200 OK"]
    assert faults.logged() == ["web enter_scope"]


def test_asgi_middleware_passes_the_apps_exception_unchanged_when_its_own_code_fails(
    faults: Faults,
) -> None:
    raised = AppError("the app's own")

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        raise raised

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    middleware = AsgiMiddleware(asgi_app)
    faults.inject(_scope, "_owner")
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    with capture_events(), pytest.raises(AppError) as info:
        asyncio.run(middleware(scope, receive, send))  # type: ignore[arg-type]
    assert info.value is raised
    assert "web enter_scope" in faults.logged()
