"""Events checked and frozen in ``capture()``, in the caller's thread.

An event PostHog's capture endpoint would refuse is refused here, before it is queued:
PostHog answers 400 to a whole request when one event in it is invalid, so an invalid
event queued with good ones would cost them all. A valid event is serialized here, once:
what the caller mutates afterwards (a properties dict, a tag value) changes nothing that
was captured, and the consumer thread only joins ready JSON strings into batches.

Values JSON has no form for are converted by :func:`task_scopes._json.event_default`;
besides those, non-finite floats become null (as posthog-python sends them), dict keys
that are not strings are converted as JSON converts them (``1`` -> ``"1"``, ``None`` ->
``"null"``) or dropped with a warning (a tuple key), and lone surrogates (from
``os.fsdecode()`` of undecodable bytes), which UTF-8 cannot carry, become U+FFFD.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from . import _capture_rules
from ._defaults import MAX_EVENT_BYTES, MAX_EVENT_NESTING
from ._internal import RateLimitedLog
from ._json import event_default, json_depth
from ._scope import merged_context
from ._version import __version__

__all__ = [
    "Refused",
    "build",
    "check_cookieless",
    "check_distinct_id",
    "check_name",
    "check_properties",
    "check_uuid",
    "freeze",
    "uuid7",
]

_encode_checked = json.JSONEncoder(
    default=event_default,
    separators=(",", ":"),
    ensure_ascii=False,
    allow_nan=False,
    check_circular=True,
).encode
# The C encoder JSONEncoder.encode builds on every call, built once. Without the table of
# containers being encoded (a circular reference recurses until RecursionError, and
# freeze() tells cycles from depth on that path), it costs a third less per event.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode = (
    _c_make_encoder(
        None, event_default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    if _c_make_encoder is not None
    else None
)


def _encode(message: Any) -> str:
    if _c_encode is None:  # an interpreter without the C accelerator
        return _encode_checked(message)
    return "".join(_c_encode(message, 0))


# orjson, where it is installed (a dependency on CPython; PyPy has none): it writes an event
# for a fifth of the stdlib C encoder's instructions (measured under callgrind: 10,000
# against 49,000 for a task's event), once per capture(). Only for what it writes as
# json would (the same JSON values): str, int up to 64 bits, float (non-finite as null,
# as freeze() makes them), bool, None, dict with str keys, list, tuple, Enum, UUID.
# Everything else raises in it (subclasses, datetimes and dataclasses are passed
# through, with no default to take them) and takes the stdlib path, which converts it.
# Two exceptions, by design of orjson: an Enum member with a str or int mix-in is
# written as its value (the stdlib writes its str or int content; they differ only for
# a member whose value is not its content), and an orjson.Fragment is written as the raw
# JSON it holds (the caller's to make valid: that is what the type is for).
try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - CPython installs it
    _orjson = None  # type: ignore[assignment]
_fast_dumps: Any = _orjson.dumps if _orjson is not None else None
_FAST_OPTIONS = (
    _orjson.OPT_PASSTHROUGH_SUBCLASS
    | _orjson.OPT_PASSTHROUGH_DATETIME
    | _orjson.OPT_PASSTHROUGH_DATACLASS
    if _orjson is not None
    else 0
)


# For the tree _clean() made: only JSON types, no cycles left to look for.
_encode_clean = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
).encode
_SURROGATE = re.compile("[\ud800-\udfff]")
_getrandbits = random.getrandbits  # reseeded after os.fork() by the random module
_dropped_keys_log = RateLimitedLog(60.0)
_long_id_log = RateLimitedLog(60.0)


def uuid7(now_ns: int | None = None) -> str:
    """A new UUIDv7 string (RFC 9562): 48-bit Unix milliseconds, then 74 random bits.

    Time-ordered, as PostHog prefers for event UUIDs, and about four times cheaper than
    ``str(uuid.uuid4())``, which reads ``os.urandom`` and builds a ``UUID`` per call. The
    collector de-duplicates on it, which needs uniqueness, not unpredictability.

    Args:
        now_ns: the time (``time.time_ns()``) to stamp; default now.
    """
    global _uuid_ms
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = _getrandbits(74)
    cached = _uuid_ms
    if cached[0] != ms:  # "tttttttt-tttt-7": the milliseconds (48 bits) and the version
        cached = _uuid_ms = (ms, f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7")
    # 12 random bits; the variant (0b10) and 14 random bits; 48 random bits
    # %-formatting: a quarter fewer instructions than the same f-string with format specs
    return "%s%03x-%04x-%012x" % (  # noqa: UP031
        cached[1],
        rand >> 62,
        0x8000 | (rand >> 48 & 0x3FFF),
        rand & 0xFFFF_FFFF_FFFF,
    )


# (Unix milliseconds, the first 15 characters of a UUIDv7 made in that millisecond)
_uuid_ms: tuple[int, str] = (-1, "")


# (Unix second, its "YYYY-MM-DDTHH:MM:SS" in UTC): formatted once a second, not per event
_iso_second: tuple[int, str] = (-1, "")


def now_iso(now_ns: int | None = None) -> str:
    """Now in UTC as ISO 8601 with microseconds, e.g. ``2026-12-02T01:03:29.302372+00:00``:
    what ``datetime.now(timezone.utc).isoformat()`` gives (always with the fraction), for
    less than half its cost.

    Args:
        now_ns: the time (``time.time_ns()``) to write; default now.
    """
    global _iso_second
    second, ns = divmod(time.time_ns() if now_ns is None else now_ns, 1_000_000_000)
    cached = _iso_second
    if cached[0] != second:
        cached = _iso_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    # str(1_000_000 + µs)[1:] zero-pads the microseconds for a third of what ":06d" costs
    return f"{cached[1]}.{str(1_000_000 + ns // 1000)[1:]}+00:00"


class Refused(Exception):
    """``capture()`` refuses an event; ``str()`` says what the caller got wrong.

    ``kind``: a short name of the rule (``"name"``, ``"size"``...), to rate-limit the log
    line per rule rather than per value.
    """

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


def _kind_of(value: Any) -> str:
    return type(value).__qualname__


def check_name(event: Any) -> str:
    """``event`` if it is a non-empty string. Raises :class:`Refused`."""
    if not isinstance(event, str) or not event:
        shown = repr(event) if event is None or isinstance(event, str) else _kind_of(event)
        raise Refused(f"the event name must be a non-empty str, got {shown}", "name")
    return event


def check_distinct_id(value: Any) -> str | None:
    """``value`` as the distinct ID to send, or None when there is none.

    A str is sent as it is; an empty or whitespace-only one counts as none (PostHog would
    refuse it). An int or UUID is sent as ``str(value)``. Raises :class:`Refused` for
    other types.
    """
    if isinstance(value, str):
        return value if value.strip(_capture_rules.WHITE_SPACE) else None
    if value is None:
        return None
    if isinstance(value, UUID) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise Refused(f"distinct_id must be a str, got {_kind_of(value)}", "distinct_id")


def check_uuid(value: Any) -> str | None:
    """``value`` as a canonical UUID string, or None (a new one is made) for None or "".

    Raises :class:`Refused` when it is not a UUID (PostHog refuses the request).
    """
    if value is None or value == "":
        return None
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, str) and _capture_rules.is_uuid(value):
        return str(UUID(value))
    shown = repr(value[:60]) if isinstance(value, str) else _kind_of(value)
    raise Refused(f"uuid must be a UUID string, got {shown}", "uuid")


def check_cookieless(props: Mapping[str, Any]) -> None:
    """PostHog refuses a request where ``$cookieless_mode`` is there but not a bool."""
    if not isinstance(props.get("$cookieless_mode", False), bool):
        raise Refused("the $cookieless_mode property must be True or False", "cookieless")


def check_groups(value: Any) -> Mapping[str, str | int] | None:
    """``value`` if it is None or a mapping of str group types to str or int group keys.
    Raises :class:`Refused`."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise Refused(f"groups must be a dict (mapping), got {_kind_of(value)}", "groups")
    for group_type, group_key in value.items():
        if type(group_type) is not str or type(group_key) not in (str, int):
            raise Refused(
                "groups map a group type (str) to a group key (str or int), got "
                f"{_kind_of(group_type)} -> {_kind_of(group_key)}",
                "groups",
            )
    return value


