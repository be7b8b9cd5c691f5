"""Tier 2: ``install()`` / ``uninstall()`` on real Celery apps: signal receivers, options,
the default client."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from celery import signals
from plugin_support import WAIT, installed, make_app

import task_scopes
import task_scopes.celery
from task_scopes.celery import ConfigError, app_client, installed_options
from task_scopes.celery._signals import REGISTRY
from task_scopes.testing import CaptureServer

SIGNALS = (
    signals.before_task_publish,
    signals.task_prerun,
    signals.task_postrun,
    signals.task_failure,
    signals.task_retry,
    signals.task_received,
    signals.worker_init,
    signals.worker_process_init,
    signals.worker_process_shutdown,
    signals.worker_shutdown,
)


def ours(signal: Any) -> int:
    """How many receivers of ``signal`` the plugin connected."""
    return sum(1 for key, _ in signal.receivers if key[0] == f"task_scopes.{signal.name}")


def connected() -> dict[str, int]:
    return {signal.name: ours(signal) for signal in SIGNALS}


@pytest.fixture(autouse=True)
def nothing_installed() -> Iterator[None]:
    """Each test starts with no app installed, so connect counts are its own."""
    gc.collect()  # apps are held weakly; collect the ones earlier tests dropped
    for app in list(REGISTRY.apps):
        task_scopes.celery.uninstall(app)
    assert connected() == dict.fromkeys(connected(), 0)
    yield


def test_install_connects_one_receiver_per_signal() -> None:
    app = make_app("install_once")
    with installed(app):
        assert connected() == dict.fromkeys(connected(), 1)


def test_install_twice_connects_nothing_more() -> None:
    app = make_app("install_twice")
    with installed(app):
        before = {signal.name: len(signal.receivers) for signal in SIGNALS}
        task_scopes.celery.install(app)
        task_scopes.celery.install(app, posthog_headers=True)
        assert {signal.name: len(signal.receivers) for signal in SIGNALS} == before
        assert connected() == dict.fromkeys(connected(), 1)


def test_two_apps_share_one_receiver_per_signal() -> None:
    first, second = make_app("install_first"), make_app("install_second")
    with installed(first), installed(second):
        assert connected() == dict.fromkeys(connected(), 1)


def test_install_returns_the_options_in_force() -> None:
    app = make_app("install_returns", task_scopes_flush_at=3)
    with installed(app, secret="k") as options:
        assert (options.flush_at, options.secret) == (3, "k")
        assert installed_options(app) == options


def test_install_again_re_reads_app_conf_and_keywords() -> None:
    app = make_app("install_reread")
    with installed(app):
        assert installed_options(app) == task_scopes.celery.Options()
        app.conf.task_scopes_capture_retries = True
        task_scopes.celery.install(app, posthog_headers=True)
        options = installed_options(app)
        assert options is not None
        assert (options.capture_retries, options.posthog_headers) == (True, True)


def test_app_conf_changes_after_install_take_effect_only_on_the_next_install() -> None:
    app = make_app("install_parsed_once")
    with installed(app):
        app.conf.task_scopes_secret = "late"
        options = installed_options(app)
        assert options is not None and options.secret is None


def test_keywords_of_a_previous_install_are_not_kept() -> None:
    app = make_app("install_forgets")
    with installed(app, posthog_headers=True):
        task_scopes.celery.install(app)
        options = installed_options(app)
        assert options is not None and options.posthog_headers is False


def test_uninstall_disconnects_every_receiver() -> None:
    app = make_app("uninstall")
    task_scopes.celery.install(app)
    assert task_scopes.celery.uninstall(app) is True
    assert connected() == dict.fromkeys(connected(), 0)
    assert installed_options(app) is None


def test_uninstall_of_an_app_not_installed_returns_false() -> None:
    assert task_scopes.celery.uninstall(make_app("never_installed")) is False


def test_uninstall_of_one_app_keeps_the_other_instrumented() -> None:
    first, second = make_app("keep_first"), make_app("keep_second")
    with installed(second):
        task_scopes.celery.install(first)
        task_scopes.celery.uninstall(first)
        assert connected() == dict.fromkeys(connected(), 1)
        assert installed_options(second) is not None


def test_install_with_enabled_false_uninstalls() -> None:
    app = make_app("disabled")
    task_scopes.celery.install(app)
    options = task_scopes.celery.install(app, enabled=False)
    assert options.enabled is False
    assert installed_options(app) is None
    assert connected() == dict.fromkeys(connected(), 0)


def test_install_with_a_bad_setting_raises_naming_it_and_installs_nothing() -> None:
    app = make_app("bad_setting", task_scopes_flush_at=0)
    with pytest.raises(ConfigError, match="task_scopes_flush_at"):
        task_scopes.celery.install(app)
    assert installed_options(app) is None
    assert connected() == dict.fromkeys(connected(), 0)


def test_a_bad_reinstall_keeps_the_options_in_force() -> None:
    app = make_app("bad_reinstall")
    with installed(app, secret="k") as options:
        with pytest.raises(ConfigError, match="timeout"):
            task_scopes.celery.install(app, timeout=-1)
        assert installed_options(app) == options


def test_install_with_an_api_key_binds_its_client_to_the_app_task_runs_only() -> None:
    outside = task_scopes.get_client()
    with CaptureServer() as server:
        app = make_app(
            "keyed",
            task_scopes_api_key="phc_keyed",
            task_scopes_host=server.url,
            task_scopes_flush_interval=0.05,
            task_always_eager=True,
        )

        @app.task(name="keyed.capture")
        def capture_in_task() -> tuple[str, str | None]:
            client = task_scopes.get_client()
            task_scopes.capture("installed", distinct_id="user-1")
            return client.api_key or "", client.host

        with installed(app):
            client = app_client(app)
            assert client is not None
            assert (client.api_key, client.host, client.flush_interval) == (
                "phc_keyed",
                server.url,
                0.05,
            )
            assert capture_in_task.delay().get() == ("phc_keyed", server.url)
            assert task_scopes.get_client() is outside  # install() replaced nothing
            events = server.wait_for(1, timeout=WAIT)
        assert [(e["event"], e["distinct_id"]) for e in events] == [("installed", "user-1")]
        assert server.api_key_of(events[0]) == "phc_keyed"


def test_install_again_with_the_same_client_settings_keeps_the_client() -> None:
    app = make_app(
        "keyed_again", task_scopes_api_key="phc_k", task_scopes_host="http://127.0.0.1:9"
    )
    with installed(app):
        client = app_client(app)
        task_scopes.celery.install(app)
        task_scopes.celery.install(app, posthog_headers=True)  # not a client setting
        assert app_client(app) is client is not None


def test_apps_with_equal_client_settings_share_one_client() -> None:
    conf = {"task_scopes_api_key": "phc_k", "task_scopes_host": "http://127.0.0.1:9"}
    first, second = make_app("keyed_a", **conf), make_app("keyed_b", **conf)
    with installed(first), installed(second):
        assert app_client(first) is app_client(second) is not None


def test_install_with_new_client_settings_replaces_the_app_client() -> None:
    app = make_app("keyed_new", task_scopes_api_key="phc_k", task_scopes_host="http://127.0.0.1:9")
    with installed(app):
        client = app_client(app)
        task_scopes.celery.install(app, flush_at=7)
        replaced = app_client(app)
        assert replaced is not None and replaced is not client and replaced.flush_at == 7


def test_install_without_an_api_key_leaves_the_default_client_alone() -> None:
    client = task_scopes.get_client()
    with installed(make_app("keyless")):
        assert task_scopes.get_client() is client


def test_install_inside_capture_events_sends_the_tasks_events_to_the_block() -> None:
    from celery.contrib.testing.worker import start_worker

    from task_scopes.testing import capture_events

    with CaptureServer() as server, capture_events() as captured:
        app = make_app(
            "keyed_in_capture", task_scopes_api_key="phc_real", task_scopes_host=server.url
        )

        @app.task(name="keyed_in_capture.work")
        def work(label: str) -> None:
            task_scopes.capture("worked", properties={"label": label})
            raise ValueError(label)

        with installed(app):
            with pytest.raises(ValueError, match="eager"):
                work.apply(args=["eager"]).get()
            app.finalize(auto=True)
            with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
                work.delay("worker").get(timeout=WAIT, propagate=False)
            events = captured.events
        assert sorted(
            (e["event"], e["properties"].get("label")) for e in events if e["event"] == "worked"
        ) == [("worked", "eager"), ("worked", "worker")]
        assert len(captured.named("$exception")) == 2
        assert server.events == []
