"""Tier 1: ``Options.from_app`` reads the ``task_scopes_*`` settings of ``app.conf``."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import pytest
from celery import Celery

from task_scopes.celery._options import ConfigError, Options


def _app(**conf: Any) -> Celery:
    app = Celery("config-tests", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


def _allow_all(task_name: str) -> bool:
    return True


# Every key of the settings table of ``task_scopes.celery``, a non-default value for
# each, and the Options attribute it lands in.
EVERY_SETTING: dict[str, Any] = {
    "api_key": "phc_test",
    "host": "http://127.0.0.1:9",
    "enabled": False,
    "propagate": False,
    "capture_exceptions": False,
    "capture_retries": True,
    "task_events": True,
    "task_filter": _allow_all,
    "posthog_headers": True,
    "secret": "s3cret",
    "max_header_bytes": 4096,
    "max_tags": 10,
    "max_key_chars": 50,
    "max_value_chars": 100,
    "encode_bytes": True,
    "flush_at": 7,
    "flush_interval": 2.5,
    "max_queue_size": 99,
    "timeout": 3.0,
    "retry_window": 45.0,
    "shutdown_timeout": 4.0,
}


def test_defaults_without_any_setting() -> None:
    options = Options.from_app(_app())
    assert options == Options()
    assert options.api_key is None
    assert options.host == "https://us.i.posthog.com"
    assert (options.enabled, options.propagate, options.capture_exceptions) == (True, True, True)
    assert (options.capture_retries, options.task_events, options.posthog_headers) == (
        False,
        False,
        False,
    )
    assert options.task_filter is None and options.secret is None
    assert options.max_header_bytes == 8192
    assert options.shutdown_timeout == 10.0


def test_every_setting_is_read_from_app_conf() -> None:
    assert set(EVERY_SETTING) == {f.name for f in dataclasses.fields(Options)}
    options = Options.from_app(_app(**{f"task_scopes_{k}": v for k, v in EVERY_SETTING.items()}))
    assert dataclasses.asdict(options) == EVERY_SETTING


@pytest.mark.parametrize("name", sorted(EVERY_SETTING))
def test_each_setting_alone_changes_only_its_option(name: str) -> None:
    options = Options.from_app(_app(**{f"task_scopes_{name}": EVERY_SETTING[name]}))
    assert getattr(options, name) == EVERY_SETTING[name]
    assert dataclasses.replace(options, **{name: getattr(Options(), name)}) == Options()


class DjangoSettings:
    """What a Django settings module looks like to ``config_from_object``."""

    DEBUG = False
    CELERY_BROKER_URL = "memory://"
    CELERY_TASK_SCOPES_API_KEY = "phc_django"
    CELERY_TASK_SCOPES_POSTHOG_HEADERS = True
    CELERY_TASK_SCOPES_FLUSH_AT = 5


def test_django_namespace_settings_are_read() -> None:
    app = Celery("django-tests", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    options = Options.from_app(app)
    assert options.api_key == "phc_django"
    assert options.posthog_headers is True
    assert options.flush_at == 5


def test_unknown_django_namespace_setting_raises_naming_it() -> None:
    class Typo(DjangoSettings):
        CELERY_TASK_SCOPES_FLUSH_ATT = 5

    app = Celery("django-tests", set_as_current=False)
    app.config_from_object(Typo, namespace="CELERY")
    with pytest.raises(ConfigError, match="CELERY_TASK_SCOPES_FLUSH_ATT"):
        Options.from_app(app)


def test_keyword_overrides_win_over_app_conf() -> None:
    app = _app(task_scopes_flush_at=5, task_scopes_posthog_headers=False)
    options = Options.from_app(app, {"flush_at": 9, "posthog_headers": True})
    assert (options.flush_at, options.posthog_headers) == (9, True)


def test_overrides_leave_other_settings_from_app_conf() -> None:
    options = Options.from_app(_app(task_scopes_secret="k"), {"flush_at": 9})
    assert options.secret == "k"


BAD_VALUES = [
    ("enabled", "yes"),
    ("propagate", 1),
    ("capture_exceptions", None),
    ("capture_retries", "False"),
    ("task_events", 0),
    ("posthog_headers", "true"),
    ("encode_bytes", 1),
    ("flush_at", 0),
    ("flush_at", True),
    ("flush_at", 2.5),
    ("max_queue_size", -1),
    ("max_tags", "64"),
    ("max_key_chars", 0),
    ("max_value_chars", None),
    ("max_header_bytes", 100),
    ("flush_interval", 0),
    ("flush_interval", -1.0),
    ("timeout", "10"),
    ("timeout", True),
    ("shutdown_timeout", float("nan")),
    ("api_key", ""),
    ("api_key", 123),
    ("secret", b"bytes"),
    ("host", "us.i.posthog.com"),
    ("host", "ftp://example.com"),
    ("host", None),
    ("task_filter", 42),
    ("task_filter", "no_such_module_for_tests.predicate"),
    ("task_filter", "os.sep"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_bad_value_in_app_conf_raises_naming_the_key(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"task_scopes_{name}"):
        Options.from_app(_app(**{f"task_scopes_{name}": value}))


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_bad_override_raises_naming_the_keyword(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"install\({name}="):
        Options.from_app(_app(), {name: value})


def test_unknown_task_scopes_key_raises_naming_it() -> None:
    with pytest.raises(ConfigError, match="task_scopes_api_kye"):
        Options.from_app(_app(task_scopes_api_kye="phc_typo"))


def test_unknown_override_raises_naming_it() -> None:
    with pytest.raises(ConfigError, match="posthog_header"):
        Options.from_app(_app(), {"posthog_header": True})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_task_filter_may_be_a_dotted_path() -> None:
    options = Options.from_app(_app(task_scopes_task_filter="operator.truth"))
    assert options.task_filter is operator.truth


def test_task_filter_may_be_a_colon_path() -> None:
    options = Options.from_app(_app(task_scopes_task_filter="operator:truth"))
    assert options.task_filter is operator.truth


def test_task_filter_may_be_a_callable() -> None:
    assert Options.from_app(_app(), {"task_filter": _allow_all}).task_filter is _allow_all


def test_integer_seconds_are_accepted_as_floats() -> None:
    options = Options.from_app(_app(task_scopes_timeout=3, task_scopes_flush_interval=1))
    assert options.timeout == 3.0 and isinstance(options.timeout, float)
    assert options.flush_interval == 1.0 and isinstance(options.flush_interval, float)


def test_options_are_frozen() -> None:
    options = Options.from_app(_app())
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.enabled = False  # type: ignore[misc]


def test_client_options_carry_the_batching_settings() -> None:
    options = Options.from_app(
        _app(
            task_scopes_flush_at=3,
            task_scopes_flush_interval=0.25,
            task_scopes_max_queue_size=50,
            task_scopes_timeout=2,
            task_scopes_retry_window=60,
        )
    )
    assert options.client_options() == {
        "flush_at": 3,
        "flush_interval": 0.25,
        "max_queue_size": 50,
        "timeout": 2.0,
        "retry_window": 60.0,
    }


def test_settings_of_other_libraries_are_not_mistaken_for_ours() -> None:
    options = Options.from_app(_app(task_scope_x=1, my_task_scopes_y=2, task_default_queue="q"))
    assert options == Options()
