"""Random events into capture(), sent to a collector as strict as PostHog's capture
endpoint: every event either arrives exactly as it was at capture() (after the documented
conversions) or was refused at capture() with None returned; no valid event is lost.

Hypothesis generates event names (None, "", non-strings, text with control characters and
lone surrogates), distinct IDs (None, empty, whitespace, ints, UUIDs, wrong types, long
text), UUIDs in every form PostHog parses and malformed ones, and properties and tags of
random JSON-like values with non-finite floats, big ints, tuples, sets, dataclasses, keys
that are not strings, nesting up to 140 levels, strings near the 900 KiB limit and
circular references; after capture() the properties and tag values are mutated.

What must arrive is computed by :func:`expect`, which follows the conversion table in the
README (the spec), not the client's code; what must be refused by :func:`refusal`.

Examples: half of ``TASK_SCOPES_FUZZ_EXAMPLES`` (default 2,000, so 1,000), each up to six
events and one flush to the collector.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import task_scopes
from task_scopes import Client, __version__
from task_scopes.testing import CaptureServer

# half the header fuzz's count: an example here is up to six events and a flush
EXAMPLES = max(100, int(os.environ.get("TASK_SCOPES_FUZZ_EXAMPLES", "2000")) // 2)
TIMESTAMP = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

# -- the spec, as an oracle ---------------------------------------------------------------------

MAX_EVENT_BYTES = 900 * 1024  # of the event's JSON
MAX_NESTING = 125  # arrays/objects in the event's JSON, the event itself included
SIZE_BAND = 8 * 1024  # near the limit either outcome is accepted (see expect_size)
SURROGATE = re.compile("[\ud800-\udfff]")
# Rust's char::is_whitespace: PostHog refuses a distinct ID made only of these
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
PERSONLESS = object()


@dataclasses.dataclass
class Point:
    x: Any
    y: Any


def _text(value: str) -> str:
    return SURROGATE.sub("\ufffd", value)


def expect(value: Any) -> Any:
    """``value`` as it must arrive: the README's table for the types generated here."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, (list, tuple)):
        return [expect(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [expect(v) for v in sorted(value)]
    if isinstance(value, Point):
        return {"x": expect(value.x), "y": expect(value.y)}
    if isinstance(value, (dict, types.MappingProxyType)):
        out = {}
        for key, item in value.items():
            if isinstance(key, str):
                out[_text(key)] = expect(item)
            elif isinstance(key, int) and not isinstance(key, bool):
                out[str(key)] = expect(item)
            # other keys (tuples) are dropped
        return out
    raise AssertionError(f"no rule for {type(value)}")


def depth(value: Any) -> int:
    """Arrays/objects nested in ``value``'s JSON (dropped keys' values left out)."""
    if isinstance(value, (dict, types.MappingProxyType)):
        kept = [v for k, v in value.items() if isinstance(k, (str, int))]
        return 1 + max(map(depth, kept), default=0)
    if isinstance(value, Point):
        return 1 + max(depth(value.x), depth(value.y))
    if isinstance(value, (list, tuple, set, frozenset)):
        return 1 + max(map(depth, value), default=0)
    return 0


def has_cycle(value: Any, active: frozenset[int] = frozenset()) -> bool:
    if isinstance(value, (dict, list)):
        if id(value) in active:
            return True
        inner = active | {id(value)}
        items = value.values() if isinstance(value, dict) else value
        return any(has_cycle(v, inner) for v in items)
    return False


@dataclasses.dataclass
class Case:
    """One capture() call and what it must lead to."""

    name: Any
    distinct_id: Any
    uuid_in: Any
    properties: Any
    context_id: Any
    tags: dict[Any, Any]
    session: str | None


def refusal(case: Case) -> str | None:
    """Why capture() must refuse ``case`` (before looking at size and nesting), or None."""
    if not isinstance(case.name, str) or not case.name:
        return "name"
    for candidate in (case.distinct_id, case.context_id):
        if candidate is not None and (
            isinstance(candidate, bool) or not isinstance(candidate, (str, int, uuid.UUID))
        ):
            return "distinct_id"
        if candidate is not None and (
            not isinstance(candidate, str) or candidate.strip(WHITE_SPACE)
        ):
            break  # this one is used
    if case.uuid_in not in (None, "") and not _uuid_ok(case.uuid_in):
        return "uuid"
    if case.properties is not None and not isinstance(
        case.properties, (dict, types.MappingProxyType)
    ):
        return "properties"
    if has_cycle(case.properties):
        return "circular"
    cookieless = (case.properties or {}).get("$cookieless_mode", False)
    if not isinstance(cookieless, bool):
        return "cookieless"
    return None


def _uuid_ok(value: Any) -> bool:
    if isinstance(value, uuid.UUID):
        return True
    forms = (
        r"(urn:uuid:)?[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}",
        r"\{[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\}",
        r"[0-9a-fA-F]{32}",
    )
    return isinstance(value, str) and any(re.fullmatch(f, value) for f in forms)


def expected_event(case: Case) -> dict[str, Any]:
    """The event as it must arrive (``distinct_id`` :data:`PERSONLESS` when made up)."""
    resolved = case.distinct_id
    if resolved is None or (isinstance(resolved, str) and not resolved.strip(WHITE_SPACE)):
        resolved = case.context_id  # a blank distinct_id falls back to the context's
    if isinstance(resolved, str) and not resolved.strip(WHITE_SPACE):
        resolved = None
    props = expect(dict(task_scopes.get_global_scope().tags))
    props.update(expect(case.tags))
    props.update(expect(case.properties or {}))
    if case.session is not None and "$session_id" not in props:
        props["$session_id"] = _text(case.session)
    if resolved is None:
        props.setdefault("$process_person_profile", False)
    props["$lib"] = "task_scopes"
    props["$lib_version"] = __version__
    return {
        "event": _text(case.name),
        "distinct_id": PERSONLESS if resolved is None else _text(str(resolved)),
        "properties": props,
        "timestamp": TIMESTAMP.isoformat(),
    }


def expect_size(expected: dict[str, Any]) -> int:
    """Bytes of the expected event's JSON, to within a little (a made-up distinct ID and
    the uuid are stand-ins of the same length)."""
    sized = dict(expected, uuid=str(uuid.uuid4()))
    if sized["distinct_id"] is PERSONLESS:
        sized["distinct_id"] = str(uuid.uuid4())
    return len(json.dumps(sized, separators=(",", ":"), ensure_ascii=False).encode())


def nesting_of(case: Case) -> int:
    """Nesting of the event's JSON: the event object, properties, then the values."""
    kept = {**{k: v for k, v in case.tags.items() if isinstance(k, str)}, **(case.properties or {})}
    return 2 + max(map(depth, kept.values()), default=0)


def mutate(value: Any, level: int = 0) -> None:
    """Change ``value`` in place after capture(): appended items, new and changed keys."""
    if level > 3:
        return
    if isinstance(value, list):
        for item in value:
            mutate(item, level + 1)
        value.append("mutated")
    elif isinstance(value, dict):
        for key in list(value):
            mutate(value[key], level + 1)
        value["mutated after capture"] = True
    elif isinstance(value, Point):
        value.x = "mutated"


# -- strategies ------------------------------------------------------------------------------

NASTY = '\x00\x01\x1b\x1f\x7f\x80\x85\x9f\ud800\udbff\udc00\udfff\u2028\ufeff\xa0 "\\{}'
chars = st.one_of(st.characters(exclude_categories=()), st.sampled_from(NASTY))
short_text = st.text(chars, max_size=12)
floats = st.floats(allow_nan=True, allow_infinity=True)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**1000), 2**1000),  # 309 digits and more: see the README's known gap
    floats,
    short_text,
)
keys = st.one_of(short_text, short_text, short_text, st.integers(-5, 5), st.tuples(st.integers()))
# Top-level keys: str, or a tuple the event drops. (An int tag key 1 and a property "1"
# would both be written as "1", and which one a JSON reader keeps depends on their order.)
tag_keys = st.one_of(short_text, short_text, st.tuples(st.integers()))


