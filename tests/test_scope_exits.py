"""Scopes hold under any thread, task, import order and fork: entering and exiting never
raise into the application, whatever ``contextvars.Context`` they happen in."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import pytest

import task_scopes
from task_scopes import (
    Scope,
    _blocks,
    _internal,
    _scope,
    get_context_distinct_id,
    get_context_session_id,
    get_global_scope,
    get_tags,
    identify_context,
    isolation_scope,
    new_context,
    new_scope,
    set_context_session,
    tag,
    use_isolation_scope,
)

T = TypeVar("T")

Manager = Callable[[], AbstractContextManager[Scope]]
MANAGERS: dict[str, Manager] = {
    "new_context": new_context,
    "isolation_scope": isolation_scope,
    "new_scope": new_scope,
    "use_isolation_scope": lambda: use_isolation_scope(Scope()),
}


def in_empty_context(func: Callable[[], T]) -> T:
    """Run ``func`` in a brand-new ``contextvars.Context``."""
    return contextvars.Context().run(func)


@pytest.fixture
def exit_warnings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> pytest.LogCaptureFixture:
    """The exit warnings start afresh (they are rate-limited per process) and are kept."""
    monkeypatch.setattr(_scope, "_exit_log", _internal.RateLimitedLog(60.0))
    monkeypatch.setattr(_blocks, "_exit_log", _internal.RateLimitedLog(60.0))
    caplog.set_level(logging.WARNING, logger="task_scopes")
    return caplog


def _exit_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "exited in" in r.getMessage()]


# -- 1. a half-imported asyncio ----------------------------------------------------------------

_HALF_IMPORTED_ASYNCIO = """
import sys, types
import task_scopes
from task_scopes import _internal
from task_scopes._scope import enter_scope, exit_scope

_internal.set_reraise(True)  # a failure the guard would swallow fails this script instead
assert "asyncio" not in sys.modules, "precondition: nothing imported asyncio yet"
# What sys.modules holds while another thread is in its first `import asyncio`: the
# package object, before its submodules have filled it in.
sys.modules["asyncio"] = types.ModuleType("asyncio")

@task_scopes.scoped()
def handler():
    task_scopes.identify_context("decorated")
    return task_scopes.get_context_distinct_id()

@task_scopes.scoped()
def rows():
    task_scopes.identify_context("generator")
    yield task_scopes.get_context_distinct_id()

seen = []
task_scopes.tag("outside", 1)
with task_scopes.new_context() as scope:
    task_scopes.identify_context("user-1")
    task_scopes.set_context_session("session-1")
    task_scopes.get_isolation_scope().set_tag("a", 1)
    task_scopes.get_current_scope().set_tag("b", 2)
    with task_scopes.isolation_scope(), task_scopes.new_scope() as current:
        current.set_tag("c", 3)
        seen.append(task_scopes.get_tags())
    with task_scopes.use_isolation_scope(task_scopes.Scope(distinct_id="other")):
        seen.append(task_scopes.get_context_distinct_id())
    seen.append(handler())
    seen.append(list(rows()))
    tokens = enter_scope(task_scopes.Scope(distinct_id="entered"))
    seen.append(task_scopes.get_context_distinct_id())
    exit_scope(tokens)
    seen.append((task_scopes.get_context_distinct_id(), task_scopes.get_context_session_id()))
seen.append(task_scopes.get_tags())

# asyncio finishes importing: tasks must still be told apart (nothing was cached wrong)
del sys.modules["asyncio"]
import asyncio

async def child(i):
    task_scopes.tag("k", i)
    await asyncio.sleep(0)
    return task_scopes.get_tags()["k"]

async def main():
    task_scopes.tag("k", "parent")
    results = await asyncio.gather(*(child(i) for i in range(5)))
    return results, task_scopes.get_tags()["k"]

