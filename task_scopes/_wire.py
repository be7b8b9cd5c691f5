"""JSON-safe coercion of tag and property values.

The rules are deterministic so that the same context always encodes to the same bytes:
datetime/date/time -> ISO 8601, UUID/Decimal/Path -> str, set/frozenset/tuple -> list
(sorted when the items sort), bytes -> base64 only when allowed, anything else ->
:class:`Unencodable` (callers drop it and name the key; never ``repr()`` noise).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from pathlib import PurePath
from typing import Any
from uuid import UUID

__all__ = ["Unencodable", "coerce", "json_default"]

_MAX_DEPTH = 8


class Unencodable(ValueError):
    """A value has no JSON-safe form under the coercion rules."""


def coerce(value: Any, *, allow_bytes: bool = False, _depth: int = 0) -> Any:
    """Return ``value`` as JSON-safe Python (str, int, float, bool, None, list, dict).

    Raises:
        Unencodable: for objects of other types, bytes when not allowed, non-finite
            floats, and containers nested deeper than 8.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Unencodable("non-finite float")
        return value
    if _depth >= _MAX_DEPTH:
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
            str(k): coerce(v, allow_bytes=allow_bytes, _depth=_depth + 1)
            for k, v in value.items()
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
