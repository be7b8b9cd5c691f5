"""task_scopes: user context that survives the trip through a task queue.

Scopes in the shape of sentry-python 2.x with PostHog v6 names, an event client speaking
PostHog's capture format, and a Celery plugin (``task_scopes.celery``) that carries the
distinct ID, session ID and tags of the caller into the worker.
"""

from ._api import (
    capture,
    capture_exception,
    flush,
    get_client,
    get_context_distinct_id,
    get_context_groups,
    get_context_session_id,
    get_tags,
    identify_context,
    init,
    new_context,
    scoped,
    set,
    set_context_groups,
    set_context_session,
    set_once,
    shutdown,
    tag,
)
from ._blocks import isolation_scope, new_scope, use_isolation_scope
from ._client import Client, ClientStats
from ._scope import Scope, get_current_scope, get_global_scope, get_isolation_scope
from ._transport import HttpTransport, InMemoryTransport, JsonlTransport, Transport
from ._version import __version__

__all__ = [
    "Client",
    "ClientStats",
    "HttpTransport",
    "InMemoryTransport",
    "JsonlTransport",
    "Scope",
    "Transport",
    "__version__",
    "capture",
    "capture_exception",
    "flush",
    "get_client",
    "get_context_distinct_id",
    "get_context_groups",
    "get_context_session_id",
    "get_current_scope",
    "get_global_scope",
    "get_isolation_scope",
    "get_tags",
    "identify_context",
    "init",
    "isolation_scope",
    "new_context",
    "new_scope",
    "scoped",
    "set",
    "set_context_groups",
    "set_context_session",
    "set_once",
    "shutdown",
    "tag",
    "use_isolation_scope",
]
