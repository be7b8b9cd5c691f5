"""Tier 1: the memoized header on the hot paths (``task_scopes.celery._memo``)."""

from __future__ import annotations

import json

import pytest

from task_scopes._scope import MergedContext
from task_scopes.celery import _memo
from task_scopes.celery._header import Limits, WireError, decode, sign

LIMITS = Limits()


def _context(**tags: object) -> MergedContext:
    return MergedContext("user-1", "sess-1", dict(tags), "win-1", {"company": "acme"})


def _header(context: MergedContext, limits: Limits, published_ms: int) -> tuple[str, list[str]]:
    """``(header, dropped)`` as the publish path makes them for ``context``: the rest from
    the memo keyed by content, the publish time in front."""
    rest, dropped, _ = _memo._rest(context, limits)
    return _memo.with_publish_time(rest, published_ms), list(dropped)


def test_the_publish_time_leads_and_the_rest_is_what_encode_gives() -> None:
    header, dropped = _header(_context(plan="pro"), LIMITS, 1_700_000_000_123)
    assert header.startswith('{"p":1700000000123,')
    assert dropped == []
    assert json.loads(header) == {
        "v": 1,
        "p": 1_700_000_000_123,
        "d": "user-1",
        "s": "sess-1",
        "w": "win-1",
        "t": {"plan": "pro"},
        "g": {"company": "acme"},
    }


def test_a_changed_context_is_encoded_anew() -> None:
    first, _ = _header(_context(plan="pro"), LIMITS, 1)
    second, _ = _header(_context(plan="free"), LIMITS, 2)
    assert json.loads(first)["t"] == {"plan": "pro"}
    assert json.loads(second)["t"] == {"plan": "free"}


def test_unhashable_tag_values_are_encoded_every_time() -> None:
    items = ["mug"]
    first, _ = _header(_context(cart=items), LIMITS, 1)
    items.append("tshirt")
    second, _ = _header(_context(cart=items), LIMITS, 2)
    assert json.loads(first)["t"]["cart"] == ["mug"]
    assert json.loads(second)["t"]["cart"] == ["mug", "tshirt"]


def test_the_cap_holds_with_the_publish_time_in_front() -> None:
    limits = Limits(max_bytes=300)
    header, dropped = _header(
        _context(**{f"k{i}": "x" * 40 for i in range(10)}), limits, 1_700_000_000_123
    )
    assert len(header.encode()) <= 300
    assert dropped


def test_each_header_decodes_with_its_own_publish_time() -> None:
    a, _ = _header(_context(plan="pro"), LIMITS, 1_000)
    b, _ = _header(_context(plan="pro"), LIMITS, 2_000)
    assert _memo.decode_header(a, None, None, LIMITS).published_ms == 1_000
    assert _memo.decode_header(b, None, None, LIMITS) == decode(b)
    assert decode(b).published_ms == 2_000


def test_a_memoized_header_is_still_checked_against_its_signature() -> None:
    header, _ = _header(_context(plan="pro"), LIMITS, 1_000)
    assert _memo.decode_header(header, sign(header, "k3y"), "k3y", LIMITS).distinct_id == "user-1"
    forged = header.replace('"p":1000', '"p":9000', 1)  # the rest is in the memo now
    with pytest.raises(WireError, match="signature"):
        _memo.decode_header(forged, sign(header, "k3y"), "k3y", LIMITS)


@pytest.mark.parametrize(
    "header",
    ['{"p":12x,"v":1}', '{"p":"1","v":1}', '{"p":1', '{"p":\u00b2,"v":1}', '{"p":1,"v":2}'],
)
def test_malformed_leading_publish_times_are_refused_as_decode_refuses_them(
    header: str,
) -> None:
    with pytest.raises(WireError):
        _memo.decode_header(header, None, None, LIMITS)


def test_equal_values_of_other_types_are_not_taken_from_the_memo() -> None:
    as_bool, _ = _header(_context(x=True), LIMITS, 1)
    as_float, _ = _header(_context(x=1.0), LIMITS, 1)
    as_int, _ = _header(_context(x=1), LIMITS, 1)
    assert [json.loads(h)["t"]["x"] for h in (as_bool, as_float, as_int)] == [True, 1.0, 1]
    assert [type(json.loads(h)["t"]["x"]) for h in (as_bool, as_float, as_int)] == [
        bool,
        float,
        int,
    ]


def test_keys_that_never_travel_do_not_defeat_the_memo() -> None:
    first = _memo._key(_context(plan="pro", celery_task_id="a"), LIMITS)
    second = _memo._key(_context(plan="pro", celery_task_id="b"), LIMITS)
    assert first is not None and first == second