def _nest(levels: int, leaf: Any, as_dict: bool) -> Any:
    for _ in range(levels):
        leaf = {"k": leaf} if as_dict else [leaf]
    return leaf


json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
        st.builds(Point, inner, inner),
        st.frozensets(st.integers(-9, 9), max_size=4),
        st.sets(short_text, max_size=3),
    ),
    max_leaves=12,
)
values = st.one_of(
    json_like, json_like, json_like, st.builds(_nest, st.integers(100, 140), scalars, st.booleans())
)
property_dicts = st.dictionaries(short_text, values, max_size=6)


@st.composite
def properties(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["dict"] * 12 + ["none", "proxy", "huge", "loop", "bad", "cookie"]))
    if kind == "none":
        return None
    props = draw(property_dicts)
    if kind == "proxy":
        return types.MappingProxyType(props)
    if kind == "huge":  # around the 900 KiB limit
        props["huge"] = "h" * draw(st.integers(880 * 1024, 940 * 1024))
    elif kind == "loop":
        loop: dict[str, Any] = {}
        loop["self"] = loop
        props["loop"] = loop
    elif kind == "bad":
        return draw(st.sampled_from(["abc", 7, ["a"]]))
    elif kind == "cookie":
        props["$cookieless_mode"] = draw(st.sampled_from([True, False, "yes", 1, None]))
    return props


