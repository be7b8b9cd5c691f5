"""The event JSON capture() queues: the fast writer for events build() made gives exactly
the string the general encoder gives, for any properties; and an interpreter without
json's C accelerator gets the same string from the pure-Python encoder.

Also the pieces each event is stamped with: UUIDv7 and the ISO 8601 timestamp, both from
one clock reading.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import task_scopes
from task_scopes import _event

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Level(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


@dataclasses.dataclass
class Point:
    x: int
    y: float


# Values of every kind the fast writer treats apart: the scalars it keeps in its memo
# (str, int, bool, None), their subclasses and floats (written by the C encoder one by
# one), containers, objects event_default converts, and the values that make the whole
# event fail (non-finite floats, unwritable keys) so freeze() takes its cleaning path.
scalars = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([Level.HIGH, Name("n"), Decimal("1.5"), Point(1, 2.5), uuid.UUID(int=7)]),
    st.sampled_from(["x" * 300, 'é\u2028"\\\n\x00', "\ud800"]),  # long, escapes, surrogate
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.one_of(st.text(max_size=12), st.sampled_from([1, None, True, 2.5, ("t",)]))


def _outcome(encode: Any, message: dict[str, Any]) -> str:
    try:
        return str(encode(message))
    except (ValueError, TypeError, RecursionError) as exc:  # what freeze() catches
        return f"raised {type(exc).__name__}"


@settings(max_examples=400, deadline=None)
@given(props=st.dictionaries(keys, values, max_size=8), name=st.text(min_size=1, max_size=8))
def test_the_fast_writer_gives_the_general_encoders_string_for_any_properties(
    props: dict[Any, Any], name: str
) -> None:
    message = {
        "event": name,
        "distinct_id": 'user-\u00e9"1',
        "properties": props,
        "timestamp": "2026-12-02T01:03:29.302372+00:00",
        "uuid": _event.uuid7(),
    }
    want = _outcome(_event._encode, message)
    assert _outcome(_event._encode_built, message) == want
    assert _outcome(_event._encode_built, message) == want  # again, from the memo


def test_the_memo_of_written_properties_stays_bounded_and_right_after_it_is_emptied() -> None:
    _event._pairs.clear()
    for i in range(_event._MAX_PAIRS * 3):
        message = {
            "event": "e",
            "distinct_id": "d",
            "properties": {"i": i, "plan": "pro"},
            "timestamp": "t",
            "uuid": _event.uuid7(),
        }
        assert _event._encode_built(message) == _event._encode(message)
        assert len(_event._pairs) <= _event._MAX_PAIRS


def test_a_long_value_is_written_but_not_kept() -> None:
    _event._pairs.clear()
    message = {
        "event": "e",
        "distinct_id": "d",
        "properties": {"long": "x" * 500},
        "timestamp": "t",
        "uuid": _event.uuid7(),
    }
    assert json.loads(_event._encode_built(message))["properties"]["long"] == "x" * 500
    assert _event._pairs == {}


def test_without_the_c_accelerator_events_are_written_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with task_scopes.new_context():
        task_scopes.tag("plan", "pro")
        message = _event.build("order", "user-1", {"n": 1.5, "p": Point(1, 2.5)}, None, None)
    with_c = _event.freeze(message, check_fields=False)
    monkeypatch.setattr(_event, "_c_encode", None)
    assert _event.freeze(message, check_fields=False) == with_c
    assert _event.freeze(message) == with_c
    bad = dict(message, properties={"nan": float("nan"), "loop": []})
    bad["properties"]["loop"].append(bad["properties"]["loop"])
    with pytest.raises(_event.Refused, match="circular"):
        _event.freeze(bad, check_fields=False)
    nan_only = dict(message, properties={"nan": float("nan")})
    assert json.loads(_event.freeze(nan_only, check_fields=False))["properties"] == {"nan": None}


def test_uuid7_is_a_version_7_rfc_9562_uuid_of_the_given_millisecond() -> None:
    now_ns = 1_733_100_000_123_456_789
    seen = set()
    for _ in range(2000):
        text = _event.uuid7(now_ns)
        value = uuid.UUID(text)
        assert str(value) == text  # canonical: lower case, 8-4-4-4-12
        assert value.version == 7 and value.variant == uuid.RFC_4122
        assert value.int >> 80 == now_ns // 1_000_000
        seen.add(text)
    assert len(seen) == 2000
    later = uuid.UUID(_event.uuid7(now_ns + 1_000_000))
    assert later.int >> 80 == now_ns // 1_000_000 + 1  # the cached prefix moves on


@pytest.mark.parametrize(
    "now_ns",
    [0, 1_733_100_000_000_001_000, 1_733_100_000_999_999_999, 1_733_100_001_000_000_000],
)
def test_now_iso_is_what_datetime_isoformat_gives(now_ns: int) -> None:
    moment = datetime.fromtimestamp(now_ns // 1000 / 1e6, timezone.utc)
    moment = moment.replace(microsecond=now_ns // 1000 % 1_000_000)
    assert _event.now_iso(now_ns) == moment.isoformat(timespec="microseconds")


def test_an_events_uuid_and_timestamp_come_from_one_clock_reading() -> None:
    for _ in range(200):
        message = _event.build("e", "d", None, None, None)
        ms = uuid.UUID(message["uuid"]).int >> 80
        stamped = datetime.fromisoformat(message["timestamp"])
        assert ms == (stamped - EPOCH) // timedelta(milliseconds=1)
