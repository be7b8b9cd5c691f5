"""WSGI middleware: each request runs in a fresh isolation scope from PostHog's tracing headers.

Example (Flask)::

    from flask import Flask
    from task_scopes.wsgi import ContextMiddleware

    app = Flask(__name__)
    app.wsgi_app = ContextMiddleware(app.wsgi_app)

Flask turns a view's exception into a 500 response itself (unless ``PROPAGATE_EXCEPTIONS``),
so it never reaches a WSGI middleware; to capture those, connect Flask's
``got_request_exception`` signal to :func:`task_scopes.capture_exception` as the README shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING
from wsgiref.util import request_uri

from ._internal import guard
from ._web import MiddlewareBase, RequestScope, scoped_iter

if TYPE_CHECKING:
    from _typeshed.wsgi import (  # WSGIApplication: in the quoted base class below
        StartResponse,
        WSGIApplication,  # noqa: F401
        WSGIEnvironment,
    )

__all__ = ["ContextMiddleware"]


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


class ContextMiddleware(MiddlewareBase["WSGIApplication", "WSGIEnvironment"]):
    """Wrap a WSGI application so each request runs in its own fresh isolation scope.

    The scope is identified from the distinct ID, session ID and window ID headers
    (control characters stripped, capped at 200 characters; absent headers give personless
    events, a window ID becomes ``$window_id``)
    and tagged with ``$current_url`` and ``$request_method``. It stays active while the
    server iterates a streamed response body, and is never visible to the caller or to
    the next request on the same thread.

    Args:
        app: the WSGI application to wrap.
        distinct_id_header: header carrying the distinct ID; default ``X-POSTHOG-DISTINCT-ID``.
        session_id_header: header carrying the session ID; default ``X-POSTHOG-SESSION-ID``.
        window_id_header: header carrying posthog-js's window ID; default
            ``X-POSTHOG-WINDOW-ID``.
        capture_exceptions: capture an exception escaping ``app`` (or its response body)
            as ``$exception`` once, then re-raise it unchanged.
        extra_tags: ``(environ) -> Mapping | None`` returning more tags for the request.

    Raises:
        ValueError / TypeError: invalid options, naming the option.

    Example::

        app.wsgi_app = ContextMiddleware(app.wsgi_app, extra_tags=lambda env: {"tenant": "a"})
        # in a view, with X-POSTHOG-DISTINCT-ID: user-1 on the request:
        task_scopes.capture("page viewed")      # distinct_id "user-1", tenant "a"
    """

    def _open(self, environ: WSGIEnvironment) -> RequestScope:
        def get_header(name: str) -> str | None:
            value = environ.get(_environ_key(name))
            return value if isinstance(value, str) else None

        url: str | None = None
        with guard("wsgi request_uri"):
            url = request_uri(environ, include_query=True)
        return self.options.open(
            environ,
            get_header=get_header,
            url=url,
            method=environ.get("REQUEST_METHOD"),
            mechanism="wsgi",
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request_scope: RequestScope | None = None
        with guard("wsgi ContextMiddleware"):
            request_scope = self._open(environ)
        if request_scope is None:
            return self.app(environ, start_response)
        with request_scope.activate():
            result = self.app(environ, start_response)
        if isinstance(result, (list, tuple)):
            return result  # already produced: no application code runs while it is sent
        return _ScopedResponse(result, request_scope)


class _ScopedResponse:
    """A response body iterated (and closed) with the request's scope active.

    A class rather than a bare generator so ``close()`` reaches the application's iterable
    even when the server never starts iterating (PEP 3333).
    """

    __slots__ = ("_iterator", "_request_scope", "_result")

    def __init__(self, result: Iterable[bytes], request_scope: RequestScope) -> None:
        self._result = result
        self._request_scope = request_scope
        self._iterator: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        if self._iterator is None:
            self._iterator = scoped_iter(self._result, self._request_scope)
        return self._iterator

    def close(self) -> None:
        close = getattr(self._result, "close", None)
        if close is not None:
            with self._request_scope.activate():
                close()
