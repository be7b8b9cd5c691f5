"""What PostHog's capture endpoint accepts, as one set of checks.

The loopback collector (``task_scopes.collector``) and ``InMemoryTransport`` refuse what
PostHog's capture service refuses, so that tests see what production sees: PostHog
answers 400 to the *whole request* when one event in it is invalid, so one bad event
costs every good event batched with it. ``Client.capture()`` refuses such events before
they are queued (``task_scopes._event``), using the same limits.

Read from PostHog's capture service (``rust/capture`` and ``rust/common/types`` in
https://github.com/PostHog/posthog):

* The body must be UTF-8 JSON (``String::from_utf8``, then ``serde_json``). serde_json
  has no ``NaN``/``Infinity`` tokens, refuses a number whose value overflows a 64-bit
  float ("number out of range": an integer of 309 digits or more), and refuses input
  nested deeper than 127 arrays/objects (its default recursion limit of 128; the
  workspace enables no ``unbounded_depth``). Escaped lone surrogates (``"\\ud800"``) are
  accepted (capture replaces them with U+FFFD).
* A request body over 20 MiB after decompression (``BATCH_BODY_SIZE``) is refused as
  ``EventTooBig``. (PostHog caps the single-event endpoints at 2 MiB; this module does
  not tell the endpoints apart.)
* ``RawEvent``: ``event`` is a required string and must not be empty
  (``MissingEventName``); ``properties`` an object when present (``null`` is refused);
  ``uuid`` absent, ``null``, ``""`` or a UUID string (hyphenated, 32 hex digits,
  ``urn:uuid:`` or braced, as the ``uuid`` crate parses); ``timestamp`` a string and
  ``offset`` an integer when present; ``$set``/``$set_once`` objects when present.
* distinct ID (``extract_distinct_id``): ``distinct_id`` (or ``$distinct_id``), else
  ``properties.distinct_id``; ``null`` or absent is refused (``MissingDistinctId``); other
  JSON values are stringified; NUL becomes U+FFFD; a value that is empty or only
  whitespace (Rust's ``trim()``: the Unicode White_Space characters) is refused; longer
  than 200 characters is *cut* to 200, not refused.
* ``properties.$cookieless_mode``, when present, must be a boolean
  (``InvalidCookielessMode``).
* One event is one Kafka message, at most 1,000,000 bytes (``message.max.bytes``,
  ``EventTooBig``); checked here on the event's compact JSON, a slight under-estimate of
  the message PostHog builds around it.
* The API key (``validate_token``): after trimming whitespace, not empty, at most 64
  characters, ASCII, no NUL, and not a personal API key (``phx_``). PostHog answers 401
  for these; the collector answers 400 like any refused request.
* A batch holding no event is refused (``EmptyBatch``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_DISTINCT_ID_CHARS",
    "MAX_EVENT_BYTES",
    "MAX_NESTING",
    "WHITE_SPACE",
    "batch_events",
    "event_problem",
    "is_uuid",
    "loads",
    "nesting",
    "token_problem",
]

MAX_NESTING = 127  # arrays/objects nested in one request body, the outermost included
MAX_BODY_BYTES = 20 * 1024 * 1024  # one request body after decompression
MAX_EVENT_BYTES = 1_000_000  # one event as JSON (Kafka's message.max.bytes)
MAX_DISTINCT_ID_CHARS = 200  # PostHog cuts longer distinct IDs to this
# Rust's char::is_whitespace (Unicode White_Space), which str.strip() does not match
# exactly: Python's also strips \x1c-\x1f.
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_HEX = "[0-9a-fA-F]"
_UUID = re.compile(
    rf"(?:urn:uuid:)?{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
    rf"|\{{{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}\}}"
    rf"|{_HEX}{{32}}"
)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _int(text: str) -> int:
    value = int(text)  # over 4,300 digits: ValueError
    if len(text) > 300:
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"number out of range: {len(text)} digits") from None
    return value


def loads(data: bytes | str) -> Any:
    """Parse ``data`` as PostHog's capture does: UTF-8, no ``NaN``/``Infinity``, no number
    beyond a 64-bit float, at most :data:`MAX_NESTING` arrays/objects deep.

    Raises:
        ValueError: any of these, or invalid JSON (``UnicodeDecodeError`` and
            ``json.JSONDecodeError`` are ``ValueError`` subclasses).
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        value = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_int
        )
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_NESTING}") from None
    if nesting(value) > MAX_NESTING:
        raise ValueError(f"nested deeper than {MAX_NESTING}")
    return value


