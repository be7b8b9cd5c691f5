"""Tier 1: the context header (``task_scopes.celery._header``) with plain values, no Celery."""

from __future__ import annotations

import base64
import json
import os
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from task_scopes.celery._header import (
    HEADER,
    Limits,
    WireContext,
    WireError,
    clean_tags,
    decode,
    decode_posthog,
    encode,
    sign,
)

LIMITS = Limits()


def _payload(header: str) -> dict[str, Any]:
    payload = json.loads(header)
    assert isinstance(payload, dict)
    return payload


def _tags(header: str) -> dict[str, Any]:
    tags = _payload(header).get("t", {})
    assert isinstance(tags, dict)
    return tags


# -- round trip and shape -----------------------------------------------------------------


def test_encode_then_decode_gives_back_distinct_id_session_and_tags() -> None:
    tags = {"plan": "pro", "seats": 3, "ratio": 0.5, "beta": True, "none": None, "l": [1, "a"]}
    header, dropped = encode("user-1", "sess-1", tags)
    assert dropped == []
    assert decode(header) == WireContext("user-1", "sess-1", tags)


def test_header_is_compact_json_with_version_and_absent_keys_omitted() -> None:
    header, _ = encode("user-1", None, {})
    assert header == '{"d":"user-1","v":1}'
    assert encode(None, None, {})[0] == '{"v":1}'
    assert HEADER == "task_scopes"


def test_window_id_travels_as_w_and_is_omitted_when_absent() -> None:
    header, dropped = encode("user-1", "sess-1", {}, window_id="win-1")
    assert dropped == []
    assert header == '{"d":"user-1","s":"sess-1","v":1,"w":"win-1"}'
    assert decode(header) == WireContext("user-1", "sess-1", {}, "win-1")
    assert "w" not in _payload(encode("user-1", "sess-1", {})[0])


def test_a_header_without_a_window_id_decodes_as_before() -> None:
    # What producers of earlier releases (and hand-written headers) send.
    context = decode('{"v":1,"d":"user-1","s":"sess-1","t":{"plan":"pro"}}')
    assert context == WireContext("user-1", "sess-1", {"plan": "pro"})
    assert context.window_id is None


def test_window_id_is_cleaned_and_refused_over_the_cap_like_the_other_ids() -> None:
    assert decode(encode(None, None, {}, window_id="wi\x00n\x1b-1")[0]).window_id == "win-1"
    header, dropped = encode("u", None, {}, window_id="w" * 5000)
    assert (decode(header).window_id, dropped) == (None, ["$window_id"])
    assert decode('{"v":1,"d":"u","w":"%s"}' % ("w" * 5000)) == WireContext("u", None, {})
    assert decode('{"v":1,"w":"\\u0000"}').window_id is None


def test_over_a_small_cap_the_window_id_is_left_out_before_the_session_id() -> None:
    header, dropped = encode("u" * 100, "s" * 100, {}, Limits(max_bytes=240), window_id="w" * 100)
    assert len(header.encode()) <= 240
    assert dropped == ["$window_id"]
    assert decode(header) == WireContext("u" * 100, "s" * 100, {})


def test_same_context_encodes_to_the_same_bytes_whatever_the_insertion_order() -> None:
    first = {"b": 2, "a": {"y": 1, "x": 2}, "c": {3, 1, 2}}
    second = {"c": {2, 3, 1}, "a": {"x": 2, "y": 1}, "b": 2}
    assert encode("u", "s", first)[0] == encode("u", "s", second)[0]


def test_non_ascii_text_travels_unescaped_and_intact() -> None:
    header, _ = encode("utilisateur-é", "séance", {"ville": "Zürich 東京 🚀"})
    assert "Zürich 東京 🚀" in header
    assert decode(header).tags == {"ville": "Zürich 東京 🚀"}


# -- JSON-safe coercion -------------------------------------------------------------------


def test_datetime_date_and_time_become_iso_8601() -> None:
    when = datetime(2024, 5, 17, 13, 45, 30, 123456, tzinfo=timezone(timedelta(hours=2)))
    header, dropped = encode(None, None, {"at": when, "day": date(2024, 5, 17), "t": time(8, 5)})
    assert dropped == []
    assert _tags(header) == {
        "at": "2024-05-17T13:45:30.123456+02:00",
        "day": "2024-05-17",
        "t": "08:05:00",
    }


