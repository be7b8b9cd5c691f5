"""Every way a prefork worker can exit, and what reaches the collector (the lifecycle
table of ``task_scopes.celery``).

Each test runs one measurement of ``python bench/soak.py --exit-paths`` at CI size
(``--exit-path NAME``): real ``celery worker -P prefork`` subprocesses on Redis, the
loopback collector in the soak process; the test checks the outcome the run writes as
JSON. Documented behaviour, asserted:

* warm shutdown (SIGTERM) and ``--max-tasks-per-child`` recycling lose nothing, even with
  a flush interval far longer than the run (only the exit flush can deliver), and through
  a collector outage the exit flush outlasts (``task_scopes_shutdown_timeout``); beyond
  it, the exit is bounded by that timeout and the loss is logged;
* cold shutdown (SIGQUIT) loses nothing either: the pool children get SIGTERM, run
  ``worker_process_shutdown`` and flush, and the main process waits for them, also
  through a collector outage shorter than ``task_scopes_shutdown_timeout``;
* SIGKILL cannot be flushed: a killed child loses the events captured since its
  consumer's last send, at most ``task_scopes_flush_interval`` (plus one send) before the
  kill. SIGKILL of the main process kills its children too (Celery sets their parent-death
  signal to SIGKILL), with the same bound.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from .conftest import RunSoak

pytestmark = [pytest.mark.slow, pytest.mark.broker]

# Seconds beyond the flush interval a lost event may be: one send of a batch, and the
# scheduling delays of a shared two-core machine.
MARGIN = 1.0


def exit_path(run_soak: RunSoak, name: str, tasks: int, flush_interval: float, *more: str) -> Any:
    """The outcome (``_soak_exits.Outcome.as_dict()``) of one ``--exit-path`` run; its
    ``output`` key has what the run printed, for failure messages."""
    run = run_soak(
        "--exit-path", name, "--exit-tasks", str(tasks),
        "--flush-interval", str(flush_interval), *more,
    )  # fmt: skip
    outcome = run.result
    assert outcome["scenario"] == name, run.output
    outcome["output"] = run.output
    outcome["log_dir"] = run.log_dir
    return outcome


def lost_pids(outcome: Any) -> set[int]:
    return {event["pid"] for event in outcome["lost"]}


def test_warm_shutdown_loses_nothing_with_a_300_s_flush_interval(run_soak: RunSoak) -> None:
    outcome = exit_path(run_soak, "warm", 200, 300.0)
    assert outcome["exit_code"] == 0, outcome["output"]
    assert outcome["details"]["tasks_run"] >= 100  # stopped mid-run, not after the last task
    assert outcome["captured"] == outcome["details"]["tasks_run"]
    assert outcome["lost"] == [], outcome["output"]


def test_warm_shutdown_rides_out_an_outage_shorter_than_the_shutdown_timeout(
    run_soak: RunSoak,
) -> None:
    outcome = exit_path(
        run_soak, "warm", 200, 0.5, "--exit-outage", "3", "--shutdown-timeout", "20"
    )
    assert outcome["exit_code"] == 0, outcome["output"]
    assert outcome["captured"] > 0
    assert outcome["lost"] == [], outcome["output"]


def test_warm_shutdown_through_a_longer_outage_is_bounded_and_says_what_it_lost(
    run_soak: RunSoak,
) -> None:
    outcome = exit_path(run_soak, "warm", 200, 0.5, "--exit-outage", "8", "--shutdown-timeout", "2")
    assert outcome["exit_code"] == 0, outcome["output"]
    # bounded by the timeout, not the outage
    assert outcome["details"]["exit_seconds"] < 8.0, outcome["output"]
    assert outcome["lost"], "the outage outlasted the shutdown timeout, yet nothing was lost"
    log = (outcome["log_dir"] / "warm.log").read_text()
    assert "undelivered at process shutdown" in log


def test_recycled_children_deliver_before_the_worker_stops(run_soak: RunSoak) -> None:
    outcome = exit_path(run_soak, "recycle", 20, 300.0, "--per-child", "5")
    details = outcome["details"]
    assert details["children"] >= 4, outcome["output"]
    assert details["delivered_before_stop"] >= details["recycled_events"] == 15
    assert outcome["captured"] == 20
    assert outcome["lost"] == [], outcome["output"]


def test_cold_shutdown_loses_nothing(run_soak: RunSoak) -> None:
    outcome = exit_path(run_soak, "cold", 400, 0.5)
    assert outcome["captured"] > 0, outcome["output"]
    assert outcome["lost"] == [], outcome["output"]


def test_cold_shutdown_during_a_collector_outage_loses_nothing(run_soak: RunSoak) -> None:
    outcome = exit_path(run_soak, "cold", 400, 0.5, "--exit-outage", "3")
    assert outcome["captured"] > 0, outcome["output"]
    assert outcome["lost"] == [], outcome["output"]


@pytest.mark.parametrize("flush_interval", [0.5, 2.0])
def test_sigkill_of_a_child_loses_at_most_its_last_flush_interval(
    run_soak: RunSoak, flush_interval: float
) -> None:
    outcome = exit_path(run_soak, "kill-child", 400, flush_interval, "--kills", "2")
    assert outcome["exit_code"] == 0, outcome["output"]
    assert outcome["lost"], "SIGKILL lost nothing: the loss window was not exercised"
    assert lost_pids(outcome) <= {pid for pid, _ in outcome["signals"]}
    assert 0 <= outcome["window"] <= flush_interval + MARGIN, sorted(outcome["ages"])[-5:]


def test_sigkill_of_the_main_process_loses_at_most_the_last_flush_interval(
    run_soak: RunSoak,
) -> None:
    outcome = exit_path(run_soak, "kill-main", 400, 0.5)
    assert outcome["exit_code"] == -signal.SIGKILL, outcome["output"]
    assert outcome["lost"], "SIGKILL lost nothing: the loss window was not exercised"
    assert 0 <= outcome["window"] <= 0.5 + MARGIN, sorted(outcome["ages"])[-5:]
    assert not [n for n in outcome["notes"] if "still alive" in n], outcome["notes"]
