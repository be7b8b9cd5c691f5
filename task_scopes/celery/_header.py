"""The context header: what travels from the producer to the worker, and how.

Wire format (version 1)
-----------------------
One message header at the top level of the task message:

* ``task_scopes``: compact JSON, ``p`` first then the other keys sorted (the producer
  memoizes the rest per context), every field but ``v`` optional:

  =====  ====================================================================
  key    value
  =====  ====================================================================
  ``v``  version, the integer 1
  ``d``  distinct ID (string)
  ``s``  session ID (string)
  ``w``  window ID (string): posthog-js's ``$window_id``; added after the first
         release
  ``t``  tags: an object of property name -> JSON value
  ``g``  groups: an object of group type -> group key (string or integer), the
         event property ``$groups``; added after the first release
  ``p``  publish time: Unix epoch milliseconds (integer) when the producer
         published this message, turned into ``celery_queue_latency_ms`` by the
         worker; added after the first release
  =====  ====================================================================

  A field that has no value is left out; a context with nothing in it writes only ``v``
  and ``p``, and nothing at all when the message already carries a context (the
  caller's own ``task_scopes`` header, or PostHog's headers), which then stands.
* ``task_scopes_sig``: hex HMAC-SHA256 of the exact ``task_scopes`` string under the
  ``task_scopes_secret`` setting, written only when a secret is set (it covers every
  field, ``p`` and ``g`` included).

Why top level only: a top-level key reaches the worker as ``request.task_scopes`` on the
first run and on every retry. A nested ``headers["headers"]`` dict (the workaround for
https://github.com/celery/celery/issues/4875 that other integrations use) hides top-level
keys from ``request.headers`` and makes ``retry()`` drop the user's own top-level headers.

Read order in the worker: ``request.task_scopes``, then ``request.headers["task_scopes"]``
(eager ``apply(headers=...)``, other producers), then PostHog's ``X-POSTHOG-DISTINCT-ID`` /
``X-POSTHOG-SESSION-ID`` / ``X-POSTHOG-CONTEXT-TAGS``, so producers that run PostHog's own
Celery integration interoperate (those carry no groups and no publish time).

Version rule: a worker ignores fields it does not know, and accepts headers without the
fields it does know (every field but ``v`` is optional); ``v`` changes only when the
meaning of an existing field does, and a worker refuses a version it does not know. So
``g`` and ``p`` were added without a new version: a worker older than them ignores them
(its tasks get no groups and no queue latency), and a newer worker reads an older
producer's headers (no groups, no latency).

Caps (:class:`Limits`, settings ``task_scopes_max_*``): the header is at most 8 KiB, at
most 64 tags, keys at most 200 characters, string tags at most 1,000 characters (a longer
one is dropped and named; strings nested in lists and objects are cut), control characters
stripped. Group types follow the key cap and string group keys the value cap; a group over
either is dropped and named, never cut. Over a cap, tags are dropped largest first until
it fits, then the groups, and a warning names them; the task is always published. A
distinct, session or window ID longer than the string cap, or that does not fit the
header, is left out, never cut (a cut ID would attribute events to somebody else); the
worker refuses one over the cap the same way and keeps the rest. ``celery_*`` and ``$``
keys never travel: they describe one task or one event, not its caller. Tag values are
made JSON-safe by :func:`task_scopes._json.coerce` (bytes only with
``task_scopes_encode_bytes``).

The worker treats the header as untrusted input: a decode error, a wrong type or a bad
signature makes the task run with an empty context and logs a warning; nothing raises.
``p`` is the producer's clock: the latency compares two hosts' clocks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple
from uuid import UUID

from .. import _defaults
from .._internal import RateLimitedLog
from .._json import clean_str, clean_value, coerce, strip_control

__all__ = [
    "DEFAULT_LIMITS",
    "HEADER",
    "POSTHOG_DISTINCT_ID",
    "POSTHOG_SESSION_ID",
    "POSTHOG_TAGS",
    "SIG_HEADER",
    "Limits",
    "WireContext",
    "WireError",
    "clean_groups",
    "clean_tags",
    "decode",
    "decode_posthog",
    "encode",
    "sign",
]

HEADER = "task_scopes"
SIG_HEADER = "task_scopes_sig"
# PostHog's Celery integration (posthog/integrations/celery.py) writes these.
POSTHOG_DISTINCT_ID = "X-POSTHOG-DISTINCT-ID"
POSTHOG_SESSION_ID = "X-POSTHOG-SESSION-ID"
POSTHOG_TAGS = "X-POSTHOG-CONTEXT-TAGS"
VERSION = 1

_DECODE_LIMIT = 256 * 1024  # refuse to parse anything larger, whatever the cap says
_refused_log = RateLimitedLog(60.0)


@dataclass(frozen=True)
class Limits:
    """Caps on the encoded context: bytes of the header, number of tags, characters of a
    key and of a string value; ``encode_bytes`` sends bytes tags as base64."""

    max_bytes: int = _defaults.MAX_HEADER_BYTES
    max_tags: int = _defaults.MAX_TAGS
    max_key_chars: int = _defaults.MAX_KEY_CHARS
    max_value_chars: int = _defaults.MAX_VALUE_CHARS
    encode_bytes: bool = False


DEFAULT_LIMITS = Limits()


class WireError(ValueError):
    """A received header is not a valid context (bad JSON, types, version, signature)."""


@dataclass(frozen=True)
class WireContext:
    """A context as carried between processes; ``groups`` maps group type -> group key,
    ``published_ms`` is the producer's publish time in Unix epoch milliseconds."""

    distinct_id: str | None = None
    session_id: str | None = None
    tags: Mapping[str, Any] | None = None
    window_id: str | None = None
    groups: Mapping[str, str | int] | None = None
    published_ms: int | None = None


