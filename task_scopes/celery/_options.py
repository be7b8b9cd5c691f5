"""Options of the Celery plugin, parsed once from ``app.conf`` into a frozen object.

Settings are the lowercase ``task_scopes_*`` keys of ``app.conf`` (so Django's
``CELERY_TASK_SCOPES_*`` works through ``config_from_object(..., namespace="CELERY")``);
keyword overrides to ``install()`` are named without the prefix. Invalid values raise
:class:`ConfigError` naming the key: the only place the plugin raises on purpose.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import _defaults, _validate
from ._header import Limits

__all__ = ["PREFIX", "ConfigError", "Options"]

PREFIX = "task_scopes_"


class ConfigError(ValueError):
    """A ``task_scopes_*`` setting (or ``install()`` keyword) has an invalid value."""


TaskFilter = Callable[[str], bool]


@dataclass(frozen=True)
class Options:
    """Validated plugin options; see the settings table in ``task_scopes.celery``."""

    api_key: str | None = None
    host: str = _defaults.HOST
    enabled: bool = True
    propagate: bool = True
    capture_exceptions: bool = True
    capture_retries: bool = False
    task_events: bool = False
    task_filter: TaskFilter | None = None
    posthog_headers: bool = False
    secret: str | None = None
    max_header_bytes: int = _defaults.MAX_HEADER_BYTES
    max_tags: int = _defaults.MAX_TAGS
    max_key_chars: int = _defaults.MAX_KEY_CHARS
    max_value_chars: int = _defaults.MAX_VALUE_CHARS
    encode_bytes: bool = False
    flush_at: int = _defaults.FLUSH_AT
    flush_interval: float = _defaults.FLUSH_INTERVAL
    max_queue_size: int = _defaults.MAX_QUEUE_SIZE
    timeout: float = _defaults.TIMEOUT
    retry_window: float = _defaults.RETRY_WINDOW
    shutdown_timeout: float = _defaults.SHUTDOWN_TIMEOUT

    @classmethod
    def from_app(cls, app: Any, overrides: Mapping[str, Any] | None = None) -> Options:
        """Read every ``task_scopes_*`` key of ``app.conf``, then apply ``overrides``.

        Raises:
            ConfigError: unknown key, wrong type or out-of-range value, naming the key.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        raw: dict[str, tuple[str, Any]] = {}
        conf = app.conf
        namespace = getattr(app, "namespace", None)  # config_from_object(namespace="CELERY")
        namespaced = f"{namespace}_{PREFIX}".lower() if namespace else None
        for key in list(conf.keys()):
            if not isinstance(key, str):
                continue
            lowered = key.lower()
            if lowered.startswith(PREFIX):
                name = lowered[len(PREFIX) :]
            elif namespaced and lowered.startswith(namespaced):
                name = lowered[len(namespaced) :]
            else:
                continue
            if name not in names:
                raise ConfigError(f"{key}: unknown setting")
            raw[name] = (key, conf[key])
        for name, value in (overrides or {}).items():
            if name not in names:
                raise ConfigError(f"install({name}=...): unknown option")
            raw[name] = (f"install({name}=...)", value)
        values = {name: _parse(name, key, value) for name, (key, value) in raw.items()}
        return cls(**values)

    @functools.cached_property
    def limits(self) -> Limits:
        """The caps of the context header these settings imply."""
        return Limits(
            max_bytes=self.max_header_bytes,
            max_tags=self.max_tags,
            max_key_chars=self.max_key_chars,
            max_value_chars=self.max_value_chars,
            encode_bytes=self.encode_bytes,
        )

    def client_options(self) -> dict[str, Any]:
        """Keyword options of :class:`task_scopes.Client` these settings imply."""
        return {
            "flush_at": self.flush_at,
            "flush_interval": self.flush_interval,
            "max_queue_size": self.max_queue_size,
            "timeout": self.timeout,
            "retry_window": self.retry_window,
        }


_BOOLS = {
    "enabled",
    "propagate",
    "capture_exceptions",
    "capture_retries",
    "task_events",
    "posthog_headers",
    "encode_bytes",
}
_POSITIVE_INTS = {
    "max_header_bytes",
    "max_tags",
    "max_key_chars",
    "max_value_chars",
    "flush_at",
    "max_queue_size",
}
_POSITIVE_FLOATS = {"flush_interval", "timeout", "retry_window", "shutdown_timeout"}


def _parse(name: str, key: str, value: Any) -> Any:
    try:
        return _check(name, key, value)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None


def _check(name: str, key: str, value: Any) -> Any:
    if name in _BOOLS:
        return _validate.boolean(key, value)
    if name in _POSITIVE_INTS:
        value = _validate.count(key, value)
        if name == "max_header_bytes" and value < 256:
            raise ConfigError(f"{key}: expected at least 256 bytes, got {value!r}")
        return value
    if name in _POSITIVE_FLOATS:
        return _validate.seconds(key, value)
    if name in {"api_key", "secret"}:
        return _validate.optional_text(key, value)
    if name == "host":
        return _validate.http_url(key, value)
    if name == "task_filter":
        return _task_filter(key, value)
    raise ConfigError(f"{key}: unknown setting")  # pragma: no cover - names checked above


def _task_filter(key: str, value: Any) -> TaskFilter | None:
    if value is None or callable(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, str):
        from kombu.utils.imports import symbol_by_name

        try:
            func = symbol_by_name(value)  # type: ignore[no-untyped-call,unused-ignore]  # kombu 5.3 has no types
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot import {value!r}: {exc}") from exc
        if callable(func):
            return func  # type: ignore[no-any-return]
    raise ConfigError(f"{key}: expected a callable or a dotted path to one, got {value!r}")