def nesting(value: Any) -> int:
    """How many arrays/objects deep ``value`` is (a scalar: 0)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def is_uuid(value: str) -> bool:
    """True when PostHog parses ``value`` as a UUID (hyphenated, simple, urn, braced)."""
    return _UUID.fullmatch(value) is not None


def _distinct_id(event: dict[str, Any], props: dict[str, Any]) -> str | None:
    value = event.get("distinct_id")
    if value is None:
        value = event.get("$distinct_id")
    if value is None:
        value = props.get("distinct_id")
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value.replace("\x00", "\ufffd")


def event_problem(event: Any) -> str | None:
    """Why PostHog's capture would refuse ``event`` (one parsed event), or None."""
    if not isinstance(event, dict):
        return "event is not an object"
    name = event.get("event")
    if not isinstance(name, str):
        return "event name missing or not a string"
    if not name:
        return "event name is empty"
    props = event.get("properties", {})
    if not isinstance(props, dict):
        return "properties is not an object"
    if "distinct_id" in event and "$distinct_id" in event:
        return "both distinct_id and $distinct_id"
    distinct_id = _distinct_id(event, props)
    if distinct_id is None:
        return "distinct_id missing"
    if not distinct_id.strip(WHITE_SPACE):
        return "distinct_id is empty or whitespace"
    uuid = event.get("uuid")
    if uuid is not None and (not isinstance(uuid, str) or (uuid and not is_uuid(uuid))):
        return "uuid is not a UUID"
    for key, kind in (("timestamp", str), ("offset", int), ("$set", dict), ("$set_once", dict)):
        value = event.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"{key} is not a {kind.__name__}"
    if "$cookieless_mode" in props and not isinstance(props["$cookieless_mode"], bool):
        return "$cookieless_mode is not a boolean"
    return None


def event_size_problem(event: dict[str, Any]) -> str | None:
    """Why ``event`` is too large for one PostHog event, or None."""
    size = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_EVENT_BYTES:
        return f"event of {size} bytes, over {MAX_EVENT_BYTES}"
    return None


def token_problem(token: Any) -> str | None:
    """Why PostHog's capture would refuse ``token`` as the project API key, or None."""
    if not isinstance(token, str):
        return "api_key missing"
    token = token.strip(WHITE_SPACE)
    if not token:
        return "api_key is empty"
    if len(token) > 64:
        return "api_key longer than 64 characters"
    if not token.isascii():
        return "api_key is not ASCII"
    if token.startswith("phx_"):
        return "api_key is a personal API key (phx_)"
    if "\x00" in token:
        return "api_key holds NUL"
    return None


def batch_events(payload: Any, *, body_bytes: int) -> tuple[str, list[dict[str, Any]]]:
    """``(api_key, events)`` of a parsed ``/batch/`` or single-event request body.

    ``body_bytes``: its size after decompression (a body of at most
    :data:`MAX_EVENT_BYTES` cannot hold an event over the limit, so events are only
    measured in larger ones).

    Raises:
        ValueError: naming the first rule broken, as PostHog refuses the whole request.
    """
    if body_bytes > MAX_BODY_BYTES:
        raise ValueError(f"body of {body_bytes} bytes, over {MAX_BODY_BYTES}")
    if not isinstance(payload, dict):
        raise ValueError("payload is not an object")
    events = payload.get("batch", [payload])
    if not isinstance(events, list):
        raise ValueError("batch is not a list")
    if not events:
        raise ValueError("request holds no event")
    token = payload.get("api_key", payload.get("token"))
    if "batch" not in payload and token is None:
        props = payload.get("properties")
        token = payload.get("$token", props.get("token") if isinstance(props, dict) else None)
    problem = token_problem(token)
    if problem:
        raise ValueError(problem)
    for event in events:
        problem = event_problem(event)
        if problem is None and body_bytes > MAX_EVENT_BYTES:
            problem = event_size_problem(event)
        if problem:
            raise ValueError(problem)
    assert isinstance(token, str)
    return token.strip(WHITE_SPACE), events
