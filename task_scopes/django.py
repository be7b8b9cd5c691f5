"""Django middleware: each request runs in a fresh isolation scope from PostHog's tracing headers.

Add it near the top of ``MIDDLEWARE`` so the views and the middleware below it run inside
the request's scope::

    MIDDLEWARE = [
        "task_scopes.django.ContextMiddleware",
        ...
    ]

Settings (all optional):

==================================  ========================================================
``TASK_SCOPES_DISTINCT_ID_HEADER``  header carrying the distinct ID [``X-POSTHOG-DISTINCT-ID``]
``TASK_SCOPES_SESSION_ID_HEADER``   header carrying the session ID [``X-POSTHOG-SESSION-ID``]
``TASK_SCOPES_WINDOW_ID_HEADER``    header carrying the window ID [``X-POSTHOG-WINDOW-ID``]
``TASK_SCOPES_CAPTURE_EXCEPTIONS``  capture a view's unhandled exception [True]
``TASK_SCOPES_EXTRA_TAGS``          ``(request) -> dict`` or its dotted path: more tags [None]
==================================  ========================================================

The middleware is sync and async capable: under ASGI with an async chain it stays async.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import (
    BadRequest,
    DisallowedHost,
    ImproperlyConfigured,
    PermissionDenied,
    SuspiciousOperation,
)
from django.http import FileResponse, Http404, HttpRequest, StreamingHttpResponse
from django.http.multipartparser import MultiPartParserError
from django.http.response import HttpResponseBase
from django.utils.module_loading import import_string

from ._internal import guard
from ._scope import active_isolation_scope
from ._web import (
    DEFAULT_DISTINCT_ID_HEADER,
    DEFAULT_SESSION_ID_HEADER,
    DEFAULT_WINDOW_ID_HEADER,
    RequestScope,
    WebOptions,
    scoped_aiter,
    scoped_iter,
)

__all__ = ["ContextMiddleware"]

_SETTINGS = {
    "distinct_id_header": "TASK_SCOPES_DISTINCT_ID_HEADER",
    "session_id_header": "TASK_SCOPES_SESSION_ID_HEADER",
    "window_id_header": "TASK_SCOPES_WINDOW_ID_HEADER",
    "capture_exceptions": "TASK_SCOPES_CAPTURE_EXCEPTIONS",
    "extra_tags": "TASK_SCOPES_EXTRA_TAGS",
}

# Exceptions Django turns into 4xx responses itself: control flow, not failures.
_NOT_FAILURES = (Http404, PermissionDenied, BadRequest, SuspiciousOperation, MultiPartParserError)

_ATTR = "_task_scopes_request_scope"

GetResponse = Callable[[HttpRequest], HttpResponseBase]
AsyncGetResponse = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


def _options_from_settings() -> WebOptions:
    extra_tags: object = getattr(settings, _SETTINGS["extra_tags"], None)
    if isinstance(extra_tags, str):
        try:
            extra_tags = import_string(extra_tags)
        except ImportError as exc:
            raise ImproperlyConfigured(f"{_SETTINGS['extra_tags']}: {exc}") from exc
    try:
        return WebOptions.build(
            distinct_id_header=getattr(
                settings, _SETTINGS["distinct_id_header"], DEFAULT_DISTINCT_ID_HEADER
            ),
            session_id_header=getattr(
                settings, _SETTINGS["session_id_header"], DEFAULT_SESSION_ID_HEADER
            ),
            window_id_header=getattr(
                settings, _SETTINGS["window_id_header"], DEFAULT_WINDOW_ID_HEADER
            ),
            capture_exceptions=getattr(settings, _SETTINGS["capture_exceptions"], True),
            extra_tags=extra_tags,
            names=_SETTINGS,
        )
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(str(exc)) from exc


class ContextMiddleware:
    """Run each Django request in its own fresh isolation scope.

    The scope is identified from the distinct ID, session ID and window ID headers
    (control characters stripped, capped at 200 characters; absent headers give personless
    events, a window ID becomes ``$window_id``),
    tagged with ``$current_url`` and ``$request_method``, and stays active while a
    ``StreamingHttpResponse`` body is produced. A view's unhandled exception reaches
    :meth:`process_exception`, which captures it once as ``$exception`` in the request's
    scope and lets Django go on handling it unchanged (``Http404``, ``PermissionDenied``
    and the other exceptions Django answers with a 4xx are not captured).

    Args:
        get_response: the next handler in Django's middleware chain, sync or async.

    Raises:
        ImproperlyConfigured: an invalid ``TASK_SCOPES_*`` setting, naming it.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse | AsyncGetResponse) -> None:
        self.get_response = get_response
        self.options = _options_from_settings()
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            # Tells Django this instance is a coroutine function (its async path).
            markcoroutinefunction(self)

    def _open(self, request: HttpRequest) -> RequestScope:
        url: str | None = None
        with guard("django request url"):
            try:
                url = request.build_absolute_uri()
            except DisallowedHost:  # Django answers 400 later; still tag what we know
                url = request.get_full_path()
        request_scope = self.options.open(
            request,
            get_header=request.headers.get,
            url=url,
            method=request.method,
            mechanism="django",
        )
        setattr(request, _ATTR, request_scope)
        return request_scope

    def __call__(self, request: HttpRequest) -> Any:
        if self._is_async:
            return self.__acall__(request)
        request_scope: RequestScope | None = None
        with guard("django ContextMiddleware"):
            request_scope = self._open(request)
        if request_scope is None:
            return self.get_response(request)
        with request_scope.activate():
            response = self.get_response(request)
        return self._scope_stream(response, request_scope)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        request_scope: RequestScope | None = None
        with guard("django ContextMiddleware"):
            request_scope = self._open(request)
        get_response = cast(AsyncGetResponse, self.get_response)
        if request_scope is None:
            return await get_response(request)
        with request_scope.activate():
            response = await get_response(request)
        return self._scope_stream(response, request_scope)

    def _scope_stream(
        self, response: HttpResponseBase, request_scope: RequestScope
    ) -> HttpResponseBase:
        # A streamed body runs view code after this middleware returned; keep it scoped.
        # FileResponse only reads a file, and replacing its content would turn off the
        # server's sendfile path (wsgi.file_wrapper).
        if isinstance(response, StreamingHttpResponse) and not isinstance(response, FileResponse):
            with guard("django streaming response"):
                if response.is_async:
                    response.streaming_content = scoped_aiter(
                        response.streaming_content, request_scope
                    )
                else:
                    response.streaming_content = scoped_iter(
                        response.streaming_content, request_scope
                    )
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """Capture a view's unhandled exception in the request's scope; never handles it.

        Returns None, so Django goes on with its own handling (the exception is left
        unchanged: the 500 page, ``got_request_exception``, the test client re-raising).
        """
        request_scope: RequestScope | None = getattr(request, _ATTR, None)
        if request_scope is None or not request_scope.capture_exceptions:
            return
        if isinstance(exception, _NOT_FAILURES):
            return
        with guard("django process_exception"):
            # Django calls this from inside __call__ / __acall__ (under ASGI in a worker
            # thread with a copy of the context), so the scope is normally active already;
            # re-activating it is the safety net for a chain that lost the context.
            if active_isolation_scope() is request_scope.isolation:
                request_scope.capture(exception)
            else:
                with request_scope.activate():
                    request_scope.capture(exception)