def _propagated(key: str) -> bool:
    # celery_* tags describe one task, $-properties one event: neither belongs to a caller.
    return not key.startswith(("celery_", "$"))


# One encoder, built once: json.dumps() with options builds a new JSONEncoder per call.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode


class _Refused(NamedTuple):
    """An ID over the cap: left out, never cut (a cut ID is somebody else's)."""

    chars: int


def _clean_id(value: Any, limits: Limits) -> str | _Refused | None:
    """The ID as it may travel (control characters stripped); :class:`_Refused` when it
    is longer than ``limits.max_value_chars``; None when there is none."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value) if isinstance(value, (int, UUID)) else None
        if value is None:
            return None
    if not value.isprintable():
        value = strip_control(value)
    if len(value) > limits.max_value_chars:
        return _Refused(len(value))
    return value or None


def clean_tags(
    tags: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], list[str]]:
    """Tags as they may travel: JSON-safe, control characters stripped, capped.

    Returns ``(tags, dropped)``: the propagated tags and the keys dropped because they
    could not be encoded, their key or string value was too long (strings nested in lists
    and objects are cut instead), or cleaning made it equal to an earlier key (the first
    one is kept). ``celery_*`` and ``$`` keys are left out silently (they
    never propagate).
    """
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in tags.items():
        if not isinstance(key, str):
            dropped.append(repr(key)[:50])
            continue
        if not key.isprintable():  # clean first: "\x00celery_x" must not pass as "celery_x"
            key = strip_control(key)
        if not _propagated(key):
            continue
        if len(key) > limits.max_key_chars:
            dropped.append(key[:50] + "...")
            continue
        if key in out:  # "plan" and "plan\x00" collapse into one key
            dropped.append(key)
            continue
        kind = type(value)
        if kind is str:
            if len(value) > limits.max_value_chars:  # dropped and named, never cut silently
                dropped.append(key)
                continue
            out[key] = clean_str(value, limits.max_value_chars)
            continue
        if kind is int or kind is bool or value is None:  # int over 4,300 digits: see below
            out[key] = value
            continue
        try:
            coerced = coerce(value, allow_bytes=limits.encode_bytes)
        except Exception:  # Unencodable, or a user type whose isoformat()/str() raises
            dropped.append(key)
            continue
        out[key] = clean_value(coerced, limits.max_value_chars)
    return out, dropped


def clean_groups(
    groups: Mapping[Any, Any], limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, str | int], list[str]]:
    """Groups as they may travel: group type -> group key, control characters stripped.

    Returns ``(groups, dropped)``: the groups kept and the ``$groups.<type>`` names of
    those dropped because the type is not a string or is over ``limits.max_key_chars``, or
    the key is not a string or an integer, is empty, or is a string over
    ``limits.max_value_chars`` (a cut group key would name another group).
    """
    out: dict[str, str | int] = {}
    dropped: list[str] = []
    for group_type, key in groups.items():
        if not isinstance(group_type, str):
            dropped.append("$groups." + repr(group_type)[:50])
            continue
        group_type = strip_control(group_type)
        if isinstance(key, str) and len(key) <= limits.max_value_chars:
            key = clean_str(key, limits.max_value_chars)
        elif type(key) is not int:
            key = ""
        if not group_type or len(group_type) > limits.max_key_chars or key == "":
            dropped.append("$groups." + group_type[:50])
            continue
        out[group_type] = key
    return out, dropped


def _dumps_dropping(payload: dict[str, Any], dropped: list[str]) -> str:
    """``_dumps(payload)``; tags JSON cannot write (ints over CPython's 4,300-digit
    limit, say) are dropped one by one and named, rather than losing the whole context."""
    try:
        return _dumps(payload)
    except (ValueError, TypeError, RecursionError):
        tags = payload.get("t", {})
        for key in list(tags):
            try:
                _dumps(tags[key])
            except (ValueError, TypeError, RecursionError):
                del tags[key]
                dropped.append(key)
        if not tags:
            payload.pop("t", None)
        return _dumps(payload)


def encode(
    distinct_id: str | None,
    session_id: str | None,
    tags: Mapping[str, Any],
    limits: Limits = DEFAULT_LIMITS,
    *,
    window_id: str | None = None,
    groups: Mapping[str, Any] | None = None,
    published_ms: int | None = None,
) -> tuple[str, list[str]]:
    """Encode a context as the ``task_scopes`` header value.

    Args:
        groups: group type -> group key (``$groups``); see :func:`clean_groups`.
        published_ms: the publish time, Unix epoch milliseconds (int); None leaves ``p``
            out.

    Returns ``(header, dropped)``: the compact JSON string, never over
    ``limits.max_bytes`` UTF-8 bytes, and the tag keys (``$groups.<type>`` for groups)
    left out (unencodable, or dropped largest first to fit the caps). Never raises for
    tag or group values.
    """
    clean, dropped = clean_tags(tags, limits)
    payload: dict[str, Any] = {"v": VERSION}
    if groups:
        kept, dropped_groups = clean_groups(groups, limits)
        dropped += dropped_groups
        if kept:
            payload["g"] = kept
    if published_ms is not None:
        payload["p"] = published_ms
    for field_name, label, value in (
        ("d", "$distinct_id", distinct_id),
        ("s", "$session_id", session_id),
        ("w", "$window_id", window_id),
    ):
        cleaned = _clean_id(value, limits)
        if isinstance(cleaned, _Refused):
            dropped.append(label)
        elif cleaned is not None:
            payload[field_name] = cleaned
    if clean:
        payload["t"] = clean
    header = _dumps_dropping(payload, dropped)
    if len(clean) <= limits.max_tags and (
        len(header) <= limits.max_bytes and len(header.encode()) <= limits.max_bytes
    ):
        return header, dropped
    # Over a cap: drop the largest tags first until both caps hold.
    sizes = sorted(((len(_dumps({k: v}).encode()), k) for k, v in clean.items()), reverse=True)
    total = len(header.encode())
    count = len(clean)
    for size, key in sizes:
        if count <= limits.max_tags and total <= limits.max_bytes:
            break
        del clean[key]
        dropped.append(key)
        total -= size - 1  # a removed member also loses its separating comma
        count -= 1
    if not clean:
        payload.pop("t", None)
    header = _dumps(payload)
    while len(header.encode()) > limits.max_bytes and clean:  # estimate was short
        key = max(clean, key=lambda k: len(_dumps({k: clean[k]})))
        del clean[key]
        dropped.append(key)
        if not clean:
            payload.pop("t", None)
        header = _dumps(payload)
    # Groups and IDs alone over the cap: leave them out rather than cut them. A cut distinct
    # ID would attribute the task's events to somebody else; none makes them personless.
    for field_name, label in (
        ("g", "$groups"),
        ("w", "$window_id"),
        ("s", "$session_id"),
        ("d", "$distinct_id"),
    ):
        if len(header.encode()) <= limits.max_bytes:
            break
        if payload.pop(field_name, None) is not None:
            dropped.append(label)
            header = _dumps(payload)
    return header, dropped


def sign(header: str, secret: str) -> str:
    """Hex HMAC-SHA256 of ``header`` under ``secret``."""
    return hmac.new(secret.encode(), header.encode(), hashlib.sha256).hexdigest()


def check_signature(header: str, signature: Any, secret: str) -> None:
    """Raise :class:`WireError` unless ``signature`` is the HMAC of ``header`` under
    ``secret`` (:func:`sign`)."""
    if not isinstance(signature, str):
        raise WireError("signature missing")
    if not signature.isascii():  # compare_digest() raises TypeError on non-ASCII str
        raise WireError("signature is not hex")
    try:
        expected = sign(header, secret)
    except UnicodeEncodeError as exc:  # lone surrogates: cannot have been signed
        raise WireError("header is not UTF-8") from exc
    if not hmac.compare_digest(expected, signature):
        raise WireError("signature mismatch")


def decode(
    header: Any,
    signature: Any = None,
    secret: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> WireContext:
    """Decode an untrusted ``task_scopes`` header value.

    Raises:
        WireError: not a string, too large, bad JSON or types, unknown version, or (with
            ``secret``) a missing or wrong signature.
    """
    if isinstance(header, bytes):
        try:
            header = header.decode()
        except UnicodeDecodeError as exc:
            raise WireError("header is not UTF-8") from exc
    if not isinstance(header, str):
        raise WireError(f"header is a {type(header).__name__}, not a string")
    if len(header) > _DECODE_LIMIT:
        raise WireError(f"header of {len(header)} characters is too large")
    if secret is not None:
        check_signature(header, signature, secret)
    try:
        payload = json.loads(header)
    except (ValueError, RecursionError) as exc:
        raise WireError("header is not JSON") from exc
    if not isinstance(payload, dict):
        raise WireError("header is not a JSON object")
    if payload.get("v") != VERSION:
        raise WireError(f"unknown header version {payload.get('v')!r}")
    tags = payload.get("t", {})
    if not isinstance(tags, dict):
        raise WireError("tags are not an object")
    groups = payload.get("g", {})
    if not isinstance(groups, dict):
        raise WireError("groups are not an object")
    published = payload.get("p")
    if published is not None and (
        type(published) not in (int, float) or not math.isfinite(published)
    ):
        raise WireError("publish time is not a number")
    context = _received(
        payload.get("d"), payload.get("s"), tags, limits, "distinct ID", "session ID"
    )
    window_id = payload.get("w")
    if window_id is not None and not isinstance(window_id, str):
        raise WireError("window ID is not a string")
    if not groups and published is None and window_id is None:
        return context
    wid = None if window_id is None else _clean_id(window_id, limits)
    if isinstance(wid, _Refused):
        _refused_log.warning(
            "task_scopes: received window ID of %d characters, over the cap of %d; left out "
            "(the rest of the context is kept)",
            wid.chars,
            limits.max_value_chars,
        )
        wid = None
    return replace(
        context,
        window_id=wid,
        groups=clean_groups(groups, limits)[0] or None,
        published_ms=None if published is None else int(published),
    )


def _received(
    distinct_id: Any,
    session_id: Any,
    tags: Mapping[str, Any],
    limits: Limits,
    distinct_id_name: str,
    session_id_name: str,
) -> WireContext:
    """Check the ID types of a received context, then clean and cap it like ours: an ID
    over the cap is refused (left out, logged), not cut, as on the publish side."""
    if distinct_id is not None and not isinstance(distinct_id, str):
        raise WireError(f"{distinct_id_name} is not a string")
    if session_id is not None and not isinstance(session_id, str):
        raise WireError(f"{session_id_name} is not a string")
    clean, _ = clean_tags(tags, limits)
    if len(clean) > limits.max_tags:
        clean = dict(list(clean.items())[: limits.max_tags])
    did = _clean_id(distinct_id, limits)
    sid = _clean_id(session_id, limits)
    for name, value in ((distinct_id_name, did), (session_id_name, sid)):
        if isinstance(value, _Refused):
            _refused_log.warning(
                "task_scopes: received %s of %d characters, over the cap of %d; left out "
                "(the rest of the context is kept)",
                name,
                value.chars,
                limits.max_value_chars,
            )
    return WireContext(
        did if isinstance(did, str) else None, sid if isinstance(sid, str) else None, clean
    )


def decode_posthog(
    distinct_id: Any, session_id: Any, tags: Any, limits: Limits = DEFAULT_LIMITS
) -> WireContext:
    """Decode PostHog's ``X-POSTHOG-*`` header values (tags: a JSON object string).

    Raises:
        WireError: wrong types or tags that are not a JSON object.
    """
    parsed: Any = {}
    if tags is not None:
        if not isinstance(tags, (str, bytes)) or len(tags) > _DECODE_LIMIT:
            raise WireError("X-POSTHOG-CONTEXT-TAGS is not a string of reasonable size")
        try:
            parsed = json.loads(tags)
        except (ValueError, RecursionError) as exc:
            raise WireError("X-POSTHOG-CONTEXT-TAGS is not JSON") from exc
        if not isinstance(parsed, dict):
            raise WireError("X-POSTHOG-CONTEXT-TAGS is not a JSON object")
    return _received(
        distinct_id, session_id, parsed, limits, POSTHOG_DISTINCT_ID, POSTHOG_SESSION_ID
    )
