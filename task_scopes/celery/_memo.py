"""Memos of the context header on the hot paths.

One web request publishes many tasks with the same context, and a worker receives many
messages with the same context, so each side keeps the last few hundred encodings. Only
the publish time differs between them: the producer writes it first, ``{"p":<ms>,...``,
in front of the memoized rest (JSON objects are unordered, and a signature covers the
exact string sent), and the worker splits it off before looking the rest up. A header in
any other form (another producer, an older version) is decoded in full.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .._scope import MergedContext
from ._header import Limits, WireContext, check_signature, decode, encode

__all__ = ["decode_header", "publish_header"]

_PREFIX = '{"p":'
_P_RESERVE = 24  # bytes kept free under the cap for '"p":' + the milliseconds + ','
_MAX_ENTRIES = 256  # per memo; a full memo is emptied (each request's context is new)

_encoded: dict[Any, tuple[str, tuple[str, ...]]] = {}
_decoded: dict[tuple[str, Limits], WireContext] = {}


def publish_header(
    context: MergedContext, limits: Limits, published_ms: int
) -> tuple[str, list[str]]:
    """``(header, dropped)`` for a task published now from ``context``: as
    :func:`~task_scopes.celery._header.encode` gives them, the publish time first."""
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
    rest, dropped_keys = cached
    return f"{_PREFIX}{published_ms},{rest[1:]}", list(dropped_keys)


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
    rest = "{" + header[comma + 1 :]
    context = _decoded.get((rest, limits))
    if context is None:
        context = decode(rest, None, None, limits)
        if len(_decoded) >= _MAX_ENTRIES:
            _decoded.clear()
        _decoded[(rest, limits)] = context
    return WireContext(
        context.distinct_id,
        context.session_id,
        context.tags,
        context.window_id,
        context.groups,
        int(published),
    )
