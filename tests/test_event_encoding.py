"""The event JSON capture() queues: orjson (where installed) writes the same JSON values
as the stdlib encoder for any properties, leaving to it what it would write its own way;
and an interpreter without json's C accelerator gets the same string from the
pure-Python encoder.

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


# Values of every kind the two writers could treat apart: scalars, ints past 64 bits,
# subclasses, floats, containers, objects event_default converts, and the values that
# make the stdlib encoder fail (non-finite floats, unwritable keys) so freeze() takes its
# cleaning path.
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


def _outcome(message: dict[str, Any]) -> Any:
    """What freeze() makes of ``message``: the JSON value it wrote, or the refusal."""
    try:
        return json.loads(_event.freeze(message, check_fields=False))
    except _event.Refused as refused:
        return f"refused: {refused.kind}"


def _message(props: dict[Any, Any], name: str = "e") -> dict[str, Any]:
    return {
        "event": name,
        "distinct_id": 'user-\u00e9"1',
        "properties": props,
        "timestamp": "2026-12-02T01:03:29.302372+00:00",
        "uuid": _event.uuid7(),
    }


@settings(max_examples=400, deadline=None)
@given(props=st.dictionaries(keys, values, max_size=8), name=st.text(min_size=1, max_size=8))
def test_orjson_and_the_stdlib_encoder_give_the_same_event_for_any_properties(
    props: dict[Any, Any], name: str
) -> None:
    message = _message(props, name)
    fast = _outcome(message)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_event, "_fast_dumps", None)
        assert _outcome(message) == fast


def test_what_orjson_would_write_its_own_way_is_converted_as_everywhere_else() -> None:
    # orjson has its own forms for datetimes, dataclasses and subclasses of str, int, dict
    # and list; they are passed through to the stdlib path, which converts them as the
    # README's table says: the same string either way.
    class Mapping(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            return [("overridden", 1)]

    props = {
        "when": datetime(2026, 12, 2, 7, 3, tzinfo=timezone(timedelta(hours=2))),
        "naive": datetime(2026, 12, 2, 7, 3, 0, 5),
        "point": Point(1, 2.5),
        "name": Name("n"),
        "level": Level.HIGH,
        "mapping": Mapping(a=1),
        "id": uuid.UUID(int=7),
        "big": 2**64,
    }
    message = _message(props)
    fast = _event.freeze(message, check_fields=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_event, "_fast_dumps", None)
        assert _event.freeze(message, check_fields=False) == fast
    assert json.loads(fast)["properties"]["when"] == "2026-12-02T07:03:00+02:00"


def test_orjson_writes_a_plain_event(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast path is taken (not silently always the fallback), and its JSON is the
    # stdlib's value for value.
    calls: list[Any] = []
    dumps = _event._fast_dumps

    def counting(message: Any, **options: Any) -> Any:
        calls.append(message)
        return dumps(message, **options)

    monkeypatch.setattr(_event, "_fast_dumps", counting)
    message = _message({"plan": "pro", "n": 3, "ratio": 0.5, "on": True, "x": None})
    item = _event.freeze(message, check_fields=False)
    assert calls == [message]
    assert json.loads(item) == json.loads(_event._encode(message))


def test_without_the_c_accelerator_events_are_written_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with task_scopes.new_context():
        task_scopes.tag("plan", "pro")
        message = _event.build("order", "user-1", {"n": 1.5, "p": Point(1, 2.5)}, None, None)
    with_c = _event.freeze(message, check_fields=False)
    monkeypatch.setattr(_event, "_fast_dumps", None)
    assert _event.freeze(message, check_fields=False) == with_c
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
