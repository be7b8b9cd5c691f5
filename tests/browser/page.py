"""What the tests do in the page: wait for posthog-js, read its IDs, call the app."""

from __future__ import annotations

from typing import Any, NamedTuple

from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

LOAD_TIMEOUT = 60.0

# posthog-js has no public getter of the window ID; its session manager is what its
# tracing headers read (sessionManager.checkAndGetSessionAndWindowId(true)).
_IDS = """
const ids = posthog.sessionManager.checkAndGetSessionAndWindowId(true);
return [posthog.get_distinct_id(), posthog.get_session_id(), ids.windowId];
"""

_FETCH = """
const [method, path, body, done] = arguments;
const init = {method: method};
if (body !== null) {
  init.body = JSON.stringify(body);
  init.headers = {'Content-Type': 'application/json'};
}
fetch(path, init)
  .then((r) => r.json().then((json) => done({status: r.status, json: json})))
  .catch((e) => done({status: 0, error: String(e)}));
"""

_XHR = """
const [method, path, body, done] = arguments;
const xhr = new XMLHttpRequest();
xhr.open(method, path);
xhr.onload = () => done({status: xhr.status, json: JSON.parse(xhr.responseText)});
xhr.onerror = () => done({status: 0, error: 'network error'});
if (body !== null) {
  xhr.setRequestHeader('Content-Type', 'application/json');
  xhr.send(JSON.stringify(body));
} else {
  xhr.send();
}
"""


class Ids(NamedTuple):
    """What posthog-js puts in its tracing headers, read in the page."""

    distinct_id: str
    session_id: str
    window_id: str


def open_page(driver: WebDriver, url: str) -> None:
    """Load ``url`` and wait until posthog-js is initialised and has a session."""
    driver.get(url)
    WebDriverWait(driver, LOAD_TIMEOUT).until(
        lambda d: d.execute_script(
            "return !!(window.posthog && posthog.__loaded && posthog.get_session_id())"
        )
    )


def ids(driver: WebDriver) -> Ids:
    distinct_id, session_id, window_id = driver.execute_script(_IDS)
    return Ids(distinct_id, session_id, window_id)


def call(driver: WebDriver, how: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """Call the app from the page with ``fetch`` or ``xhr``; ``{status, json}`` back
    (status 0 and ``error`` when the request failed)."""
    script = {"fetch": _FETCH, "xhr": _XHR}[how]
    answer: dict[str, Any] = driver.execute_async_script(script, method, path, body)
    return answer


def wait_for(driver: WebDriver, expression: str, timeout: float = LOAD_TIMEOUT) -> Any:
    """Poll the page until the JavaScript ``expression`` is truthy; return its value."""
    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(f"return {expression};"))