def test_uuid_decimal_and_path_become_their_string_form() -> None:
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    header, _ = encode(
        None, None, {"id": ident, "price": Decimal("19.90"), "file": PurePosixPath("/a/b.csv")}
    )
    assert _tags(header) == {
        "id": "12345678-1234-5678-1234-567812345678",
        "price": "19.90",
        "file": "/a/b.csv",
    }


def test_sets_and_frozensets_become_sorted_lists() -> None:
    header, _ = encode(None, None, {"s": {"pear", "apple", "fig"}, "f": frozenset({3, 1, 2})})
    assert _tags(header) == {"s": ["apple", "fig", "pear"], "f": [1, 2, 3]}


def test_a_set_of_unorderable_items_still_encodes_deterministically() -> None:
    values = [1, "a", None, 2.5]
    first = encode(None, None, {"mixed": set(values)})[0]
    second = encode(None, None, {"mixed": set(reversed(values))})[0]
    assert first == second
    assert sorted(map(json.dumps, _tags(first)["mixed"])) == sorted(map(json.dumps, values))


def test_tuples_become_lists_in_their_own_order() -> None:
    assert _tags(encode(None, None, {"pair": (3, "b", 1)})[0]) == {"pair": [3, "b", 1]}


def test_enums_travel_as_their_value() -> None:
    class Plan(Enum):
        PRO = "pro"

    assert _tags(encode(None, None, {"plan": Plan.PRO})[0]) == {"plan": "pro"}


def test_bytes_are_dropped_and_named_by_default() -> None:
    header, dropped = encode("u", None, {"blob": b"\x00\x01", "ok": 1})
    assert dropped == ["blob"]
    assert _tags(header) == {"ok": 1}


def test_bytes_travel_as_base64_when_encode_bytes_is_set() -> None:
    header, dropped = encode(None, None, {"blob": b"\x00\xff"}, Limits(encode_bytes=True))
    assert dropped == []
    assert _tags(header) == {"blob": base64.b64encode(b"\x00\xff").decode()}


def test_unknown_objects_are_dropped_and_named_never_repr_noise() -> None:
    class Order:
        def __repr__(self) -> str:
            return "<Order secret-token>"

    header, dropped = encode("u", None, {"order": Order(), "nested": {"o": Order()}, "ok": 1})
    assert sorted(dropped) == ["nested", "order"]
    assert _tags(header) == {"ok": 1}
    assert "secret-token" not in header and "Order" not in header


def test_non_finite_floats_are_dropped() -> None:
    header, dropped = encode(None, None, {"nan": float("nan"), "inf": float("inf"), "x": 1.5})
    assert sorted(dropped) == ["inf", "nan"]
    assert _tags(header) == {"x": 1.5}


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_containers_nested_up_to_eight_deep_travel_deeper_are_dropped() -> None:
    header, dropped = encode(None, None, {"ok": _nested(8), "deep": _nested(9)})
    assert dropped == ["deep"]
    assert _tags(header) == {"ok": _nested(8)}


def test_values_inside_containers_are_coerced_too() -> None:
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    header, _ = encode(None, None, {"d": {"when": when, "ids": (uuid.UUID(int=1),)}})
    assert _tags(header) == {
        "d": {"when": "2024-01-02T03:04:05+00:00", "ids": [str(uuid.UUID(int=1))]}
    }


# -- caps ---------------------------------------------------------------------------------


def test_header_never_exceeds_max_bytes() -> None:
    tags = {f"k{i}": "v" * 900 for i in range(40)}
    header, dropped = encode("u", "s", tags)
    assert len(header.encode()) <= LIMITS.max_bytes
    assert dropped  # 40 x 900 bytes cannot fit in 8 KiB
    assert set(dropped) | set(_tags(header)) == set(tags)


def test_header_cap_counts_utf8_bytes_not_characters() -> None:
    # 4-byte characters: 1,000 of them are 4,000 bytes but only 1,000 characters.
    tags = {f"k{i}": "🚀" * 1000 for i in range(4)}
    header, dropped = encode("u", None, tags)
    assert len(header.encode("utf-8")) <= LIMITS.max_bytes
    assert len(_tags(header)) == 2 and len(dropped) == 2


@pytest.mark.parametrize("max_bytes", [256, 300, 1000, 4096])
def test_header_fits_configured_cap_with_multibyte_tags(max_bytes: int) -> None:
    tags = {f"k{i}": "é" * (10 * i) for i in range(60)}
    header, _ = encode("user", "sess", tags, Limits(max_bytes=max_bytes))
    assert len(header.encode()) <= max_bytes
    assert decode(header).distinct_id == "user"


