"""``@scoped`` / ``@new_context()`` on generator and async generator functions: the scope
is active while the body runs, each resumption, and the caller's context is untouched
between resumptions."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, TypeVar

import pytest

from task_scopes import (
    get_context_distinct_id,
    get_tags,
    identify_context,
    new_context,
    scoped,
    tag,
)
from task_scopes.testing import CapturedEvents, capture_events

T = TypeVar("T")

DECORATORS: dict[str, Callable[[], Callable[[Any], Any]]] = {
    "scoped": scoped,
    "new_context": new_context,
}


def in_empty_context(func: Callable[[], T]) -> T:
    return contextvars.Context().run(func)


class Boom(Exception):
    pass


@pytest.mark.parametrize("decorator", DECORATORS)
def test_a_decorated_generator_runs_its_body_in_its_own_scope(decorator: str) -> None:
    @DECORATORS[decorator]()
    def rows(user: str) -> Iterator[tuple[int, str | None, dict[str, Any]]]:
        identify_context(user)
        for i in range(3):
            tag("row", i)
            yield i, get_context_distinct_id(), get_tags()

    def scenario() -> list[Any]:
        identify_context("caller")
        tag("origin", "caller")
        seen: list[Any] = []
        gen = rows("alice")
        for row in gen:
            seen.append(row)
            # between resumptions the caller is itself again
            seen.append((get_context_distinct_id(), get_tags()))
        seen.append(get_context_distinct_id())
        return seen

    caller = ("caller", {"origin": "caller"})
    assert in_empty_context(scenario) == [
        (0, "alice", {"origin": "caller", "row": 0}),
        caller,
        (1, "alice", {"origin": "caller", "row": 1}),
        caller,
        (2, "alice", {"origin": "caller", "row": 2}),
        caller,
        "caller",
    ]


def test_list_of_a_decorated_generator_leaves_the_caller_as_it_was() -> None:
    @scoped()
    def rows(user: str) -> Iterator[str | None]:
        identify_context(user)
        yield get_context_distinct_id()
        yield get_context_distinct_id()

    def scenario() -> tuple[list[str | None], str | None]:
        identify_context("caller")
        return list(rows("alice")), get_context_distinct_id()

    assert in_empty_context(scenario) == (["alice", "alice"], "caller")


@pytest.mark.parametrize("decorator", DECORATORS)
def test_a_decorated_async_generator_runs_its_body_in_its_own_scope(decorator: str) -> None:
    @DECORATORS[decorator]()
    async def rows(user: str) -> AsyncIterator[tuple[int, str | None]]:
        identify_context(user)
        for i in range(3):
            await asyncio.sleep(0)  # other tasks run between the steps of a resumption
            yield i, get_context_distinct_id()

    async def other_task() -> str | None:
        identify_context("other")
        await asyncio.sleep(0)
        return get_context_distinct_id()

    async def main() -> list[Any]:
        identify_context("caller")
        seen: list[Any] = []
        other = asyncio.create_task(other_task())
        async for row in rows("bob"):
            seen.append((row, get_context_distinct_id()))
        seen.append((await other, get_context_distinct_id()))
        return seen

    assert in_empty_context(lambda: asyncio.run(main())) == [
        ((0, "bob"), "caller"),
        ((1, "bob"), "caller"),
        ((2, "bob"), "caller"),
        ("other", "caller"),
    ]


def test_closing_a_decorated_generator_early_runs_its_cleanup_in_its_scope() -> None:
    cleanup: list[str | None] = []

    @scoped()
    def rows() -> Iterator[int]:
        identify_context("alice")
        try:
            yield 1
            yield 2
        finally:
            cleanup.append(get_context_distinct_id())

    def scenario() -> str | None:
        identify_context("caller")
        gen = rows()
        assert next(gen) == 1
        gen.close()
        return get_context_distinct_id()

    assert in_empty_context(scenario) == "caller"
    assert cleanup == ["alice"]


def test_closing_a_decorated_async_generator_early_runs_its_cleanup_in_its_scope() -> None:
    cleanup: list[str | None] = []

    @scoped()
    async def rows() -> AsyncIterator[int]:
        identify_context("alice")
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0)
            cleanup.append(get_context_distinct_id())

    async def main() -> str | None:
        identify_context("caller")
        agen = rows()
        assert await agen.__anext__() == 1
        await agen.aclose()
        return get_context_distinct_id()

    assert in_empty_context(lambda: asyncio.run(main())) == "caller"
    assert cleanup == ["alice"]


def test_send_throw_and_the_return_value_pass_through_a_decorated_generator() -> None:
    @scoped()
    def echo() -> Generator[str, str, str]:
        identify_context("alice")
        received = yield "ready"
        try:
            yield f"{received} as {get_context_distinct_id()}"
        except KeyError as exc:
            yield f"caught {exc.args[0]} as {get_context_distinct_id()}"
        return "done"

    def delegate() -> Generator[str, str, str]:
        result = yield from echo()
        return result

    def scenario() -> list[Any]:
        identify_context("caller")
        gen = delegate()
        seen: list[Any] = [next(gen), gen.send("hello"), gen.throw(KeyError("k"))]
        with pytest.raises(StopIteration) as stop:
            next(gen)
        seen += [stop.value.value, get_context_distinct_id()]
        return seen

    assert in_empty_context(scenario) == [
        "ready",
        "hello as alice",
        "caught k as alice",
        "done",
        "caller",
    ]


def test_an_exception_escaping_a_decorated_generator_is_captured_in_its_scope() -> None:
    raised = Boom("bad row")

    @scoped()
    def rows() -> Iterator[int]:
        identify_context("alice")
        yield 1
        raise raised

    def scenario() -> tuple[BaseException | None, str | None]:
        identify_context("caller")
        gen = rows()
        next(gen)
        try:
            next(gen)
        except Boom as exc:
            return exc, get_context_distinct_id()
        return None, None

    with capture_events() as captured:
        escaped, after = in_empty_context(scenario)
    assert escaped is raised
    assert after == "caller"
    [event] = captured.named("$exception")
    assert event["distinct_id"] == "alice"


def test_an_exception_escaping_a_decorated_async_generator_is_captured_once() -> None:
    @scoped()
    async def rows() -> AsyncIterator[int]:
        identify_context("bob")
        yield 1
        raise Boom("bad async row")

    async def main() -> None:
        async for _ in rows():
            pass

    captured: CapturedEvents
    with capture_events() as captured, pytest.raises(Boom, match="bad async row"):
        in_empty_context(lambda: asyncio.run(main()))
    [event] = captured.named("$exception")
    assert event["distinct_id"] == "bob"


def test_decorated_generators_are_still_generator_functions() -> None:
    @scoped()
    def rows() -> Iterator[int]:
        yield 1

    @new_context()
    async def arows() -> AsyncIterator[int]:
        yield 1

    # frameworks (FastAPI dependencies with yield, pytest fixtures) look at this
    assert inspect.isgeneratorfunction(rows)
    assert inspect.isasyncgenfunction(arows)
    assert rows.__name__ == "rows"


def test_two_interleaved_runs_of_one_decorated_generator_keep_their_own_scopes() -> None:
    @scoped()
    def rows(user: str) -> Iterator[str | None]:
        identify_context(user)
        while True:
            yield get_context_distinct_id()

    def scenario() -> list[str | None]:
        first, second = rows("alice"), rows("bob")
        return [next(first), next(second), next(first), next(second), get_context_distinct_id()]

    assert in_empty_context(scenario) == ["alice", "bob", "alice", "bob", None]
