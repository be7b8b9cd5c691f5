"""JSON-safe coercion and control-character cleaning, used by every layer.

The client converts event properties with :func:`event_default` (table in its
docstring), the web middleware cleans header values with :func:`strip_control`, and the
Celery header codec (``task_scopes.celery._header``) makes tags JSON-safe with
:func:`coerce` before they leave the producer.

:func:`coerce` is strict and deterministic, so that the same tag always encodes to the
same bytes, and a value it cannot encode is refused (the header drops that tag):

=======================================  ==================================================
value                                    becomes
=======================================  ==================================================
str, int, bool, None, finite float       itself
datetime, date, time                     ISO 8601 string (``isoformat()``)
UUID, Decimal, pathlib path              ``str(value)``
Enum member                              its ``value``, coerced
set, frozenset                           list, sorted when the items sort
tuple, list                              list
Mapping                                  object with ``str()`` keys
bytes, bytearray, memoryview             base64 string when allowed, else refused
anything else, non-finite float          refused (:class:`Unencodable`)
=======================================  ==================================================
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from pathlib import PurePath
from typing import Any
from uuid import UUID

from ._internal import RateLimitedLog

__all__ = [
    "MAX_DEPTH",
    "Unencodable",
    "clean_str",
    "clean_value",
    "coerce",
    "event_default",
    "json_depth",
    "strip_control",
]

MAX_DEPTH = 8  # containers nested deeper are refused

# Control characters (Cc), and lone surrogates (os.fsdecode() of undecodable bytes, or JSON
# escapes like "\ud800"), which UTF-8 cannot carry.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class Unencodable(ValueError):
    """A value has no JSON-safe form under the coercion rules."""


def coerce(value: Any, *, allow_bytes: bool = False, _depth: int = 0) -> Any:
    """Return ``value`` as JSON-safe Python (str, int, float, bool, None, list, dict).

    Raises:
        Unencodable: for objects of other types, bytes when not allowed, non-finite
            floats, and containers nested deeper than :data:`MAX_DEPTH`.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Unencodable("non-finite float")
        return value
    if _depth >= MAX_DEPTH:
        raise Unencodable("nested too deep")
    if isinstance(value, Enum):
        return coerce(value.value, allow_bytes=allow_bytes, _depth=_depth + 1)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal, PurePath)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not allow_bytes:
            raise Unencodable("bytes")
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {
            str(k): coerce(v, allow_bytes=allow_bytes, _depth=_depth + 1) for k, v in value.items()
        }
    if isinstance(value, list):
        return [coerce(v, allow_bytes=allow_bytes, _depth=_depth + 1) for v in value]
    if isinstance(value, (set, frozenset, tuple)):
        items = [coerce(v, allow_bytes=allow_bytes, _depth=_depth + 1) for v in value]
        if isinstance(value, tuple):
            return items
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    raise Unencodable(type(value).__name__)


def event_default(value: Any) -> Any:
    """``json`` ``default=`` hook for event properties: converts one level of an object
    JSON has no form for; the encoder then encodes (and converts) what it returns.

    ======================================  ===============================================
    value                                   in the event
    ======================================  ===============================================
    str, int, bool, None, finite float      itself (JSON writes these without this hook)
    dict, list, tuple                       object, array (likewise)
    datetime, date, time                    ISO 8601 string (``isoformat()``)
    UUID, Decimal, pathlib path             ``str(value)``
    Enum member                             its ``value``, converted
    set, frozenset                          array, sorted when the items sort
    other Mapping                           object
    bytes, bytearray, memoryview            base64 string
    dataclass instance                      object of its fields
    object with ``model_dump()``            what it returns (pydantic v2 models)
    anything else                           null, and a warning naming its type
    ======================================  ===============================================

    A conversion that raises (a ``model_dump()`` or ``isoformat()`` of the user's) gives
    null too. Dataclass fields and ``model_dump()`` output are converted one level at a
    time like any other value, so nesting, cycles and odd field types are handled as
    anywhere else in the event.
    """
    try:
        return _convert(value)
    except Exception:  # the value's own method raised: it has no JSON form
        return None


def _convert(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal, PurePath)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, type):  # a class, not an instance of one
        return _unknown(value)
    if dataclasses.is_dataclass(value):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        dumped = value.model_dump()
        if isinstance(dumped, Mapping):  # a Mock answers any method, with another Mock
            return dumped
    return _unknown(value)


_unknown_log = RateLimitedLog(60.0)


def _unknown(value: Any) -> None:
    _unknown_log.warning(
        "task_scopes: a property value of type %s has no JSON form and is sent as null; "
        "convert it before capture() (str(value), or a dict)",
        type(value).__qualname__,
        key=type(value).__qualname__,
    )
    return None


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How many arrays/objects deep the JSON ``text`` nests (a scalar: 0)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def strip_control(text: str) -> str:
    """``text`` without control characters and lone surrogates."""
    return text if text.isprintable() else _CONTROL.sub("", text)


def clean_str(value: str, limit: int) -> str:
    """``value`` without control characters, cut to ``limit`` characters."""
    if not value.isprintable():
        value = _CONTROL.sub("", value)
    return value[:limit]


def clean_value(value: Any, limit: int) -> Any:
    """Strip control characters from and cap every string in a coerced value."""
    if isinstance(value, str):
        return clean_str(value, limit)
    if isinstance(value, list):
        return [clean_value(v, limit) for v in value]
    if isinstance(value, dict):
        return {clean_str(k, limit): clean_value(v, limit) for k, v in value.items()}
    return value
