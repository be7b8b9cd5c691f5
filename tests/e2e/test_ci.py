"""Under ``CI=true`` a broker test fails, never skips, when its broker is unreachable or,
for Redis, when ``redis-server`` is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import ROOT

PROBE = Path(__file__).with_name("ci_probe.py")
UNREACHABLE = {
    # No such executable: the private Redis cannot be started.
    "TASK_SCOPES_TEST_REDIS_SERVER": "task-scopes-no-such-redis-server",
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    "TASK_SCOPES_TEST_AMQP": "amqp://guest:guest@127.0.0.1:1//",
}


def _run_probe(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(UNREACHABLE)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(PROBE), "-q", "-rfEs", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_unreachable_brokers_fail_under_ci_and_skip_otherwise() -> None:
    in_ci = _run_probe("true")
    assert in_ci.returncode == 1, in_ci.stdout + in_ci.stderr
    # The fixtures fail, so pytest reports the two tests as errors, and nothing skipped.
    assert "2 errors" in in_ci.stdout, in_ci.stdout
    assert "skipped" not in in_ci.stdout
    assert "CI=true: broker tests must not skip" in in_ci.stdout
    missing = "task-scopes-no-such-redis-server not found on PATH"
    assert missing in in_ci.stdout, in_ci.stdout

    locally = _run_probe(None)
    assert locally.returncode == 0, locally.stdout + locally.stderr
    assert "2 skipped" in locally.stdout, locally.stdout
    assert missing in locally.stdout, locally.stdout
