"""Scopes: nesting, precedence, isolation between threads and asyncio tasks, no growth."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from task_scopes import (
    Scope,
    capture,
    get_context_distinct_id,
    get_context_session_id,
    get_current_scope,
    get_global_scope,
    get_isolation_scope,
    get_tags,
    identify_context,
    isolation_scope,
    new_context,
    new_scope,
    set_context_session,
    tag,
    use_isolation_scope,
)
from task_scopes._scope import enter_scope, exit_scope
from task_scopes.testing import CapturedEvents, capture_events

T = TypeVar("T")
N = 50


def in_empty_context(func: Callable[[], T]) -> T:
    """Run ``func`` in a brand-new ``contextvars.Context``: no scope of an earlier test is
    visible and nothing it sets outside a ``new_context()`` outlives it."""
    return contextvars.Context().run(func)


@pytest.fixture
def global_tags() -> Iterator[Scope]:
    """The global scope, emptied again after the test."""
    scope = get_global_scope()
    yield scope
    scope.clear()


@pytest.fixture
def captured() -> Iterator[CapturedEvents]:
    with capture_events() as events:
        yield events


# -- nesting --------------------------------------------------------------------------


def test_child_override_is_visible_inside_and_parent_value_is_back_after_exit() -> None:
    with new_context():
        identify_context("parent")
        set_context_session("session-parent")
        tag("plan", "pro")
        with new_context():
            assert get_context_distinct_id() == "parent"  # inherited
            identify_context("child")
            set_context_session("session-child")
            tag("plan", "free")
            assert get_context_distinct_id() == "child"
            assert get_context_session_id() == "session-child"
            assert get_tags()["plan"] == "free"
        assert get_context_distinct_id() == "parent"
        assert get_context_session_id() == "session-parent"
        assert get_tags() == {"plan": "pro"}


def test_tag_added_in_child_context_is_gone_after_exit() -> None:
    with new_context():
        tag("a", 1)
        with new_context():
            tag("b", 2)
            assert get_tags() == {"a": 1, "b": 2}
        assert get_tags() == {"a": 1}


def test_fresh_context_inherits_no_tag_no_distinct_id_no_session(global_tags: Scope) -> None:
    global_tags.set_tag("service", "api")
    with new_context():
        identify_context("parent")
        set_context_session("s")
        tag("plan", "pro")
        with new_context(fresh=True):
            assert get_tags() == {"service": "api"}  # global tags still apply
            assert get_context_distinct_id() is None
            assert get_context_session_id() is None
        assert get_tags() == {"service": "api", "plan": "pro"}


def test_tag_precedence_is_global_then_isolation_then_current(global_tags: Scope) -> None:
    global_tags.set_tag("k", "global")
    global_tags.set_tag("only_global", 1)
    with new_context():
        assert get_tags()["k"] == "global"
        tag("k", "isolation")
        assert get_tags()["k"] == "isolation"
        with new_scope() as current:
            current.set_tag("k", "current")
            assert get_tags() == {"k": "current", "only_global": 1}
        assert get_tags()["k"] == "isolation"


def test_distinct_id_is_read_from_current_then_isolation_then_global(
    global_tags: Scope,
) -> None:
    global_tags.set_distinct_id("from-global")
    with new_context():
        assert get_context_distinct_id() == "from-global"
        identify_context("from-isolation")
        with new_scope() as current:
            current.set_distinct_id("from-current")
            assert get_context_distinct_id() == "from-current"
        assert get_context_distinct_id() == "from-isolation"


def test_window_id_is_read_like_the_session_id_and_sent_as_dollar_window_id(
    global_tags: Scope, captured: CapturedEvents
) -> None:
    global_tags.set_window_id("win-global")
    with new_context():
        capture("global")
        get_isolation_scope().set_window_id("win-isolation")
        with new_scope() as current:
            current.set_window_id("win-current")
            capture("current")
            capture("explicit", properties={"$window_id": "win-explicit"})
        capture("isolation")
        forked = get_isolation_scope().fork()
        get_isolation_scope().clear()
        capture("cleared")
    assert forked.window_id == "win-isolation"
    assert "win-isolation" in repr(forked)
    windows = {e["event"]: e["properties"]["$window_id"] for e in captured.events}
    assert windows == {
        "global": "win-global",
        "current": "win-current",
        "explicit": "win-explicit",
        "isolation": "win-isolation",
        "cleared": "win-global",
    }


def test_explicit_capture_properties_beat_tags_of_every_scope(
    global_tags: Scope, captured: CapturedEvents
) -> None:
    global_tags.set_tag("k", "global")
    with new_context():
        tag("k", "isolation")
        with new_scope() as current:
            current.set_tag("k", "current")
            capture("e", properties={"k": "explicit"})
            capture("f")
    by_name = {e["event"]: e["properties"]["k"] for e in captured.events}
    assert by_name == {"e": "explicit", "f": "current"}


def test_tag_outside_any_context_writes_to_a_lazily_created_isolation_scope() -> None:
    def scenario() -> tuple[dict[str, Any], str | None, bool]:
        tag("plan", "pro")
        identify_context("user-1")
        return get_tags(), get_context_distinct_id(), get_isolation_scope().tags == {"plan": "pro"}

    tags, distinct_id, on_isolation = in_empty_context(scenario)
    assert tags == {"plan": "pro"}
    assert distinct_id == "user-1"
    assert on_isolation
    assert "plan" not in get_tags()  # stayed in the context it was set in


def test_isolation_scope_block_forks_and_restores() -> None:
    with new_context():
        tag("plan", "pro")
        with isolation_scope() as scope:
            scope.set_tag("plan", "free")
            tag("extra", 1)
            assert get_tags() == {"plan": "free", "extra": 1}
        assert get_tags() == {"plan": "pro"}


def test_use_isolation_scope_makes_the_top_level_setters_write_into_that_scope() -> None:
    mine = Scope(distinct_id="user-1", tags={"a": 1})
    with use_isolation_scope(mine):
        tag("b", 2)
        assert get_context_distinct_id() == "user-1"
    assert mine.tags == {"a": 1, "b": 2}
    assert "b" not in get_tags()


def test_exit_scope_restores_what_was_active_before_enter_scope() -> None:
    with new_context():
        identify_context("before")
        tokens = enter_scope(Scope(distinct_id="task-user", tags={"t": 1}))
        assert get_context_distinct_id() == "task-user"
        tag("set_inside", True)
        exit_scope(tokens)
        assert get_context_distinct_id() == "before"
        assert get_tags() == {}


def test_scope_fork_copies_tags_so_the_child_does_not_change_the_parent() -> None:
    parent = Scope(distinct_id="user-1", tags={"plan": "pro"})
    child = parent.fork()
    child.set_tag("plan", "free")
    child.set_distinct_id("user-2")
    assert parent.tags == {"plan": "pro"}
    assert parent.distinct_id == "user-1"
    assert child.tags == {"plan": "free"}


def test_get_current_scope_outside_a_context_is_private_to_the_context() -> None:
    def scenario() -> dict[str, Any]:
        get_current_scope().set_tag("c", 1)
        return get_tags()

    assert in_empty_context(scenario) == {"c": 1}
    assert "c" not in get_tags()


# -- copy-on-write between threads and tasks ------------------------------------------


def test_a_thread_reusing_a_dead_threads_ident_does_not_write_into_its_copied_scopes() -> None:
    # glibc hands a finished thread's ident to the next thread; two contexts copied from
    # the dead thread must stay independent when the new thread writes through one.
    box: dict[str, Any] = {}

    def first() -> None:
        tag("k", "original")
        box["a"] = contextvars.copy_context()
        box["b"] = contextvars.copy_context()

    def second() -> None:
        box["a"].run(tag, "k", "changed")

    for target in (first, second):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert box["a"].run(get_tags) == {"k": "changed"}
    assert box["b"].run(get_tags) == {"k": "original"}


def test_a_task_writing_in_a_context_copied_from_its_parent_leaves_the_parent_alone() -> None:
    async def main() -> dict[str, Any]:
        tag("k", "parent")

        async def child() -> None:
            tag("k", "child")

        await asyncio.create_task(child())
        return get_tags()

    assert asyncio.run(main()) == {"k": "parent"}


def test_a_task_that_opened_its_own_context_no_longer_sees_later_parent_writes() -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        tag("k", "before")
        started, go = asyncio.Event(), asyncio.Event()

        async def child() -> dict[str, Any]:
            with new_context():
                started.set()
                await go.wait()
                return get_tags()

        task = asyncio.create_task(child())
        await started.wait()
        tag("k", "after")
        go.set()
        return await task, get_tags()

    child_tags, parent_tags = in_empty_context(lambda: asyncio.run(main()))
    assert child_tags == {"k": "before"}
    assert parent_tags == {"k": "after"}


def _assert_each_event_is_its_own(events: list[dict[str, Any]], parent_tag: bool) -> None:
    assert len(events) == N
    for event in events:
        worker = event["properties"]["worker"]
        assert event["distinct_id"] == f"user-{worker}"
        assert event["properties"]["$session_id"] == f"session-{worker}"
        if parent_tag:
            assert event["properties"]["origin"] == "parent"
    assert len({e["distinct_id"] for e in events}) == N


def _identify_then_capture(i: int, all_identified: threading.Barrier) -> None:
    identify_context(f"user-{i}")
    set_context_session(f"session-{i}")
    tag("worker", i)
    all_identified.wait(10)  # every thread has written before any reads
    capture("work")


@pytest.mark.parametrize("enclosing", ["none", "new_context_per_thread"])
def test_50_threads_each_capture_with_their_own_distinct_id(
    enclosing: str, captured: CapturedEvents
) -> None:
    barrier = threading.Barrier(N)

    def worker(i: int) -> None:
        if enclosing == "none":
            _identify_then_capture(i, barrier)
        else:
            with new_context():
                _identify_then_capture(i, barrier)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    _assert_each_event_is_its_own(captured.events, parent_tag=False)


@pytest.mark.parametrize("parent_opens_context", [True, False])
def test_50_threads_in_copies_of_a_tagged_parent_context_each_keep_their_own_identity(
    parent_opens_context: bool, captured: CapturedEvents
) -> None:
    # The parent has set its scope before spawning; every thread runs in a copy of the
    # parent's context (as ThreadPoolExecutor + copy_context, asyncio.to_thread do) and
    # so starts with the very same Scope objects: writes must fork them.
    barrier = threading.Barrier(N)

    def scenario() -> tuple[str | None, dict[str, Any]]:
        identify_context("parent")
        set_context_session("session-parent")
        tag("origin", "parent")
        threads = [
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(_identify_then_capture, i, barrier),
            )
            for i in range(N)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        return get_context_distinct_id(), get_tags()

    def in_new_context() -> tuple[str | None, dict[str, Any]]:
        with new_context():
            return scenario()

    parent_id, parent_tags = in_empty_context(in_new_context if parent_opens_context else scenario)
    _assert_each_event_is_its_own(captured.events, parent_tag=True)
    assert parent_id == "parent"
    assert parent_tags == {"origin": "parent"}


async def _task_identify_then_capture(i: int, state: dict[str, Any]) -> None:
    identify_context(f"user-{i}")
    set_context_session(f"session-{i}")
    tag("worker", i)
    state["identified"] += 1
    if state["identified"] == N:
        state["all"].set()
    await state["all"].wait()  # every task has written before any reads
    capture("work")


@pytest.mark.parametrize(
    "enclosing",
    ["none", "new_context_per_task", "tagged_parent", "tagged_parent_in_new_context"],
)
def test_50_asyncio_tasks_each_capture_with_their_own_distinct_id(
    enclosing: str, captured: CapturedEvents
) -> None:
    tagged_parent = enclosing.startswith("tagged_parent")

    async def task(i: int, state: dict[str, Any]) -> None:
        if enclosing == "new_context_per_task":
            with new_context():
                await _task_identify_then_capture(i, state)
        else:
            await _task_identify_then_capture(i, state)

    async def spawn() -> tuple[str | None, dict[str, Any]]:
        if tagged_parent:
            identify_context("parent")
            tag("origin", "parent")
        state: dict[str, Any] = {"identified": 0, "all": asyncio.Event()}
        await asyncio.gather(*(task(i, state) for i in range(N)))
        return get_context_distinct_id(), get_tags()

    async def main() -> tuple[str | None, dict[str, Any]]:
        if enclosing == "tagged_parent_in_new_context":
            with new_context():
                return await spawn()
        return await spawn()

    parent_id, parent_tags = in_empty_context(lambda: asyncio.run(main()))
    _assert_each_event_is_its_own(captured.events, parent_tag=tagged_parent)
    if tagged_parent:
        assert parent_id == "parent"
        assert parent_tags == {"origin": "parent"}


def test_to_thread_workers_of_a_tagged_task_each_keep_their_own_identity(
    captured: CapturedEvents,
) -> None:
    # asyncio.to_thread runs each call in a copy of the task's context on a pool thread
    # that is reused for several calls.
    barrier = threading.Barrier(N)

    async def main() -> str | None:
        with new_context():
            identify_context("parent")
            tag("origin", "parent")
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(max_workers=N) as pool:
                loop.set_default_executor(pool)
                await asyncio.gather(
                    *(asyncio.to_thread(_identify_then_capture, i, barrier) for i in range(N))
                )
            return get_context_distinct_id()

    assert asyncio.run(main()) == "parent"
    _assert_each_event_is_its_own(captured.events, parent_tag=True)


# -- no growth ------------------------------------------------------------------------


def _live_scopes() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is Scope)


def _sequential(count: int) -> None:
    for i in range(count):
        with new_context():
            identify_context("user")
            tag("i", i)


def _nested(depth: int) -> None:
    with new_context():
        tag("depth", depth)
        if depth > 1:
            _nested(depth - 1)


def _chunks_of_nested(total: int, depth: int = 50) -> None:
    for _ in range(total // depth):
        _nested(depth)


@pytest.mark.parametrize("pattern", [_sequential, _chunks_of_nested], ids=["sequential", "nested"])
def test_opening_and_closing_100k_contexts_leaves_no_memory_growth(
    pattern: Callable[[int], None],
) -> None:
    def scenario() -> tuple[int, int, int]:
        pattern(1_000)  # warm caches (tag dicts, code objects) before measuring
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            pattern(100_000)
            gc.collect()
            after, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return before, after, peak

    scopes_before = _live_scopes()
    before, after, peak = in_empty_context(scenario)
    assert after - before < 16 * 1024, f"grew by {after - before} bytes"
    assert peak - before < 256 * 1024  # nothing held for the length of the run either
    assert _live_scopes() == scopes_before


def test_finished_asyncio_tasks_leave_no_scope_behind() -> None:
    # A scope remembers the task that owns it; task -> context -> scope -> task is a
    # cycle the collector must be able to free.
    async def one(i: int) -> None:
        with new_context():
            identify_context(f"user-{i}")
        tag("outside", i)

    async def main() -> None:
        for start in range(0, 5_000, 500):
            await asyncio.gather(*(one(i) for i in range(start, start + 500)))

    scopes_before = _live_scopes()
    in_empty_context(lambda: asyncio.run(main()))
    assert _live_scopes() == scopes_before