def check_properties(value: Any) -> Mapping[str, Any] | None:
    """``value`` if it is None or a mapping. Raises :class:`Refused`."""
    if value is None or type(value) is dict or isinstance(value, Mapping):
        return value
    raise Refused(f"properties must be a dict (mapping), got {_kind_of(value)}", "properties")


def _check_shape(message: Any) -> None:
    """What must hold after ``before_send`` too: the fields PostHog checks."""
    if not isinstance(message, dict):
        raise Refused(f"before_send returned a {_kind_of(message)}, not an event dict", "shape")
    check_name(message.get("event"))
    distinct_id = message.get("distinct_id")
    if not isinstance(distinct_id, str) or check_distinct_id(distinct_id) is None:
        raise Refused(f"distinct_id must be a non-blank str, got {distinct_id!r:.60}", "shape")
    props = message.get("properties")
    if not isinstance(props, dict):
        raise Refused(f"properties must be a dict, got {_kind_of(props)}", "shape")
    uid = message.get("uuid")
    if not isinstance(uid, str) or not _capture_rules.is_uuid(uid):
        raise Refused(f"uuid must be a UUID string, got {uid!r:.60}", "shape")
    if not isinstance(message.get("timestamp"), str):
        raise Refused("timestamp must be an ISO 8601 str", "shape")
    check_cookieless(props)


