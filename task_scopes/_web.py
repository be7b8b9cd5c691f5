"""What the WSGI, ASGI and Django middleware share: header parsing and the request scope.

A browser running posthog-js with tracing headers sends ``X-POSTHOG-DISTINCT-ID``,
``X-POSTHOG-SESSION-ID`` and ``X-POSTHOG-WINDOW-ID`` (its ``tracing_headers`` option). Each
request runs in a *fresh* isolation scope identified from them (the window ID becomes
``$window_id``, which links events to a session replay window) and tagged with
``$current_url`` and ``$request_method``; an exception escaping the application can be
captured (once) and is re-raised unchanged. The IDs reach the tasks the request publishes.

Header values are untrusted input: control characters are stripped, surrounding blanks
trimmed, and the result capped at :data:`MAX_ID_CHARS` characters; an empty result counts
as absent, so the request's events are personless.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

from . import _api
from ._internal import guard
from ._json import strip_control
from ._scope import Scope, Tokens, enter_scope, exit_scope

__all__ = [
    "DEFAULT_DISTINCT_ID_HEADER",
    "DEFAULT_SESSION_ID_HEADER",
    "DEFAULT_WINDOW_ID_HEADER",
    "MAX_ID_CHARS",
    "MAX_URL_CHARS",
    "RequestScope",
    "WebOptions",
    "clean_header_value",
    "scoped_aiter",
    "scoped_iter",
]

DEFAULT_DISTINCT_ID_HEADER = "X-POSTHOG-DISTINCT-ID"
DEFAULT_SESSION_ID_HEADER = "X-POSTHOG-SESSION-ID"
DEFAULT_WINDOW_ID_HEADER = "X-POSTHOG-WINDOW-ID"
MAX_ID_CHARS = 200
# PostHog does not cap $current_url; a bound keeps one hostile request from making every
# event of that request (and the task headers it publishes) huge.
MAX_URL_CHARS = 2_000

# RFC 9110 token characters: what a header field name may be made of.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

T = TypeVar("T")


def clean_header_value(raw: str | bytes | None, max_chars: int = MAX_ID_CHARS) -> str | None:
    """Turn a raw header value into an ID: decoded, control characters removed, capped.

    Args:
        raw: the value as the server gave it: bytes (ASGI), or a str holding the bytes as
            latin-1 (WSGI, PEP 3333); None when the header is absent.
        max_chars: cap of the result, in characters.

    Returns:
        The cleaned value (UTF-8 decoded when the bytes are valid UTF-8, latin-1
        otherwise), or None when nothing is left.
    """
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            text = _decode(raw.encode("latin-1"))
        except UnicodeEncodeError:  # already real text (some servers decode for us)
            text = raw
    else:
        text = _decode(raw)
    text = strip_control(text).strip()[:max_chars].strip()
    return text or None


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _check_header_name(value: object, key: str) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ValueError(f"{key} must be an HTTP header name (letters, digits, '-'), got {value!r}")
    return value


@dataclass(frozen=True)
class WebOptions:
    """Validated middleware options, shared by the WSGI, ASGI and Django middleware.

    Attributes:
        distinct_id_header: name of the header carrying the distinct ID (any case).
        session_id_header: name of the header carrying the session ID (any case).
        window_id_header: name of the header carrying posthog-js's window ID (any case).
        capture_exceptions: capture an exception escaping the application as
            ``$exception`` (once), then re-raise it unchanged.
        extra_tags: called with the framework's request object (WSGI environ, ASGI scope,
            Django ``HttpRequest``) inside the request's scope; the mapping it returns
            becomes tags of the request. None: no extra tags.
    """

    distinct_id_header: str = DEFAULT_DISTINCT_ID_HEADER
    session_id_header: str = DEFAULT_SESSION_ID_HEADER
    window_id_header: str = DEFAULT_WINDOW_ID_HEADER
    capture_exceptions: bool = True
    extra_tags: Callable[[Any], Mapping[str, Any] | None] | None = None

    @classmethod
    def build(
        cls,
        *,
        distinct_id_header: object = DEFAULT_DISTINCT_ID_HEADER,
        session_id_header: object = DEFAULT_SESSION_ID_HEADER,
        window_id_header: object = DEFAULT_WINDOW_ID_HEADER,
        capture_exceptions: object = True,
        extra_tags: object = None,
        names: Mapping[str, str] | None = None,
    ) -> WebOptions:
        """Validate the options and return them frozen.

        Args:
            names: how to call each option in error messages (Django: setting names).

        Raises:
            ValueError: a header name is not a valid HTTP field name.
            TypeError: ``capture_exceptions`` is not a bool, ``extra_tags`` not callable.
        """
        names = names or {}

        def key(option: str) -> str:
            return names.get(option, option)

        if not isinstance(capture_exceptions, bool):
            raise TypeError(
                f"{key('capture_exceptions')} must be True or False, got {capture_exceptions!r}"
            )
        if extra_tags is not None and not callable(extra_tags):
            raise TypeError(f"{key('extra_tags')} must be callable or None, got {extra_tags!r}")
        return cls(
            distinct_id_header=_check_header_name(distinct_id_header, key("distinct_id_header")),
            session_id_header=_check_header_name(session_id_header, key("session_id_header")),
            window_id_header=_check_header_name(window_id_header, key("window_id_header")),
            capture_exceptions=capture_exceptions,
            extra_tags=extra_tags,
        )

    def open(
        self,
        request: object,
        *,
        get_header: Callable[[str], str | bytes | None],
        url: str | None,
        method: str | None,
        mechanism: str,
    ) -> RequestScope:
        """Build the fresh isolation scope of one request (not yet active).

        Args:
            request: the framework's request object, handed to ``extra_tags``.
            get_header: looks a header up by the configured name; None when absent.
            url: absolute URL of the request (``$current_url``), or None.
            method: HTTP method (``$request_method``), or None.
            mechanism: ``$exception_list`` mechanism type for captured exceptions.
        """
        scope = Scope(
            distinct_id=clean_header_value(get_header(self.distinct_id_header)),
            session_id=clean_header_value(get_header(self.session_id_header)),
            window_id=clean_header_value(get_header(self.window_id_header)),
        )
        if url:
            scope.set_tag("$current_url", strip_control(url)[:MAX_URL_CHARS])
        if method:
            scope.set_tag("$request_method", method)
        request_scope = RequestScope(
            scope, capture_exceptions=self.capture_exceptions, mechanism=mechanism
        )
        if self.extra_tags is not None:
            # The user's callback runs inside the request's scope so it may read it (and call
            # tag()); a bug in it must not fail the request, nor be captured as the app's.
            tokens = enter_scope(scope, request_scope._current)
            try:
                with guard("web extra_tags callback"):
                    for k, v in (self.extra_tags(request) or {}).items():
                        scope.set_tag(str(k), v)
            finally:
                exit_scope(tokens)
        return request_scope


App = TypeVar("App")
Request = TypeVar("Request")


class MiddlewareBase(Generic[App, Request]):
    """The constructor the WSGI and ASGI middleware share: the wrapped app and its options.

    Args:
        app: the application to wrap.
        distinct_id_header: header carrying the distinct ID (any case).
        session_id_header: header carrying the session ID (any case).
        window_id_header: header carrying posthog-js's window ID (any case).
        capture_exceptions: capture an exception escaping the app once, then re-raise it.
        extra_tags: ``(request) -> mapping | None``, more tags for the request.

    Raises:
        ValueError / TypeError: an invalid option, naming it.
    """

    def __init__(
        self,
        app: App,
        *,
        distinct_id_header: str = DEFAULT_DISTINCT_ID_HEADER,
        session_id_header: str = DEFAULT_SESSION_ID_HEADER,
        window_id_header: str = DEFAULT_WINDOW_ID_HEADER,
        capture_exceptions: bool = True,
        extra_tags: Callable[[Request], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.app = app
        self.options = WebOptions.build(
            distinct_id_header=distinct_id_header,
            session_id_header=session_id_header,
            window_id_header=window_id_header,
            capture_exceptions=capture_exceptions,
            extra_tags=extra_tags,
        )


class RequestScope:
    """The isolation scope of one request; ``activate()`` makes it active for a block.

    A request may need its scope active more than once: around the application call and
    around each chunk of a streamed response body, which the server pulls after the
    application returned. Every activation restores exactly what was active before it.
    """

    __slots__ = ("_current", "capture_exceptions", "isolation", "mechanism")

    def __init__(self, isolation: Scope, *, capture_exceptions: bool, mechanism: str) -> None:
        self.isolation = isolation
        self._current = Scope()
        self.capture_exceptions = capture_exceptions
        self.mechanism = mechanism

    def activate(self) -> _Activation:
        """Context manager: the request's scope is active inside the block.

        An ``Exception`` escaping the block is captured (when ``capture_exceptions``)
        while the scope is still active, then propagates unchanged.
        """
        return _Activation(self)

    def capture(self, exc: BaseException) -> None:
        """Capture ``exc`` as an unhandled ``$exception`` with the default client (once)."""
        with guard(f"{self.mechanism} capture_exception"):
            _api.get_client().capture_exception(exc, mechanism=self.mechanism, handled=False)


_GUARD_ACTIVATE = guard("web enter_scope")


class _Activation:
    __slots__ = ("_request_scope", "_tokens")

    def __init__(self, request_scope: RequestScope) -> None:
        self._request_scope = request_scope
        self._tokens: Tokens | None = None

    def __enter__(self) -> Scope:
        rs = self._request_scope
        try:
            self._tokens = enter_scope(rs.isolation, rs._current)
        except Exception:
            _GUARD_ACTIVATE.failed()  # our bug: logged; the request runs unscoped
        return rs.isolation

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Never returns True: the application's exception always propagates unchanged.
        try:
            if isinstance(exc, Exception) and self._request_scope.capture_exceptions:
                self._request_scope.capture(exc)
        finally:
            tokens, self._tokens = self._tokens, None
            if tokens is not None:
                with guard("web exit_scope"):
                    exit_scope(tokens)


def scoped_iter(iterable: Iterable[T], request_scope: RequestScope) -> Iterator[T]:
    """Iterate ``iterable`` with the request's scope active while each item is produced.

    Streamed response bodies run application code after the application returned; this
    keeps their captures attributed to the request. An exception is captured (when
    enabled) and re-raised. Closing ``iterable`` stays the caller's job (the frameworks
    already hold on to its ``close``).
    """
    iterator = iter(iterable)
    while True:
        with request_scope.activate():
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


async def scoped_aiter(iterable: AsyncIterable[T], request_scope: RequestScope) -> AsyncIterator[T]:
    """Async variant of :func:`scoped_iter` for async streamed bodies (Django under ASGI)."""
    iterator = aiter(iterable)
    while True:
        with request_scope.activate():
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
        yield item
