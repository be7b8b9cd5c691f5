"""The top-level API: new_context / scoped as decorators, exceptions escaping a context,
the default client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import traceback
from collections.abc import Iterator

import pytest

import task_scopes
from task_scopes import (
    Client,
    get_client,
    get_context_distinct_id,
    get_tags,
    identify_context,
    new_context,
    scoped,
    tag,
)
from task_scopes.testing import CapturedEvents, CaptureServer, capture_events


@pytest.fixture
def captured() -> Iterator[CapturedEvents]:
    with capture_events() as events:
        yield events


class Boom(Exception):
    pass


def test_new_context_decorates_a_sync_function_with_a_scope_of_its_own() -> None:
    @new_context()
    def handler(user: str) -> tuple[str | None, dict[str, object]]:
        identify_context(user)
        tag("handled", True)
        return get_context_distinct_id(), get_tags()

    with new_context():
        identify_context("outer")
        assert handler("inner") == ("inner", {"handled": True})
        assert get_context_distinct_id() == "outer"
        assert get_tags() == {}


def test_scoped_decorates_an_async_function_with_a_scope_per_call() -> None:
    @scoped()
    async def handler(user: str) -> str | None:
        identify_context(user)
        await asyncio.sleep(0)
        return get_context_distinct_id()

    async def main() -> tuple[list[str | None], str | None]:
        identify_context("outer")
        results = await asyncio.gather(*(handler(f"user-{i}") for i in range(10)))
        return list(results), get_context_distinct_id()

    with new_context():
        results, outer = asyncio.run(main())
    assert results == [f"user-{i}" for i in range(10)]
    assert outer == "outer"


def test_scoped_fresh_decorator_starts_without_the_callers_context() -> None:
    @scoped(fresh=True)
    def handler() -> tuple[str | None, dict[str, object]]:
        return get_context_distinct_id(), get_tags()

    with new_context():
        identify_context("outer")
        tag("plan", "pro")
        assert handler() == (None, {})


def test_decorated_function_keeps_its_name_and_return_value() -> None:
    @scoped()
    def compute(x: int) -> int:
        """Doc."""
        return x * 2

    assert compute(21) == 42
    assert compute.__name__ == "compute"
    assert compute.__doc__ == "Doc."


def test_exception_escaping_nested_contexts_is_captured_once_and_reraised_unchanged(
    captured: CapturedEvents,
) -> None:
    raised = Boom("bad")
    with pytest.raises(Boom) as info, new_context():
        identify_context("user-1")
        with new_context():
            raise raised
    assert info.value is raised
    assert str(info.value) == "bad"
    # the traceback still ends where the code raised, not inside task_scopes
    assert traceback.extract_tb(info.value.__traceback__)[-1].line == "raise raised"
    events = captured.named("$exception")
    assert len(events) == 1
    assert events[0]["distinct_id"] == "user-1"
    assert events[0]["properties"]["$exception_type"] == "Boom"
    assert events[0]["properties"]["$exception_list"][0]["mechanism"] == {
        "type": "new_context",
        "handled": False,
        "synthetic": False,
    }


def test_exception_escaping_a_decorated_async_function_is_captured_and_reraised(
    captured: CapturedEvents,
) -> None:
    @scoped()
    async def handler() -> None:
        identify_context("user-async")
        raise Boom("async")

    with pytest.raises(Boom, match="async"):
        asyncio.run(handler())
    [event] = captured.named("$exception")
    assert event["distinct_id"] == "user-async"


def test_capture_exceptions_false_lets_the_exception_through_uncaptured(
    captured: CapturedEvents,
) -> None:
    with pytest.raises(Boom), new_context(capture_exceptions=False):
        raise Boom
    assert captured.named("$exception") == []


def test_base_exceptions_that_are_not_errors_are_not_captured(captured: CapturedEvents) -> None:
    with pytest.raises(KeyboardInterrupt), new_context():
        raise KeyboardInterrupt
    assert captured.named("$exception") == []


def test_default_client_is_disabled_until_init_and_drops_captures() -> None:
    # a process of its own: other tests may have installed a default client in this one
    code = (
        "import task_scopes\n"
        "print(task_scopes.get_client().disabled, task_scopes.capture('nothing'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["True", "None"]


def test_client_without_api_key_or_transport_is_disabled_and_returns_none() -> None:
    client = Client()
    assert client.disabled
    assert client.capture("nothing") is None
    assert client.capture_exception(Boom()) is None
    assert client.stats().captured == 0


def test_init_binds_its_client_to_the_global_scope_and_module_level_capture_uses_it() -> None:
    previous_global = task_scopes.get_global_scope().client
    with CaptureServer() as server:
        try:
            client = task_scopes.init("phc_test", server.url, flush_interval=0.05)
            assert get_client() is client
            with new_context():
                identify_context("user-1")
                uuid = task_scopes.capture("signed_up")
                task_scopes.set(properties={"plan": "pro"})
                task_scopes.set_once(properties={"first_seen": "today"})
            assert task_scopes.flush(timeout=10) == 0
        finally:
            task_scopes.get_global_scope().set_client(previous_global)
            client.shutdown(timeout=5)
        events = server.wait_for(3)
    assert [e["event"] for e in events] == ["signed_up", "$set", "$set"]
    assert events[0]["uuid"] == uuid
    assert {e["distinct_id"] for e in events} == {"user-1"}
    assert events[1]["properties"]["$set"] == {"plan": "pro"}
    assert events[2]["properties"]["$set_once"] == {"first_seen": "today"}


def test_init_shuts_down_the_client_it_bound_before() -> None:
    previous_global = task_scopes.get_global_scope().client
    with CaptureServer() as server:
        first = task_scopes.init("phc_test", server.url, flush_interval=300)
        first.capture("before_reinit")
        second = task_scopes.init("phc_test", server.url, flush_interval=300)
        try:
            # the first client was flushed on the way out although its interval is 300 s
            assert [e["event"] for e in server.wait_for(1, timeout=5)] == ["before_reinit"]
            assert first.stats().delivered == 1
            assert get_client() is second
        finally:
            task_scopes.get_global_scope().set_client(previous_global)
            second.shutdown(timeout=5)


def test_capture_exception_without_argument_takes_the_exception_being_handled(
    captured: CapturedEvents,
) -> None:
    try:
        raise Boom("handled here")
    except Boom:
        uuid = task_scopes.capture_exception()
        assert sys.exc_info()[0] is Boom
    [event] = captured.named("$exception")
    assert event["uuid"] == uuid
    assert event["properties"]["$exception_message"] == "handled here"
    assert event["properties"]["$exception_list"][0]["mechanism"]["handled"] is True


def test_capture_exception_outside_an_except_block_returns_none(
    captured: CapturedEvents,
) -> None:
    assert task_scopes.capture_exception() is None
    assert captured.events == []


def test_client_is_a_keyword_only_constructor_after_key_and_host() -> None:
    with pytest.raises(TypeError):
        Client("phc", "http://127.0.0.1:1", 100)  # type: ignore[misc]
    with pytest.raises(ValueError, match="flush_at"):
        Client("phc", "http://127.0.0.1:1", flush_at=0)