def build(
    event: Any,
    distinct_id: Any,
    properties: Any,
    timestamp: datetime | str | None,
    uuid: Any,
    groups: Mapping[str, str | int] | None = None,
) -> dict[str, Any]:
    """The event dict ``capture()`` makes of its arguments and the active scopes: the
    scopes' tags, then ``properties``, ``$groups`` (the scopes', a ``$groups`` mapping in
    ``properties``, then ``groups``), ``$session_id``, ``$window_id``, ``$lib``. The
    distinct ID is
    ``distinct_id`` unless it is None or blank, else the scopes' unless that is None or
    blank, else the event is personless (``$process_person_profile: false``, a fresh UUID
    as distinct ID).

    Raises:
        Refused: a name, distinct ID, UUID, properties or ``$cookieless_mode`` PostHog
            would refuse.
    """
    # The checks' common cases inline: capture() runs once per task in a worker.
    name = event if type(event) is str and event else check_name(event)
    if properties is not None and type(properties) is not dict:
        properties = check_properties(properties)
    if groups is not None:
        groups = check_groups(groups)
    now_ns = time.time_ns()  # one clock reading for the UUID and the timestamp
    uid = uuid7(now_ns) if uuid is None else check_uuid(uuid) or uuid7(now_ns)
    context = merged_context()
    props = context.tags
    if properties:
        props.update(properties)
    if "$cookieless_mode" in props:  # a tag could be it too
        check_cookieless(props)
    event_groups = context.groups
    if event_groups or groups:
        explicit = props.get("$groups")
        if isinstance(explicit, Mapping):
            event_groups.update(explicit)
        if groups:
            event_groups.update(groups)
        props["$groups"] = event_groups
    if context.session_id is not None and "$session_id" not in props:
        props["$session_id"] = context.session_id
    if context.window_id is not None and "$window_id" not in props:
        props["$window_id"] = context.window_id
    ctx_distinct_id = context.distinct_id
    # an empty one falls back to the scopes' distinct ID, as in posthog-python
    resolved = None if distinct_id is None else check_distinct_id(distinct_id)
    if resolved is None and ctx_distinct_id is not None:
        resolved = check_distinct_id(ctx_distinct_id)
    if resolved is None:
        resolved = uuid7(now_ns)
        props.setdefault("$process_person_profile", False)
    elif len(resolved) > _capture_rules.MAX_DISTINCT_ID_CHARS:
        _long_id_log.warning(
            "task_scopes: a distinct_id of %d characters was captured; PostHog keeps its first %d",
            len(resolved),
            _capture_rules.MAX_DISTINCT_ID_CHARS,
        )
    props["$lib"] = "task_scopes"
    props["$lib_version"] = __version__
    if timestamp is None:
        ts = now_iso(now_ns)
    elif isinstance(timestamp, datetime):
        ts = timestamp.isoformat()
    else:
        ts = str(timestamp)
    return {
        "event": name,
        "distinct_id": resolved,
        "properties": props,
        "timestamp": ts,
        "uuid": uid,
    }


