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
    try:
        key: Any = (
            context.distinct_id,
            context.session_id,
            context.window_id,
            tuple(context.tags.items()),
            tuple(context.groups.items()),
            limits,
        )
        cached = _encoded.get(key)
    except TypeError:  # an unhashable tag value (a list, a dict): encoded every time
        key = cached = None
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
