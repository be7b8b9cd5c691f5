"""Memos of the context header on the hot paths.

One web request publishes many tasks with the same context, and a worker receives many
messages with the same context, so each side keeps the last few hundred encodings. Only
the publish time differs between them: the producer writes it first, ``{"p":<ms>,...``,
in front of the memoized rest (JSON objects are unordered, and a signature covers the
exact string sent), and the worker splits it off before looking the rest up. A header in
any other form (another producer, an older version) is decoded in full.

On publish, the encoding is first looked up by the stamps of the active scopes (see
:func:`task_scopes._scope.active_stamps`), which skips merging the scopes at all; a miss
falls back to the memo keyed by the context's content, so a task publishing subtasks
from its own (new) scope still finds its caller's encoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from .._scope import MergedContext, active_stamps, merged_context
from ._header import Limits, WireContext, check_signature, decode, encode

__all__ = [
    "ContextHeader",
    "context_header",
    "decode_header",
    "decode_rest",
    "with_publish_time",
]

_PREFIX = '{"p":'
_P_RESERVE = 24  # bytes kept free under the cap for '"p":' + the milliseconds + ','
_MAX_ENTRIES = 256  # per memo; a full memo is emptied (each request's context is new)

_encoded: dict[Any, tuple[str, tuple[str, ...]]] = {}
# header rest (without the publish time, see decode_rest) -> (the Limits it was decoded
# under, the context): keyed by the string alone (hashing a Limits dataclass costs more
# than the look-up), checked by identity. An eager run looks up the publish memo's own
# string, whose hash Python keeps, so its look-up hashes nothing.
_decoded: dict[str, tuple[Limits, WireContext]] = {}


class ContextHeader(NamedTuple):
    """The context active here as a header, without the publish time: ``rest`` is the
    encoded JSON object, ``dropped`` the keys left out, ``empty`` whether the context
    has nothing in it (then only ``v`` is encoded)."""

    rest: str
    dropped: tuple[str, ...]
    empty: bool


def context_header(limits: Limits, memo: dict[Any, ContextHeader]) -> ContextHeader:
    """The :class:`ContextHeader` of the context active here (global scope excluded), by
    the active scopes' stamps in ``memo`` (one per installed app, emptied when full)."""
    stamps = active_stamps()
    found = memo.get(stamps)
    if found is not None:
        return found
    context = merged_context(include_global=False)
    rest, dropped, memoizable = _rest(context, limits)
    found = ContextHeader(
        rest,
        dropped,
        not (
            context.distinct_id
            or context.session_id
            or context.window_id
            or context.tags
            or context.groups
        ),
    )
    if memoizable:
        if len(memo) >= _MAX_ENTRIES:
            memo.clear()
        memo[stamps] = found
    return found


def with_publish_time(rest: str, published_ms: int) -> str:
    """The header ``rest`` (an encoded object) with ``"p":published_ms`` first."""
    return f"{_PREFIX}{published_ms},{rest[1:]}"


def _rest(context: MergedContext, limits: Limits) -> tuple[str, tuple[str, ...], bool]:
    """``(rest, dropped, memoizable)``: the encoded context without the publish time,
    through the memo keyed by content; ``memoizable`` is False when a value is not a
    plain scalar (it could change in place)."""
    key = _key(context, limits)
    cached = _encoded.get(key) if key is not None else None
    if cached is None:
        rest, dropped = encode(
            context.distinct_id,
            context.session_id,
            context.tags,
            dataclasses.replace(limits, max_bytes=limits.max_bytes - _P_RESERVE),
            window_id=context.window_id,
            groups=context.groups,
        )
        cached = (rest, tuple(dropped))
        if key is not None:
            if len(_encoded) >= _MAX_ENTRIES:
                _encoded.clear()
            _encoded[key] = cached
    return cached[0], cached[1], key is not None


_SCALARS = (str, int, float, bool, type(None))


def _key(context: MergedContext, limits: Limits) -> tuple[Any, ...] | None:
    """The memo key of ``context``; None (not memoized) when a tag or group value is not a
    plain scalar. Values go in with their exact type: ``1``, ``1.0`` and ``True`` are
    equal in Python but encode differently. Keys that never travel (``celery_*``, ``$``)
    are left out, so a task publishing subtasks still hits the memo."""
    items: list[Any] = []
    for mapping in (context.tags, context.groups):
        for name, value in mapping.items():
            if type(value) not in _SCALARS:
                return None
            if type(name) is str and name.startswith(("celery_", "$")):
                continue
            items.append((name, type(value), value))
        items.append(None)  # tags, then groups
    try:
        return (context.distinct_id, context.session_id, context.window_id, *items, limits)
    except TypeError:  # an ID of another type: never memoized
        return None


def decode_header(header: Any, signature: Any, secret: str | None, limits: Limits) -> WireContext:
    """:func:`~task_scopes.celery._header.decode`, memoized for headers that lead with
    the publish time. Raises :class:`~task_scopes.celery._header.WireError` as it does."""
    if type(header) is not str or not header.startswith(_PREFIX):
        return decode(header, signature, secret, limits)
    comma = header.find(",", len(_PREFIX))
    published = header[len(_PREFIX) : comma]
    if comma < 0 or not (published.isascii() and published.isdigit()) or len(published) > 16:
        return decode(header, signature, secret, limits)
    if secret is not None:
        check_signature(header, signature, secret)  # over the exact string received
    decoded = decode_rest(header[comma:], limits)
    # A copy with this message's publish time, made without the frozen dataclass's
    # __init__ (one object.__setattr__ per field): the same fields, one dict update.
    context = object.__new__(WireContext)
    context.__dict__.update(decoded.__dict__, published_ms=int(published))
    return context


def decode_rest(rest: str, limits: Limits) -> WireContext:
    """The context encoded as ``rest``, decoded through the memo; ``published_ms`` is
    None. ``rest`` is the encoding without the publish time: a :attr:`ContextHeader.rest`
    (``{...``), or a received header from the comma after its publish time (``,...``),
    which saves the worker a copy per task; its first character is not read. The object
    is shared by every caller: read it, never change it (it is frozen).

    Raises :class:`~task_scopes.celery._header.WireError` as
    :func:`~task_scopes.celery._header.decode` does.
    """
    entry = _decoded.get(rest)
    if entry is None or entry[0] is not limits:
        entry = (limits, decode("{" + rest[1:], None, None, limits))
        if len(_decoded) >= _MAX_ENTRIES:
            _decoded.clear()
        _decoded[rest] = entry
    return entry[1]
