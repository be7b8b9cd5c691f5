"""``$exception`` events: the chain, outermost first, with frames of the raising code."""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from task_scopes import capture_exception, new_context
from task_scopes._exceptions import exception_list
from task_scopes.testing import CapturedEvents, capture_events


@pytest.fixture
def captured() -> Iterator[CapturedEvents]:
    with capture_events() as events:
        yield events


def _line_of(func: Callable[..., Any], code: str) -> int:
    """Line number of the one line of ``func``'s source containing ``code``."""
    lines, start = inspect.getsourcelines(func)
    [index] = [i for i, line in enumerate(lines) if code in line]
    return start + index


def _raise_inner() -> None:
    raise KeyError("inner")


def _raise_outer() -> None:
    try:
        _raise_inner()
    except KeyError as exc:
        raise ValueError("outer") from exc


def _raise_with_context() -> None:
    try:
        _raise_inner()
    except KeyError:
        raise RuntimeError("while handling")  # noqa: B904 - the implicit chain is the point


def _raise_from_none() -> None:
    try:
        _raise_inner()
    except KeyError:
        raise RuntimeError("context suppressed") from None


def _caught(func: Callable[[], None]) -> BaseException:
    try:
        func()
    except Exception as exc:
        return exc
    raise AssertionError("did not raise")


def _function_and_line(frame: dict[str, Any]) -> tuple[str, int]:
    return frame["function"], frame["lineno"]


def _single_exception_event(captured: CapturedEvents) -> dict[str, Any]:
    [event] = captured.named("$exception")
    return event


def test_chained_exception_lists_both_outermost_first(captured: CapturedEvents) -> None:
    capture_exception(_caught(_raise_outer))
    props = _single_exception_event(captured)["properties"]
    entries = props["$exception_list"]
    assert [(e["type"], e["value"]) for e in entries] == [
        ("ValueError", "outer"),
        ("KeyError", "'inner'"),
    ]
    assert [e["mechanism"]["type"] for e in entries] == ["generic", "chained"]
    assert props["$exception_type"] == "ValueError"
    assert props["$exception_message"] == "outer"


def test_frames_give_the_function_and_line_of_the_raising_code(
    captured: CapturedEvents,
) -> None:
    capture_exception(_caught(_raise_outer))
    outer, inner = _single_exception_event(captured)["properties"]["$exception_list"]
    caught_at = _line_of(_caught, "func()")
    # oldest call first: from where it was caught down to the raise
    assert [_function_and_line(f) for f in outer["stacktrace"]["frames"]] == [
        ("_caught", caught_at),
        ("_raise_outer", _line_of(_raise_outer, 'raise ValueError("outer")')),
    ]
    assert [_function_and_line(f) for f in inner["stacktrace"]["frames"]] == [
        ("_raise_outer", _line_of(_raise_outer, "_raise_inner()")),
        ("_raise_inner", _line_of(_raise_inner, 'raise KeyError("inner")')),
    ]
    assert outer["stacktrace"]["type"] == "raw"


def test_frames_carry_file_module_source_line_and_in_app(captured: CapturedEvents) -> None:
    capture_exception(_caught(_raise_inner))
    entry = _single_exception_event(captured)["properties"]["$exception_list"][0]
    frame = entry["stacktrace"]["frames"][-1]
    assert frame["abs_path"] == os.path.abspath(__file__)
    assert frame["filename"] == inspect.getsourcefile(_raise_inner)
    assert frame["module"] == __name__
    assert frame["context_line"] == 'raise KeyError("inner")'
    assert frame["in_app"] is True
    assert frame["platform"] == "python"
    assert entry["module"] == "builtins"


def test_frames_in_the_standard_library_are_not_in_app() -> None:
    def parse() -> None:
        json.loads("{")

    [entry] = exception_list(_caught(parse))
    frames = entry["stacktrace"]["frames"]
    assert frames[1]["function"] == "parse" and frames[1]["in_app"] is True
    library = [f for f in frames if f["abs_path"].endswith(os.path.join("json", "decoder.py"))]
    assert library and not any(f["in_app"] for f in library)


def test_implicit_context_is_chained_too(captured: CapturedEvents) -> None:
    capture_exception(_caught(_raise_with_context))
    entries = _single_exception_event(captured)["properties"]["$exception_list"]
    assert [e["type"] for e in entries] == ["RuntimeError", "KeyError"]


def test_suppressed_context_is_not_followed(captured: CapturedEvents) -> None:
    capture_exception(_caught(_raise_from_none))
    entries = _single_exception_event(captured)["properties"]["$exception_list"]
    assert [e["type"] for e in entries] == ["RuntimeError"]


def test_the_same_exception_object_captured_twice_is_sent_once(
    captured: CapturedEvents,
) -> None:
    exc = _caught(_raise_outer)
    assert capture_exception(exc) is not None
    assert capture_exception(exc) is None
    with pytest.raises(ValueError), new_context():
        raise exc  # escapes a context that captures exceptions: already sent
    assert len(captured.named("$exception")) == 1


def test_a_cycle_in_the_chain_is_cut() -> None:
    first, second = ValueError("a"), KeyError("b")
    first.__context__ = second
    second.__context__ = first
    assert [e["type"] for e in exception_list(first)] == ["ValueError", "KeyError"]


def test_a_long_chain_is_cut_at_ten_entries() -> None:
    exc: BaseException = ValueError(0)
    for i in range(1, 30):
        outer = ValueError(i)
        outer.__cause__ = exc
        exc = outer
    entries = exception_list(exc)
    assert [e["value"] for e in entries] == [str(i) for i in range(29, 19, -1)]


def test_deep_stacks_keep_the_entry_point_and_the_raise_site() -> None:
    def recurse(n: int) -> None:
        if n == 0:
            raise ValueError("deep")
        recurse(n - 1)

    [entry] = exception_list(_caught(lambda: recurse(300)))
    frames = entry["stacktrace"]["frames"]
    assert len(frames) == 100
    assert frames[0]["function"] == "_caught"
    assert _function_and_line(frames[-1]) == ("recurse", _line_of(recurse, "raise ValueError"))


def test_an_exception_never_raised_has_no_frames() -> None:
    [entry] = exception_list(ValueError("constructed"), mechanism="celery", handled=False)
    assert entry["stacktrace"]["frames"] == []
    assert entry["mechanism"] == {"type": "celery", "handled": False, "synthetic": False}


def test_an_unprintable_exception_is_still_described() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    [entry] = exception_list(Unprintable())
    assert entry["value"] == "<unprintable exception>"
    assert entry["type"].endswith("Unprintable")


def test_a_huge_message_is_truncated(captured: CapturedEvents) -> None:
    capture_exception(ValueError("m" * 10_000))
    props = _single_exception_event(captured)["properties"]
    assert len(props["$exception_message"]) == 2_000
    assert len(props["$exception_list"][0]["value"]) == 2_000
    assert sys.getsizeof(json.dumps(props)) < 10_000