def test_over_the_size_cap_the_largest_tags_are_dropped_first_and_named() -> None:
    tags = {"small": "s", "medium": "m" * 2000, "large": "l" * 7000, "huge": "h" * 9000}
    limits = Limits(max_bytes=3000, max_value_chars=10_000)
    header, dropped = encode("u", None, tags, limits)
    assert dropped == ["huge", "large"]
    assert _tags(header) == {"small": "s", "medium": "m" * 2000}


def test_at_most_64_tags_travel_the_largest_are_dropped() -> None:
    tags = {f"tag{i:03d}": "x" * i for i in range(100)}
    header, dropped = encode(None, None, tags)
    kept = _tags(header)
    assert len(kept) == 64
    assert sorted(dropped) == [f"tag{i:03d}" for i in range(64, 100)]
    assert sorted(kept) == [f"tag{i:03d}" for i in range(64)]


def test_keys_over_200_characters_are_dropped_and_named() -> None:
    long_key = "k" * 201
    header, dropped = encode(None, None, {long_key: 1, "k" * 200: 2})
    assert _tags(header) == {"k" * 200: 2}
    assert len(dropped) == 1 and dropped[0].startswith("k" * 50)
    assert long_key not in header


def test_a_string_tag_over_1000_characters_is_dropped_and_named_nested_strings_are_cut() -> None:
    tags = {"s": "a" * 5000, "ok": "a" * 1000, "l": ["b" * 1500], "d": {"x": "c" * 1001}}
    header, dropped = encode(None, None, tags)
    assert dropped == ["s"]
    assert _tags(header) == {"ok": "a" * 1000, "l": ["b" * 1000], "d": {"x": "c" * 1000}}


def test_control_characters_are_stripped_from_keys_values_and_ids() -> None:
    header, _ = encode(
        "us\x00er\n-1",
        "se\x1bss\x7f",
        {"pl\ran": "p\x00r\to\x85", "list": ["a\x9fb"], "ok": "tab-free"},
    )
    assert decode(header) == WireContext(
        "user-1", "sess", {"plan": "pro", "list": ["ab"], "ok": "tab-free"}
    )
    assert not any(ch in header for ch in "\x00\n\r\t\x1b\x7f\x85\x9f")


def test_ids_over_the_string_cap_are_left_out_and_named_never_cut() -> None:
    header, dropped = encode("u" * 5000, "s" * 1001, {"plan": "pro"})
    assert _payload(header) == {"v": 1, "t": {"plan": "pro"}}
    assert sorted(dropped) == ["$distinct_id", "$session_id"]
    # at the cap exactly, the ID travels whole
    assert decode(encode("u" * 1000, None, {})[0]).distinct_id == "u" * 1000


@pytest.mark.parametrize("field", ["d", "s"])
def test_a_received_id_over_the_cap_is_refused_and_the_rest_of_the_context_kept(
    field: str,
) -> None:
    payload: dict[str, Any] = {"v": 1, "d": "user-1", "s": "session-1", "t": {"plan": "pro"}}
    payload[field] = "x" * 100_000
    context = decode(json.dumps(payload))
    expected = {"d": "user-1", "s": "session-1"}
    expected[field] = None  # type: ignore[assignment]
    assert context == WireContext(expected["d"], expected["s"], {"plan": "pro"})


def test_a_received_posthog_distinct_id_over_the_cap_is_refused_too() -> None:
    context = decode_posthog("x" * 1001, "session-1", '{"plan":"pro"}')
    assert context == WireContext(None, "session-1", {"plan": "pro"})


def test_long_ids_never_push_the_header_over_a_small_cap() -> None:
    header, _ = encode("u" * 1000, "s" * 1000, {}, Limits(max_bytes=256))
    assert len(header.encode()) <= 256


@settings(max_examples=200, deadline=None)
@given(
    tags=st.dictionaries(
        st.text(max_size=250),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(),
            st.text(max_size=3000),
            st.binary(max_size=50),
            st.lists(st.text(max_size=50), max_size=5),
            st.datetimes(),
        ),
        max_size=120,
    ),
    max_bytes=st.integers(min_value=2048, max_value=16384),
)
def test_encode_never_raises_and_always_fits_the_caps(tags: dict[str, Any], max_bytes: int) -> None:
    limits = Limits(max_bytes=max_bytes)
    header, dropped = encode("user-1", "session-1", tags, limits)
    assert len(header.encode()) <= max_bytes
    decoded = decode(header, limits=limits)
    assert decoded.distinct_id == "user-1"
    assert decoded.tags is not None and len(decoded.tags) <= limits.max_tags
    assert all(isinstance(name, str) for name in dropped)


