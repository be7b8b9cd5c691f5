"""Fixtures of the browser tier: posthog-js from npm, headless Chromium driven by Selenium.

posthog-js is the version pinned in ``tests/browser/package-lock.json``; when
``node_modules`` lacks it, ``npm ci`` installs it first. Chromium and chromedriver are
Debian's (``apt-get install chromium chromium-driver``), or the ones named by
``TASK_SCOPES_CHROMIUM`` / ``TASK_SCOPES_CHROMEDRIVER``. Outside CI a missing browser, npm
or posthog-js skips the tier with the reason; under ``CI=true`` it fails.

The end-to-end fixtures (brokers, collector, ``celery worker`` subprocesses) are the ones
of tests/e2e.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from tests.e2e.conftest import (  # noqa: F401 -- fixtures, used by name
    capture_server,
    make_producer,
    redis_broker,
    run_id,
    start_worker,
)

HERE = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
BUNDLE = HERE / "node_modules" / "posthog-js" / "dist" / "array.full.js"

# Headless, and nothing that reaches beyond this machine (updates, sync, QUIC probes).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def require(ok: object, reason: str) -> None:
    """Skip with ``reason`` unless ``ok``; under ``CI=true`` fail instead."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser tier must run)")
    pytest.skip(reason)


def _pinned_version() -> str:
    lock = json.loads((HERE / "package-lock.json").read_text())
    version: str = lock["packages"]["node_modules/posthog-js"]["version"]
    return version


def _installed_version() -> str | None:
    manifest = HERE / "node_modules" / "posthog-js" / "package.json"
    if not manifest.is_file() or not BUNDLE.is_file():
        return None
    version: str = json.loads(manifest.read_text())["version"]
    return version


@pytest.fixture(scope="session")
def posthog_js() -> Path:
    """posthog-js's full bundle (``array.full.js``) at the pinned version."""
    pinned = _pinned_version()
    if _installed_version() != pinned:
        npm = shutil.which("npm")
        require(npm, "npm not found: the browser tier installs posthog-js with npm ci")
        assert npm is not None
        result = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=600,
        )
        require(
            result.returncode == 0,
            f"npm ci in tests/browser failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}",
        )
    installed = _installed_version()
    assert installed == pinned, f"node_modules has posthog-js {installed}, the lock pins {pinned}"
    return BUNDLE


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """``(browser, chromedriver)`` executables."""
    browser = os.environ.get("TASK_SCOPES_CHROMIUM") or shutil.which("chromium")
    driver = os.environ.get("TASK_SCOPES_CHROMEDRIVER") or shutil.which("chromedriver")
    require(
        browser and driver and Path(browser).is_file() and Path(driver).is_file(),
        "chromium or chromedriver not found (Debian: apt-get install chromium chromium-driver)",
    )
    assert browser is not None and driver is not None
    return browser, driver


@pytest.fixture
def browser(chromium: tuple[str, str], tmp_path: Path) -> Iterator[WebDriver]:
    """A headless Chromium with a fresh profile, quit after the test."""
    binary, driver_path = chromium
    options = Options()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    # With the driver's path given, Selenium Manager (which would download one) is not run.
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