name_text = st.text(chars, min_size=1, max_size=12)
names = st.one_of(name_text, name_text, name_text, st.sampled_from([None, "", 123, b"x"]))
ids = st.one_of(
    st.none(),
    short_text,
    st.sampled_from(["", " ", "\t\u3000", "\x1c", "\x00", "d" * 300]),
    st.integers(-(2**70), 2**70),
    st.just(uuid.UUID(int=7)),
    st.sampled_from([[1], 1.5, True, {"id": 1}]),
)
uuid_forms = st.sampled_from(["none", "none", "plain", "upper", "hex", "braced", "urn", "", "bad"])


def _uuid_in(form: str) -> Any:
    fresh = uuid.uuid4()  # never drawn: the collector dedupes UUIDs across examples
    return {
        "none": None,
        "plain": str(fresh),
        "upper": str(fresh).upper(),
        "hex": fresh.hex,
        "braced": "{" + str(fresh) + "}",
        "urn": fresh.urn,
        "": "",
        "bad": str(fresh)[:-1] + "g",
    }[form]


cases = st.builds(
    lambda name, did, form, props, ctx, tags, session: Case(
        name, did, _uuid_in(form), props, ctx, tags, session
    ),
    names,
    ids,
    uuid_forms,
    properties(),
    st.one_of(st.none(), short_text, st.sampled_from(["", "ctx-user"])),
    st.dictionaries(tag_keys, values, max_size=3),
    st.one_of(st.none(), short_text),
)


# -- the test ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collector() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


@pytest.fixture(scope="module")
def client(collector: CaptureServer) -> Iterator[Client]:
    client = Client("phc_fuzz", collector.url, flush_interval=300, flush_at=1000)
    yield client
    client.shutdown(timeout=10)


def _capture(client: Client, case: Case) -> str | None:
    with task_scopes.new_context(fresh=True) as scope:
        if case.context_id is not None:
            task_scopes.identify_context(case.context_id)
        if case.session is not None:
            task_scopes.set_context_session(case.session)
        for key, value in case.tags.items():
            scope.set_tag(key, value)  # tag() itself refuses keys that are not str
        uid = client.capture(
            case.name,
            distinct_id=case.distinct_id,
            properties=case.properties,
            timestamp=TIMESTAMP,
            uuid=case.uuid_in,
        )
    mutate(case.properties)
    for value in case.tags.values():
        mutate(value)
    return uid


def _check_arrived(got: dict[str, Any], want: dict[str, Any], uid: str) -> None:
    assert got["uuid"] == uid
    assert got["event"] == want["event"]
    assert got["timestamp"] == want["timestamp"]
    if want["distinct_id"] is PERSONLESS:
        assert uuid.UUID(got["distinct_id"]), "a personless event gets a fresh UUID"
    else:
        assert got["distinct_id"] == want["distinct_id"]
    assert got["properties"] == want["properties"]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(cases, min_size=1, max_size=6))
def test_every_event_arrives_as_captured_or_was_refused_at_capture(
    collector: CaptureServer, client: Client, batch: list[Case]
) -> None:
    wanted: dict[str, dict[str, Any]] = {}
    for case in batch:
        reason = refusal(case)
        want = expected_event(case) if reason is None else None
        near_limit = False
        if want is not None:
            if nesting_of(case) > MAX_NESTING:
                reason = "nesting"
            else:
                size = expect_size(want)
                near_limit = abs(size - MAX_EVENT_BYTES) < SIZE_BAND
                if size > MAX_EVENT_BYTES and not near_limit:
                    reason = "size"
        given_uuid = case.uuid_in
        uid = _capture(client, case)
        event("refused: " + reason if reason else "sent")
        if reason is not None:
            assert uid is None, f"capture() accepted an event it must refuse ({reason})"
            continue
        if uid is None:
            assert near_limit, "capture() refused a valid event"
            continue
        assert want is not None
        if given_uuid not in (None, ""):
            assert uid == str(uuid.UUID(str(given_uuid).strip("{}")))
        wanted[uid] = want
    assert client.flush(timeout=30) == 0
    arrived = collector.wait_until(lambda events: wanted.keys() <= {e["uuid"] for e in events})
    by_uuid = {e["uuid"]: e for e in arrived}
    missing = wanted.keys() - by_uuid.keys()
    assert not missing, f"{len(missing)} valid events lost"
    for uid, want in wanted.items():
        _check_arrived(by_uuid[uid], want, uid)
    assert [r for r in collector.requests if r[1] != 200] == []
    stats = client.stats()
    assert stats.failed == 0
    collector.clear()
