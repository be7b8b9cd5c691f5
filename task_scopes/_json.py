"""JSON-safe coercion and control-character cleaning, used by every layer.

The client makes event properties JSON-safe with it, the web middleware cleans header
values with it, and the Celery header codec (``task_scopes.celery._header``) makes tags
JSON-safe with it before they leave the producer.

Coercion is deterministic, so that the same value always encodes to the same bytes:

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

__all__ = [
    "MAX_DEPTH",
    "Unencodable",
    "clean_str",
    "clean_value",
    "coerce",
    "json_default",
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


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` hook for event properties: coerces what :func:`coerce`
    knows (bytes as base64) and turns anything else into None."""
    try:
        return coerce(value, allow_bytes=True)
    except Unencodable:
        return None


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
