"""The soak at CI size: ``bench/soak.py`` with 2,000 tasks and shorter faults.

A real prefork worker (``-c 2``) on Redis, four producer threads with a context per batch,
the collector answering 500s, 429s, stalling longer than the client's timeout and going
down; halfway the worker is stopped (SIGTERM) during an outage and a new one takes over.
The run itself decides pass or fail (exit status); the summary it writes is checked too.
"""

from __future__ import annotations

import pytest

from .conftest import RunSoak

pytestmark = [pytest.mark.slow, pytest.mark.broker]

CI_RUN = [
    "--tasks", "2000", "--rate", "50", "--outage", "3", "--stall", "2",
    "--http-timeout", "1", "--shutdown-timeout", "20", "--deadline", "150",
]  # fmt: skip


def test_soak_at_ci_size_loses_nothing_and_misattributes_nothing(run_soak: RunSoak) -> None:
    run = run_soak(*CI_RUN, timeout=240)
    summary, report = run.result, run.output
    assert run.returncode == 0, report
    assert summary["problems"] == [], report
    assert summary["tasks_published"] == summary["tasks_run"] == 2000
    assert summary["events_received"] == summary["events_captured"] == 2000
    assert summary["lost"] == summary["misattributed"] == 0
    assert summary["distinct_ids"] == 40  # 2,000 tasks in batches of 50, one ID per batch
    assert summary["duplicates"] > 0, "no retried delivery reached the collector twice"
    assert {500, 429} <= {int(status) for status in summary["requests"]}
