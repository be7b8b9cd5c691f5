"""Options are type- and range-checked where users pass them: ``Client``, ``init()`` and
the Celery plugin's ``app.conf``, with one set of checks; the error names the option."""

from __future__ import annotations

import math
from typing import Any

import pytest
from celery import Celery

import task_scopes
from task_scopes import Client, InMemoryTransport
from task_scopes.celery import ConfigError, Options

URL = "http://127.0.0.1:1"

# (option, bad value, the exception it raises)
BAD_CLIENT_OPTIONS: list[tuple[str, Any, type[Exception]]] = [
    ("flush_at", "10", TypeError),
    ("flush_at", 0, ValueError),
    ("flush_at", 2.5, TypeError),
    ("flush_at", True, TypeError),
    ("flush_interval", math.inf, ValueError),
    ("flush_interval", math.nan, ValueError),
    ("flush_interval", 0, ValueError),
    ("flush_interval", "0.5", TypeError),
    ("max_queue_size", 0, ValueError),
    ("max_queue_size", None, TypeError),
    ("timeout", 0, ValueError),
    ("timeout", -1, ValueError),
    ("timeout", math.inf, ValueError),
    ("retry_window", -5.0, ValueError),
    ("retry_window", math.nan, ValueError),
    ("max_retries", -1, ValueError),
    ("max_retries", "3", TypeError),
    ("host", "eu.i.posthog.com", ValueError),
    ("host", "http://", ValueError),
    ("host", "ftp://example.com", ValueError),
    ("host", "https://exa mple.com", ValueError),
    ("host", "http://127.0.0.1:99999", ValueError),
    ("host", None, TypeError),
    ("api_key", 123, TypeError),
    ("api_key", "", ValueError),
    ("gzip", "yes", TypeError),
    ("disabled", 1, TypeError),
    ("debug", "false", TypeError),
    ("before_send", "drop_everything", TypeError),
    ("transport", "memory", TypeError),
    ("transport", object(), TypeError),
]
IDS = [f"{name}={value!r}" for name, value, _ in BAD_CLIENT_OPTIONS]


@pytest.mark.parametrize(("name", "value", "error"), BAD_CLIENT_OPTIONS, ids=IDS)
def test_client_refuses_a_bad_option_naming_it(
    name: str, value: Any, error: type[Exception]
) -> None:
    options: dict[str, Any] = {"api_key": "phc_test", "host": URL, name: value}
    with pytest.raises(error, match=rf"^{name}: "):
        Client(**options)


# init(host=None) means the default host
INIT_OPTIONS = [o for o in BAD_CLIENT_OPTIONS if o[:2] != ("host", None)]


@pytest.mark.parametrize(
    ("name", "value", "error"), INIT_OPTIONS, ids=[f"{n}={v!r}" for n, v, _ in INIT_OPTIONS]
)
def test_init_refuses_a_bad_option_naming_it_and_keeps_the_bound_client(
    name: str, value: Any, error: type[Exception]
) -> None:
    scope = task_scopes.get_global_scope()
    before = scope.client
    options: dict[str, Any] = {"api_key": "phc_test", "host": URL, name: value}
    try:
        with pytest.raises(error, match=rf"^{name}: "):
            task_scopes.init(**options)
        assert scope.client is before
    finally:
        scope.set_client(before)


def test_client_accepts_good_values_and_converts_seconds_to_float() -> None:
    client = Client(
        "phc_test",
        "https://eu.i.posthog.com/",
        flush_at=1,
        flush_interval=2,
        max_queue_size=1,
        timeout=0.5,
        max_retries=0,
        retry_window=1,
        gzip=False,
        before_send=lambda event: event,
        debug=False,
    )
    assert client.flush_interval == 2.0 and isinstance(client.flush_interval, float)
    assert Client(transport=InMemoryTransport(), api_key=None).disabled is False


def _app(**conf: Any) -> Celery:
    app = Celery("options", set_as_current=False)
    app.conf.update(conf)
    return app


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("task_scopes_flush_interval", math.inf),
        ("task_scopes_timeout", math.inf),
        ("task_scopes_shutdown_timeout", -math.inf),
        ("task_scopes_host", "http://"),
        ("task_scopes_host", "https://"),
    ],
)
def test_app_conf_gets_the_same_checks(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        Options.from_app(_app(**{key: value}))
