"""Which apps are installed, with which options, and the client each one's task runs use."""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from celery import _state

from .._client import Client
from .._scope import get_global_scope
from ._header import Limits
from ._options import Options

__all__ = ["REGISTRY", "Installed"]

_UNSET = object()
# One client per distinct (api_key, host, client options): apps with equal settings share it.
_app_clients: dict[tuple[Any, ...], Client] = {}


@dataclass(frozen=True)
class Installed:
    """What ``install()`` decided for one app: its options and the caps of its header.

    ``headers``: the app's publish memo (active scopes' stamps -> encoded context, see
    :func:`~task_scopes.celery._memo.context_header`), dropped with this object when the
    app is installed again.
    """

    options: Options
    limits: Limits
    headers: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    # (the global scope's client when last asked, the answer then): client() is asked
    # once per task run, and the answer changes only with init().
    _client_for: list[tuple[Any, Client | None]] = field(
        default_factory=lambda: [(_UNSET, None)], compare=False, repr=False
    )

    @functools.cached_property
    def client_key(self) -> tuple[Any, ...] | None:
        """What makes two apps' clients the same; None without an API key."""
        options = self.options
        if options.api_key is None:
            return None
        return (options.api_key, options.host, tuple(options.client_options().items()))

    def client(self) -> Client | None:
        """The client to bind to this app's task runs; None without an API key (the
        scopes' client applies). The client of ``task_scopes.init()`` when it has the same
        API key and host, else one made from these options on first use."""
        bound = get_global_scope().client
        asked, answer = self._client_for[0]
        if asked is bound:
            return answer
        client = self._decide(bound)
        self._client_for[0] = (bound, client)
        return client

    def _decide(self, bound: Client | None) -> Client | None:
        options = self.options
        if options.api_key is None:
            return None
        if (
            bound is not None
            and bound.api_key == options.api_key
            and bound.host.rstrip("/") == options.host.rstrip("/")
        ):
            return bound
        key = self.client_key
        assert key is not None
        client = _app_clients.get(key)
        if client is None:
            with REGISTRY.lock:
                client = _app_clients.get(key)
                if client is None:
                    # Flushed at exit within task_scopes_shutdown_timeout: see
                    # _signals.flush_at_exit and the exit flush install() registers.
                    client = Client(options.api_key, options.host, **options.client_options())
                    _app_clients[key] = client
        return client


@dataclass
class _Registry:
    apps: weakref.WeakKeyDictionary[Any, Installed] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    last: Installed | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (weak reference to the app last installed, its Installed): for_task() is asked once
    # per task run, and a WeakKeyDictionary look-up makes a weak reference each time.
    _last_app: tuple[Any, Installed | None] = (lambda: None, None)

    def set_installed(self, app: Any, installed: Installed) -> None:
        """Record ``installed`` as ``app``'s, the last installed. Call with :attr:`lock`."""
        self.apps[app] = installed
        self.last = installed
        self._last_app = (weakref.ref(app), installed)

    def remove(self, app: Any) -> Installed | None:
        """Forget ``app``; returns what it had. Call with :attr:`lock` held."""
        installed = self.apps.pop(app, None)
        if installed is not None and self.last is installed:
            other = next(iter(self.apps.items()), None)
            self.last = other[1] if other is not None else None
            self._last_app = (
                (weakref.ref(other[0]), other[1]) if other is not None else (lambda: None, None)
            )
        return installed

    def unused_client(self, installed: Installed | None) -> Client | None:
        """Forget the client made for ``installed`` when no installed app shares its
        settings any more, and return it for the caller to shut down outside the lock.
        Call with :attr:`lock` held."""
        key = installed.client_key if installed is not None else None
        if key is None or any(i.client_key == key for i in self.apps.values()):
            return None
        return _app_clients.pop(key, None)

    def for_task(self, task: Any) -> Installed | None:
        """The options of the app ``task`` belongs to, or None when it is not installed."""
        app = getattr(task, "app", None) if task is not None else None
        if app is None:
            return None
        last_app, installed = self._last_app
        if last_app() is app:
            return installed
        return self.apps.get(app)

    def for_publish(self, task_name: Any) -> Installed | None:
        """The options for publishing ``task_name``, or None when its app is not installed.

        ``before_task_publish`` does not say which app publishes. The app that registers
        the task decides; a task no app registers (``send_task("name")``) goes with the
        current app if it is installed, else the last installed one.
        """
        active = _state._get_active_apps()
        if len(active) == 1 and len(self.apps) == 1 and self.last is not None:
            return self.last  # the usual process: one app, installed; it is the publisher
        registering = [app for app in active if task_name in getattr(app, "_tasks", ())]
        for app in registering:
            found = self.apps.get(app)
            if found is not None:
                return found
        if registering:
            return None
        return self.apps.get(_state.get_current_app()) or self.last


REGISTRY = _Registry()
