"""The real posthog-js in headless Chromium, against the middleware, a worker and the collector.

The page and the app share one loopback port; posthog-js's ``api_host`` is the collector
(a :class:`~task_scopes.testing.CaptureServer`) on another port, so every request it makes
is cross-origin. The Celery task runs in a real ``celery worker -P prefork`` on Redis.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from celery import Celery
from selenium.webdriver.remote.webdriver import WebDriver

from task_scopes.testing import CaptureServer
from tests.e2e.harness import Broker, MakeProducer, StartWorker, Worker, labelled, wait_events

from .page import Ids, call, ids, open_page, wait_for
from .shop import API_KEY, VIEW_EVENT, make_app, serve

pytestmark = pytest.mark.browser

TRACED = "127.0.0.1"
# The options an app under end-to-end test sets: tracing headers to the app's own host,
# and (a headless browser looks like a bot) posthog-js's own events kept.
CONFIG: dict[str, Any] = {"tracing_headers": [TRACED], "opt_out_useragent_filter": True}


def _page_config(capture_server: CaptureServer, **options: Any) -> dict[str, Any]:
    return {"api_host": capture_server.url, **CONFIG, **options}


def _assert_attributed(event: dict[str, Any], expected: Ids) -> None:
    props = event["properties"]
    # Ours carry it at the top level, posthog-js's in the properties.
    distinct_id = event.get("distinct_id", props.get("distinct_id"))
    got = Ids(distinct_id, props.get("$session_id"), props.get("$window_id"))
    assert got == expected, event


def _checkout(
    driver: WebDriver,
    server: CaptureServer,
    worker: Worker,
    label: str,
    how: str,
) -> list[dict[str, Any]]:
    """POST /checkout from the page; the view's event and the task's, once both arrived."""
    answer = call(driver, how, "POST", "/checkout", {"label": label})
    assert answer["status"] == 202, answer
    [view] = wait_events(server, labelled(label, VIEW_EVENT), 1, worker=worker, what=label)
    [task] = wait_events(server, labelled(label), 1, worker=worker, what=label)
    assert task["properties"]["celery_task_name"] == "e2e.report"
    assert task["properties"]["pid"] != os.getpid()  # run by the worker's child process
    return [view, task]


@pytest.mark.slow
@pytest.mark.broker
def test_view_and_task_events_carry_the_browsers_ids_before_and_after_identify(
    browser: WebDriver,
    posthog_js: Any,
    capture_server: CaptureServer,
    redis_broker: Broker,
    start_worker: StartWorker,
    make_producer: MakeProducer,
    run_id: str,
) -> None:
    producer: Celery = make_producer(redis_broker)
    worker = start_worker(redis_broker)
    app = make_app(
        posthog_js=posthog_js,
        config=_page_config(capture_server),
        report=producer.tasks["e2e.report"],
    )
    with serve(app) as shop:
        open_page(browser, shop.url + "/")
        anonymous = ids(browser)
        # Before identify(): posthog-js's anonymous distinct ID, a UUIDv7.
        assert uuid.UUID(anonymous.distinct_id).version == 7
        for how in ("fetch", "xhr"):
            for event in _checkout(browser, capture_server, worker, f"{run_id}-anon-{how}", how):
                _assert_attributed(event, anonymous)

        browser.execute_script("posthog.identify(arguments[0]);", f"shopper-{run_id}")
        identified = ids(browser)
        assert identified == anonymous._replace(distinct_id=f"shopper-{run_id}")
        for how in ("fetch", "xhr"):
            for event in _checkout(browser, capture_server, worker, f"{run_id}-known-{how}", how):
                _assert_attributed(event, identified)


@pytest.mark.parametrize(
    ("options", "encoding"),
    [({}, "gzip"), ({"disable_compression": True}, "json, base64 beacon")],
    ids=["default", "disable_compression"],
)
def test_posthog_js_delivers_its_own_events_to_the_collector_on_another_port(
    browser: WebDriver,
    posthog_js: Any,
    capture_server: CaptureServer,
    run_id: str,
    options: dict[str, Any],
    encoding: str,
) -> None:
    app = make_app(posthog_js=posthog_js, config=_page_config(capture_server, **options))
    with serve(app) as shop:
        open_page(browser, shop.url + "/")
        # The flags request crossed origins and its answer was readable.
        assert wait_for(browser, "window.flagsLoaded") == {"errorsLoading": False}
        anonymous = ids(browser)
        browser.execute_script(
            "posthog.capture('custom browser event', {run: arguments[0]});", run_id
        )
        browser.execute_script("posthog.identify(arguments[0]);", f"shopper-{run_id}")
        identified = ids(browser)
        # Leaving the page: $pageleave goes out with navigator.sendBeacon.
        browser.get("about:blank")

    def mine(event: dict[str, Any]) -> bool:
        return event["properties"].get("$session_id") == anonymous.session_id

    wanted = {"$pageview", "custom browser event", "$identify", "$pageleave"}
    events = capture_server.wait_until(
        lambda evs: wanted <= {e["event"] for e in evs if mine(e)}, timeout=60
    )
    by_name = {e["event"]: e for e in events if mine(e)}
    assert wanted <= set(by_name), (encoding, sorted(by_name))
    assert by_name["custom browser event"]["properties"]["run"] == run_id
    for name in ("$pageview", "custom browser event"):
        _assert_attributed(by_name[name], anonymous)
    for name in ("$identify", "$pageleave"):
        _assert_attributed(by_name[name], identified)
    assert by_name["$identify"]["properties"]["$anon_distinct_id"] == anonymous.distinct_id
    # Every answer was readable by the page, so nothing was sent twice.
    assert capture_server.duplicates == 0
    statuses = {(path, status) for path, status, _ in capture_server.requests}
    assert {status for _, status in statuses} <= {200, 204}, statuses
    paths = {path for path, _ in statuses}
    assert f"/array/{API_KEY}/config.js" in paths and "/flags/" in paths, statuses
    if options.get("disable_compression"):
        # JSON bodies are not CORS-simple: the browser asked first, and was answered.
        assert any(status == 204 for _, status in statuses), statuses


@pytest.mark.parametrize(
    "option", ["tracing_headers", "addTracingHeaders", "__add_tracing_headers"]
)
def test_tracing_headers_option_and_its_deprecated_aliases(
    browser: WebDriver, posthog_js: Any, capture_server: CaptureServer, option: str
) -> None:
    config = {"api_host": capture_server.url, "opt_out_useragent_filter": True, option: [TRACED]}
    with serve(make_app(posthog_js=posthog_js, config=config)) as shop:
        open_page(browser, shop.url + "/")
        expected = ids(browser)
        for how in ("fetch", "xhr"):
            answer = call(browser, how, "GET", "/whoami")
            assert answer["status"] == 200, answer
            assert Ids(**answer["json"]) == expected, how


def test_a_hostname_with_a_port_never_matches(
    browser: WebDriver, posthog_js: Any, capture_server: CaptureServer
) -> None:
    def config(host: str) -> dict[str, Any]:
        assert host.startswith(f"{TRACED}:")
        return _page_config(capture_server, tracing_headers=[host])  # "127.0.0.1:<port>"

    with serve(make_app(posthog_js=posthog_js, config=config)) as shop:
        open_page(browser, shop.url + "/")
        answer = call(browser, "fetch", "GET", "/whoami")
    assert answer == {
        "status": 200,
        "json": {"distinct_id": None, "session_id": None, "window_id": None},
    }


def test_a_headless_browser_is_a_bot_but_still_sends_the_tracing_headers(
    browser: WebDriver, posthog_js: Any, capture_server: CaptureServer
) -> None:
    config = {"api_host": capture_server.url, "tracing_headers": [TRACED]}
    with serve(make_app(posthog_js=posthog_js, config=config)) as shop:
        open_page(browser, shop.url + "/")
        # posthog-js drops its own events (capture() returns nothing)...
        assert browser.execute_script("return posthog.capture('probe') === undefined;") is True
        expected = ids(browser)
        # ...but its tracing headers still go out with the app's requests.
        answer = call(browser, "fetch", "GET", "/whoami")
    assert Ids(**answer["json"]) == expected