seen.append(asyncio.run(main()))
print(repr(seen))
"""


def test_every_scope_entry_point_works_while_asyncio_is_half_imported() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _HALF_IMPORTED_ASYNCIO],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(
        [
            {"outside": 1, "a": 1, "b": 2, "c": 3},
            "other",
            "decorated",
            ["generator"],
            "entered",
            ("user-1", "session-1"),
            {"outside": 1},
            ([0, 1, 2, 3, 4], "parent"),
        ]
    )


# -- 2. exits in another contextvars.Context ---------------------------------------------------


@pytest.mark.parametrize("name", MANAGERS)
def test_async_generator_closed_from_another_task_exits_without_raising(
    name: str, exit_warnings: pytest.LogCaptureFixture
) -> None:
    make = MANAGERS[name]

    async def gen() -> Any:
        with make() as scope:
            scope.set_distinct_id("inside")
            yield get_context_distinct_id()

    async def main() -> tuple[Any, str | None]:
        identify_context("outer")
        agen = gen()
        inside = await agen.__anext__()

        async def close() -> str | None:
            await agen.aclose()  # the block exits here, in this task's Context
            return get_context_distinct_id()

        return inside, await asyncio.create_task(close())

    inside, after_close = in_empty_context(lambda: asyncio.run(main()))
    assert inside == "inside"
    # the closing task's Context was a copy holding the generator's scope: taken off there
    assert after_close == "outer"
    assert len(_exit_messages(exit_warnings)) == 1, _exit_messages(exit_warnings)


@pytest.mark.parametrize("name", MANAGERS)
def test_generator_closed_in_another_thread_exits_without_raising(
    name: str, exit_warnings: pytest.LogCaptureFixture
) -> None:
    make = MANAGERS[name]

    def gen() -> Iterator[str | None]:
        with make() as scope:
            scope.set_distinct_id("inside")
            yield get_context_distinct_id()

    def scenario() -> tuple[str | None, list[Any]]:
        identify_context("outer")
        g = gen()
        inside = next(g)
        seen: list[Any] = []

        def close() -> None:
            try:
                g.close()  # a Context that never entered the block
                seen.append(get_context_distinct_id())
            except BaseException as exc:  # pragma: no cover - the failure under test
                seen.append(exc)

        thread = threading.Thread(target=close)
        thread.start()
        thread.join(10)
        return inside, seen

    inside, seen = in_empty_context(scenario)
    assert inside == "inside"
    assert seen == [None]  # nothing of the block was active in that thread: left alone
    assert len(_exit_messages(exit_warnings)) == 1


class FailingReset:
    """Stands in for one of the scope ContextVars; ``reset`` raises ``error`` (as a token of
    another Context would) after recording the token. Records every reset."""

    def __init__(self, var: contextvars.ContextVar[Any], error: type[Exception] | None) -> None:
        self.var = var
        self.error = error
        self.set_tokens: list[contextvars.Token[Any]] = []
        self.resets: list[contextvars.Token[Any]] = []

    def get(self, *default: Any) -> Any:
        return self.var.get(*default)

    def set(self, value: Any) -> contextvars.Token[Any]:
        token = self.var.set(value)
        self.set_tokens.append(token)
        return token

    def reset(self, token: contextvars.Token[Any]) -> None:
        self.resets.append(token)
        if self.error is not None:
            raise self.error("token reset failed")
        self.var.reset(token)


def _run_with_failing_reset(
    monkeypatch: pytest.MonkeyPatch, failing: str, error: type[Exception], name: str
) -> tuple[FailingReset, FailingReset, Any]:
    """Patch the isolation and current ContextVars (``failing`` one raising on reset),
    open ``name``'s block in a context where "outer" is identified, and return both
    stand-ins and what is seen after the block."""
    isolation = FailingReset(_scope._isolation_var, error if failing == "isolation" else None)
    current = FailingReset(_scope._current_var, error if failing == "current" else None)
    monkeypatch.setattr(_scope, "_isolation_var", isolation)
    monkeypatch.setattr(_scope, "_current_var", current)

    def scenario() -> Any:
        identify_context("outer")
        before = len(isolation.set_tokens), len(current.set_tokens)
        with MANAGERS[name]() as scope:
            entered = isolation.set_tokens[before[0] :], current.set_tokens[before[1] :]
            scope.set_distinct_id("inside")
            assert get_context_distinct_id() == "inside"
        return entered, get_context_distinct_id()

    return isolation, current, in_empty_context(scenario)


@pytest.mark.parametrize("error", [LookupError, ValueError, RuntimeError])
@pytest.mark.parametrize("name", MANAGERS)
def test_handle_error_on_token_reset_current_scope(
    name: str,
    error: type[Exception],
    monkeypatch: pytest.MonkeyPatch,
    exit_warnings: pytest.LogCaptureFixture,
) -> None:
    # sentry-python's test of the same name, on our four block managers
    _, current, ((_, current_tokens), after) = _run_with_failing_reset(
        monkeypatch, "current", error, name
    )
    assert current.resets == current_tokens  # reset was tried with the token it made
    assert len(_exit_messages(exit_warnings)) == 1
    assert after == "outer"  # and what was active before is back


@pytest.mark.parametrize("error", [LookupError, ValueError, RuntimeError])
@pytest.mark.parametrize("name", ["new_context", "isolation_scope", "use_isolation_scope"])
def test_handle_error_on_token_reset_isolation_scope(
    name: str,
    error: type[Exception],
    monkeypatch: pytest.MonkeyPatch,
    exit_warnings: pytest.LogCaptureFixture,
) -> None:
    # sentry-python's test of the same name: the isolation reset fails, the current
    # scope is still reset with its own token
    isolation, current, ((iso_tokens, current_tokens), after) = _run_with_failing_reset(
        monkeypatch, "isolation", error, name
    )
    assert len(iso_tokens) == 1 and isolation.resets == iso_tokens
    assert current.resets == current_tokens
    assert len(_exit_messages(exit_warnings)) == 1
    assert after == "outer"


# -- 3. one new_context object, entered many times ---------------------------------------------

SHARED = new_context()  # built once at module level, as users do


def test_one_new_context_object_shared_by_8_threads_keeps_each_entry_apart() -> None:
    inside = threading.Barrier(8)
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        try:
            identify_context(f"before-{i}")
            with SHARED as scope:
                identify_context(f"user-{i}")
                inside.wait(10)  # all 8 entries are open at once
                seen_inside = (get_context_distinct_id(), scope.distinct_id)
                inside.wait(10)
            results[i] = (seen_inside, get_context_distinct_id())
        except BaseException as exc:  # pragma: no cover - the failure under test
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == {i: ((f"user-{i}", f"user-{i}"), f"before-{i}") for i in range(8)}


def test_a_new_context_object_nested_in_itself_restores_each_level() -> None:
    ctx = new_context()

    def scenario() -> list[Any]:
        seen = []
        identify_context("before")
        with ctx as outer:
            identify_context("outer")
            with ctx as inner:
                identify_context("inner")
                seen.append((get_context_distinct_id(), inner is not outer))
            seen.append((get_context_distinct_id(), outer.distinct_id))
            with ctx:
                tag("again", True)
            seen.append(get_tags())
        seen.append(get_context_distinct_id())
        return seen

    assert in_empty_context(scenario) == [
        ("inner", True),
        ("outer", "outer"),
        {},
        "before",
    ]


def test_one_new_context_object_shared_by_concurrent_asyncio_tasks() -> None:
    ctx = new_context()

    async def task(i: int, started: asyncio.Barrier) -> tuple[str | None, str | None]:
        identify_context(f"before-{i}")
        with ctx:
            identify_context(f"user-{i}")
            await started.wait()  # every task is inside before any leaves
            inside = get_context_distinct_id()
        return inside, get_context_distinct_id()

    async def main() -> list[tuple[str | None, str | None]]:
        started = asyncio.Barrier(8)
        return list(await asyncio.gather(*(task(i, started) for i in range(8))))

    if not hasattr(asyncio, "Barrier"):  # Python 3.10: asyncio.Barrier is 3.11+
        pytest.skip("needs asyncio.Barrier")
    results = in_empty_context(lambda: asyncio.run(main()))
    assert results == [(f"user-{i}", f"before-{i}") for i in range(8)]


# -- 9. os.fork() inside a context -------------------------------------------------------------


def _context_state() -> tuple[Any, ...]:
    return get_context_distinct_id(), get_context_session_id(), get_tags()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_fork_clears_the_context_in_the_child_and_keeps_the_parents() -> None:
    global_scope = get_global_scope()
    global_scope.set_tag("service", "api")
    client = task_scopes.Client(transport=task_scopes.InMemoryTransport())
    previous_client = global_scope.client
    global_scope.set_client(client)
    parent = os.getpid()
    read_fd, write_fd = os.pipe()

    def scenario() -> tuple[int, Any]:
        states: list[Any] = []
        with new_context(fresh=True):
            identify_context("parent-user")
            set_context_session("parent-session")
            tag("parent-tag", "parent-value")
            with new_context():
                copied = contextvars.copy_context()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
                    pid = os.fork()
                if pid == 0:
                    states += [_context_state(), copied.run(_context_state)]
                    with new_context():
                        identify_context("child-user")
                        tag("child-tag", 1)
                        states.append(_context_state())
                    states.append(_context_state())
            # the child left the parent's blocks above: silently, still empty
            if pid == 0:
                states += [_context_state(), global_scope.client is client]
                os.write(write_fd, json.dumps(states).encode())
            return pid, _context_state()

    try:
        try:
            pid, parent_state = in_empty_context(scenario)
        finally:
            if os.getpid() != parent:  # the child never returns into pytest
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as reader:
            child_states = json.loads(reader.read() or b"null")
        _, status = os.waitpid(pid, 0)
    finally:
        global_scope.clear()
        global_scope.set_client(previous_client)
    assert os.waitstatus_to_exitcode(status) == 0
    empty = [None, None, {"service": "api"}]  # global tags are the process's: kept
    assert child_states == [
        empty,
        empty,
        ["child-user", None, {"service": "api", "child-tag": 1}],
        empty,
        empty,
        True,  # the client bound to the global scope is kept too
    ]
    assert parent_state == (
        "parent-user",
        "parent-session",
        {"service": "api", "parent-tag": "parent-value"},
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_process_forked_by_multiprocessing_inside_a_context_starts_empty() -> None:
    code = textwrap.dedent(
        """
        import multiprocessing, task_scopes
        def child(queue):
            queue.put(repr(task_scopes.get_context_distinct_id()))
        if __name__ == "__main__":
            ctx = multiprocessing.get_context("fork")
            queue = ctx.Queue()
            with task_scopes.new_context():
                task_scopes.identify_context("parent-user")
                process = ctx.Process(target=child, args=(queue,))
                process.start()
                print(queue.get(timeout=30), task_scopes.get_context_distinct_id())
                process.join(30)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "parent-user"]