# -- keys that never propagate -----------------------------------------------------------


def test_celery_and_dollar_keys_are_not_propagated_nor_reported_dropped() -> None:
    tags = {"celery_task_id": "t1", "celery_queue": "q", "$set": {"a": 1}, "$lib": "x", "ok": 1}
    header, dropped = encode("u", None, tags)
    assert _tags(header) == {"ok": 1}
    assert dropped == []


def test_celery_and_dollar_keys_in_a_received_header_are_ignored() -> None:
    header = json.dumps({"v": 1, "t": {"celery_task_id": "forged", "$set": {"a": 1}, "ok": 1}})
    assert decode(header).tags == {"ok": 1}


def test_celery_and_dollar_keys_hidden_behind_control_characters_are_not_propagated() -> None:
    header, _ = encode(None, None, {"\x00celery_task_id": "forged", "\x1b$set": 1, "ok": 1})
    assert _tags(header) == {"ok": 1}


# -- strings Python holds but UTF-8 cannot carry -------------------------------------------


def test_a_tag_holding_an_undecodable_file_name_is_dropped_not_fatal() -> None:
    # os.fsdecode() of a non-UTF-8 file name gives lone surrogates (surrogateescape).
    path = Path(os.fsdecode(b"report-\xff.csv"))
    header, _ = encode("user-1", None, {"file": path, "ok": 1})
    assert decode(header).distinct_id == "user-1"
    header.encode("utf-8")


def test_decoded_context_is_always_utf8_encodable() -> None:
    context = decode('{"v":1,"d":"user-\\ud800","t":{"k\\udfff":"v\\ud800"}}')
    json.dumps([context.distinct_id, context.tags], ensure_ascii=False).encode("utf-8")


def test_a_tag_json_cannot_write_is_dropped_and_named_not_fatal() -> None:
    header, dropped = encode("user-1", None, {"checksum": 10**5000, "ok": 1})
    assert dropped == ["checksum"]
    assert decode(header) == WireContext("user-1", None, {"ok": 1})


# -- signatures ----------------------------------------------------------------------------


def test_signature_is_hex_hmac_sha256_of_the_exact_header() -> None:
    import hashlib
    import hmac

    header, _ = encode("u", None, {"a": 1})
    expected = hmac.new(b"k3y", header.encode(), hashlib.sha256).hexdigest()
    assert sign(header, "k3y") == expected


def test_signed_header_decodes_with_the_secret() -> None:
    header, _ = encode("u", "s", {"a": 1})
    assert decode(header, sign(header, "k3y"), "k3y") == WireContext("u", "s", {"a": 1})


@pytest.mark.parametrize(
    "signature",
    [None, "", "0" * 64, "not-hex", 12345, b"bytes"],
    ids=["missing", "empty", "zeros", "not-hex", "int", "bytes"],
)
def test_missing_or_forged_signature_is_refused_when_a_secret_is_set(signature: Any) -> None:
    header, _ = encode("u", None, {})
    with pytest.raises(WireError):
        decode(header, signature, "k3y")


def test_signature_made_with_another_secret_is_refused() -> None:
    header, _ = encode("u", None, {})
    with pytest.raises(WireError, match="signature"):
        decode(header, sign(header, "other"), "k3y")


def test_signature_of_another_header_is_refused() -> None:
    genuine, _ = encode("u", None, {})
    forged, _ = encode("admin", None, {})
    with pytest.raises(WireError):
        decode(forged, sign(genuine, "k3y"), "k3y")


def test_non_ascii_forged_signature_is_refused_with_wire_error() -> None:
    header, _ = encode("u", None, {})
    with pytest.raises(WireError):
        decode(header, "é" * 64, "k3y")


def test_header_with_a_lone_surrogate_is_refused_with_wire_error_when_signed() -> None:
    with pytest.raises(WireError):
        decode('{"v":1,"d":"\ud800"}', "0" * 64, "k3y")


def test_signature_is_ignored_without_a_secret() -> None:
    header, _ = encode("u", None, {})
    assert decode(header, "anything").distinct_id == "u"


# -- untrusted input -----------------------------------------------------------------------

