"""ASGI 3 middleware: each HTTP request runs in a fresh isolation scope from tracing headers.

Example (FastAPI / Starlette)::

    from fastapi import FastAPI
    from task_scopes.asgi import ContextMiddleware

    app = FastAPI()
    app.add_middleware(ContextMiddleware)

Only ``http`` connections are scoped; ``lifespan`` and ``websocket`` pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote

from ._internal import guard
from ._web import MiddlewareBase, RequestScope

__all__ = ["ContextMiddleware"]

ASGIScope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, Receive, Send], Awaitable[None]]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _header_map(scope: ASGIScope) -> dict[bytes, bytes]:
    """Lower-cased header name -> value; the first of repeated headers wins."""
    return {key.lower(): value for key, value in reversed(list(scope.get("headers") or ()))}


def _request_url(scope: ASGIScope, headers: Mapping[bytes, bytes]) -> str:
    """Absolute URL of an HTTP scope, built the way ``wsgiref.util.request_uri`` does."""
    scheme = scope.get("scheme") or "http"
    host_header = headers.get(b"host")
    if host_header:
        host = host_header.decode("latin-1")
    else:
        server = scope.get("server")
        if server:
            name, port = server[0], server[1]
            default = _DEFAULT_PORTS.get(scheme)
            host = name if port is None or port == default else f"{name}:{port}"
        else:
            host = "localhost"
    path = quote(scope.get("root_path", "") + scope.get("path", ""), safe="/;=,")
    url = f"{scheme}://{host}{path or '/'}"
    query = scope.get("query_string") or b""
    if query:
        url += "?" + query.decode("latin-1")
    return url


class ContextMiddleware(MiddlewareBase[ASGIApp, ASGIScope]):
    """Wrap an ASGI 3 application so each HTTP request runs in its own fresh isolation scope.

    The scope is identified from the distinct ID, session ID and window ID headers
    (control characters stripped, capped at 200 characters; absent headers give personless
    events, a window ID becomes ``$window_id``),
    tagged with ``$current_url`` and ``$request_method``, and stays active for the whole
    request, streamed response body included. Tasks and threads the application starts
    from the request (``asyncio.create_task``, ``run_in_threadpool``) copy it.

    Args:
        app: the ASGI application to wrap.
        distinct_id_header: header carrying the distinct ID; default ``X-POSTHOG-DISTINCT-ID``.
        session_id_header: header carrying the session ID; default ``X-POSTHOG-SESSION-ID``.
        window_id_header: header carrying posthog-js's window ID; default
            ``X-POSTHOG-WINDOW-ID``.
        capture_exceptions: capture an exception escaping ``app`` as ``$exception`` once,
            then re-raise it unchanged.
        extra_tags: ``(asgi_scope) -> Mapping | None`` returning more tags for the request.

    Raises:
        ValueError / TypeError: invalid options, naming the option.

    Example::

        app.add_middleware(ContextMiddleware, distinct_id_header="X-User-Id")

        @app.post("/orders")
        async def create_order():
            task_scopes.capture("order placed")   # distinct_id from X-User-Id
    """

    def _open(self, scope: ASGIScope) -> RequestScope:
        headers = _header_map(scope)

        def get_header(name: str) -> bytes | None:
            return headers.get(name.lower().encode("latin-1"))

        url: str | None = None
        with guard("asgi request url"):
            url = _request_url(scope, headers)
        return self.options.open(
            scope, get_header=get_header, url=url, method=scope.get("method"), mechanism="asgi"
        )

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        request_scope: RequestScope | None = None
        with guard("asgi ContextMiddleware"):
            request_scope = self._open(scope)
        if request_scope is None:
            await self.app(scope, receive, send)
            return
        # ASGI servers run each request in its own asyncio task, so the ContextVar set/reset
        # pair stays inside one Context; the streamed body is sent within this await.
        with request_scope.activate():
            await self.app(scope, receive, send)