def freeze(message: Any, *, check_fields: bool = True) -> str:
    """The event ``message`` as the compact JSON string that will be sent.

    Args:
        message: the event dict.
        check_fields: check the fields PostHog checks (name, distinct ID, UUID...);
            False for a dict :func:`build` made, unchanged since (no ``before_send``
            ran in between).

    Raises:
        Refused: PostHog would refuse it (see :func:`_check_shape`), it cannot be
            serialized (a circular reference, nested too deep), its JSON is over
            ``MAX_EVENT_BYTES`` (900 KiB) or nests deeper than ``MAX_EVENT_NESTING``.
    """
    if check_fields:
        _check_shape(message)
    if _fast_dumps is not None:
        try:
            raw = _fast_dumps(message, option=_FAST_OPTIONS)
        except Exception:  # a value orjson leaves to the stdlib path (see _fast_dumps)
            pass
        else:
            return _checked_size(raw.decode(), len(raw))
    try:
        item = _encode(message)
    except (ValueError, TypeError, RecursionError):
        # NaN/Infinity, a key JSON refuses, a cycle (a RecursionError or, from the
        # checked encoder, ValueError), nesting deeper than the interpreter recurses:
        # _clean_event() tells which, and raises Refused for cycles and depth.
        try:
            item = _encode_clean(_clean_event(message))
        except (ValueError, TypeError) as exc:  # an int over 4,300 digits
            raise Refused(f"cannot serialize a property: {exc}", "serialize") from None
    except Exception as exc:  # a mapping's own items() (say) raised inside json
        raise Refused(f"cannot serialize a property: {exc!r:.200}", "serialize") from None
    if item.isascii():
        size = len(item)
    else:
        try:
            size = len(item.encode())
        except UnicodeEncodeError:
            item = _SURROGATE.sub("\ufffd", item)
            size = len(item.encode())
    return _checked_size(item, size)


def _checked_size(item: str, size: int) -> str:
    """``item`` (an event's JSON, ``size`` bytes as UTF-8), or :class:`Refused` when it is
    over ``MAX_EVENT_BYTES`` or nests deeper than ``MAX_EVENT_NESTING``."""
    if size > MAX_EVENT_BYTES:
        raise Refused(
            f"{size:,} bytes as JSON, over the limit of {MAX_EVENT_BYTES:,} bytes per event",
            "size",
        )
    # Every nesting level needs a bracket: only count them exactly when there are enough.
    if item.count("{") + item.count("[") > MAX_EVENT_NESTING:
        depth = json_depth(item)
        if depth > MAX_EVENT_NESTING:
            raise Refused(
                f"properties nested {depth} levels deep in the event; PostHog accepts "
                f"{MAX_EVENT_NESTING}",
                "nesting",
            )
    return item


def _clean_event(message: dict[str, Any]) -> Any:
    dropped: list[str] = []
    try:
        clean = _clean(message, set(), dropped)
    except RecursionError:
        raise Refused("properties nested too deep to serialize", "nesting") from None
    if dropped:
        _dropped_keys_log.warning(
            "task_scopes: dropped the keys %s from event %r: JSON keys must be str, "
            "int, float, bool or None (tags and property keys should be str)",
            ", ".join(dropped),
            message["event"][:100],
            key=tuple(dropped),
        )
    return clean


def _key(key: Any) -> str | None:
    """A dict key as JSON writes it, or None when JSON has no form for it."""
    if isinstance(key, str):
        return key
    if key is True or key is False or key is None:
        return json.dumps(key)
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float) and math.isfinite(key):
        return float.__repr__(key)
    return None


def _shown_key(key: Any) -> str:
    try:
        return repr(key)[:60]
    except Exception:  # the key's own __repr__ raised
        return f"<{_kind_of(key)}>"


def _clean(value: Any, active: set[int], dropped: list[str]) -> Any:
    """``value`` as JSON types only: non-finite floats as None, keys as JSON writes
    them (others dropped and named in ``dropped``), other objects converted by
    :func:`event_default`. Raises :class:`Refused` on a circular reference."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    ident = id(value)
    if ident in active:
        raise Refused("a property refers to itself (circular reference)", "circular")
    active.add(ident)
    try:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                key = _key(k)
                if key is None:
                    dropped.append(_shown_key(k))
                    continue
                out[key] = _clean(v, active, dropped)
            return out
        if isinstance(value, (list, tuple)):
            return [_clean(v, active, dropped) for v in value]
        return _clean(event_default(value), active, dropped)
    finally:
        active.discard(ident)