GARBAGE = {
    "not-json": "{not json",
    "empty": "",
    "json-array": "[1, 2]",
    "json-string": '"text"',
    "json-null": "null",
    "no-version": '{"d": "u"}',
    "version-2": '{"v": 2, "d": "u"}',
    "version-string": '{"v": "1", "d": "u"}',
    "distinct-id-int": '{"v": 1, "d": 5}',
    "distinct-id-list": '{"v": 1, "d": ["u"]}',
    "session-id-object": '{"v": 1, "s": {"a": 1}}',
    "window-id-int": '{"v": 1, "w": 5}',
    "tags-list": '{"v": 1, "t": ["a"]}',
    "tags-string": '{"v": 1, "t": "a=1"}',
    "huge": '{"v": 1, "d": "' + "u" * (300 * 1024) + '"}',
    "deep": "[" * 100_000 + "]" * 100_000,
    "bytes-not-utf8": b"\xff\xfe{",
    "int": 42,
    "none": None,
    "dict": {"v": 1, "d": "u"},
    "list": ["v", 1],
}


@pytest.mark.parametrize("header", list(GARBAGE.values()), ids=list(GARBAGE))
def test_decode_of_garbage_raises_wire_error_only(header: Any) -> None:
    with pytest.raises(WireError):
        decode(header)


def test_decode_accepts_utf8_bytes() -> None:
    assert decode(b'{"v":1,"d":"u"}').distinct_id == "u"


def test_decode_drops_unusable_tag_values_instead_of_failing() -> None:
    header = '{"v":1,"d":"u","t":{"ok":1,"nan":NaN,"deep":' + json.dumps(_nested(20)) + "}}"
    assert decode(header) == WireContext("u", None, {"ok": 1})


def test_decode_applies_the_caps_to_what_it_receives() -> None:
    tags: dict[str, Any] = {"too_long": "v" * 2000}
    tags.update({f"k{i}": "v" * 500 for i in range(100)})
    tags["k" * 300] = 1
    tags["ctl\x00"] = "a\x07b"
    context = decode(json.dumps({"v": 1, "d": "u\x00" + "x" * 2000, "t": tags}))
    assert context.tags is not None
    assert len(context.tags) == 64
    assert "too_long" not in context.tags
    assert all(len(v) <= 1000 for v in context.tags.values() if isinstance(v, str))
    assert "k" * 300 not in context.tags
    assert context.distinct_id is None  # over the cap: refused, never cut


def test_decoded_tags_keep_every_key_when_under_the_caps() -> None:
    header = json.dumps({"v": 1, "t": {"a": 1, "b": [1, 2], "c": {"d": None}}})
    assert decode(header).tags == {"a": 1, "b": [1, 2], "c": {"d": None}}


# -- PostHog's X-POSTHOG-* headers ---------------------------------------------------------


def test_posthog_headers_decode_to_a_context() -> None:
    context = decode_posthog("user-1", "sess-1", '{"plan":"pro","n":2}')
    assert context == WireContext("user-1", "sess-1", {"plan": "pro", "n": 2})


def test_posthog_tags_may_be_bytes() -> None:
    assert decode_posthog(None, None, b'{"a":1}').tags == {"a": 1}


def test_posthog_headers_all_absent_give_an_empty_context() -> None:
    assert decode_posthog(None, None, None) == WireContext(None, None, {})


def test_posthog_headers_are_cleaned_like_ours() -> None:
    context = decode_posthog("u\x00", "s", json.dumps({"celery_x": 1, "$set": 2, "a\n": "b"}))
    assert context == WireContext("u", "s", {"a": "b"})


@pytest.mark.parametrize(
    ("distinct_id", "session_id", "tags"),
    [
        (5, None, None),
        (None, ["s"], None),
        (None, None, "{not json"),
        (None, None, "[1]"),
        (None, None, 7),
        (None, None, "x" * (300 * 1024)),
        (None, None, b"\xff"),
    ],
    ids=["id-int", "session-list", "tags-not-json", "tags-array", "tags-int", "huge", "bad-utf8"],
)
def test_posthog_garbage_raises_wire_error_only(
    distinct_id: Any, session_id: Any, tags: Any
) -> None:
    with pytest.raises(WireError):
        decode_posthog(distinct_id, session_id, tags)


# -- clean_tags ---------------------------------------------------------------------------


def test_clean_tags_names_non_string_keys_as_dropped() -> None:
    clean, dropped = clean_tags({1: "a", "ok": "b"})  # type: ignore[dict-item]
    assert clean == {"ok": "b"}
    assert dropped == ["1"]
