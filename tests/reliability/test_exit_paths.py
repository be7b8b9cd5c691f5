"""Every way a prefork worker can exit, and what reaches the collector (the lifecycle
table of ``task_scopes.celery``).

Real ``celery worker -P prefork`` subprocesses on Redis, the loopback collector in this
process; the measurements are those of ``python bench/soak.py --exit-paths``
(``bench/_soak_exits.py``), at CI size. Documented behaviour, asserted:

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
from collections.abc import Iterator
from pathlib import Path

import _soak_exits as exits
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.broker]

# Seconds beyond the flush interval a lost event may be: one send of a batch, and the
# scheduling delays of a shared two-core machine.
MARGIN = 1.0


@pytest.fixture
def rig(soak_redis: str, tmp_path: Path) -> Iterator[exits.Rig]:
    with exits.rig(soak_redis, tmp_path) as built:
        yield built


def test_warm_shutdown_loses_nothing_with_a_300_s_flush_interval(rig: exits.Rig) -> None:
    outcome = exits.warm(rig, tasks=200, flush_interval=300.0)
    assert outcome.exit_code == 0
    assert outcome.details["tasks_run"] >= 100  # stopped mid-run, not after the last task
    assert outcome.captured == outcome.details["tasks_run"]
    assert outcome.lost == []


def test_warm_shutdown_rides_out_an_outage_shorter_than_the_shutdown_timeout(
    rig: exits.Rig,
) -> None:
    outcome = exits.warm(rig, 200, flush_interval=0.5, outage=3.0, shutdown_timeout=20.0)
    assert outcome.exit_code == 0
    assert outcome.captured > 0
    assert outcome.lost == []


def test_warm_shutdown_through_a_longer_outage_is_bounded_and_says_what_it_lost(
    rig: exits.Rig,
) -> None:
    outcome = exits.warm(rig, 200, flush_interval=0.5, outage=8.0, shutdown_timeout=2.0)
    assert outcome.exit_code == 0
    assert outcome.details["exit_seconds"] < 8.0  # bounded by the timeout, not the outage
    assert outcome.lost, "the outage outlasted the shutdown timeout, yet nothing was lost"
    log = (rig.log_dir / "warm.log").read_text()
    assert "undelivered at process shutdown" in log


def test_recycled_children_deliver_before_the_worker_stops(rig: exits.Rig) -> None:
    outcome = exits.recycle(rig, tasks=20, per_child=5, flush_interval=300.0)
    assert outcome.details["children"] >= 4
    assert outcome.details["delivered_before_stop"] >= outcome.details["recycled_events"] == 15
    assert outcome.captured == 20
    assert outcome.lost == []


def test_cold_shutdown_loses_nothing(rig: exits.Rig) -> None:
    outcome = exits.main_signal(rig, signal.SIGQUIT, tasks=400, flush_interval=0.5)
    assert outcome.captured > 0
    assert outcome.lost == []


def test_cold_shutdown_during_a_collector_outage_loses_nothing(rig: exits.Rig) -> None:
    outcome = exits.main_signal(rig, signal.SIGQUIT, tasks=400, flush_interval=0.5, outage=3.0)
    assert outcome.captured > 0
    assert outcome.lost == []


@pytest.mark.parametrize("flush_interval", [0.5, 2.0])
def test_sigkill_of_a_child_loses_at_most_its_last_flush_interval(
    rig: exits.Rig, flush_interval: float
) -> None:
    outcome = exits.kill_child(rig, tasks=400, flush_interval=flush_interval, kills=2)
    assert outcome.exit_code == 0
    assert outcome.lost, "SIGKILL lost nothing: the loss window was not exercised"
    assert {event.pid for event in outcome.lost} <= {pid for pid, _ in outcome.signals}
    assert 0 <= outcome.window <= flush_interval + MARGIN, sorted(outcome.ages)[-5:]


def test_sigkill_of_the_main_process_loses_at_most_the_last_flush_interval(
    rig: exits.Rig,
) -> None:
    outcome = exits.main_signal(rig, signal.SIGKILL, tasks=400, flush_interval=0.5)
    assert outcome.exit_code == -signal.SIGKILL
    assert outcome.lost, "SIGKILL lost nothing: the loss window was not exercised"
    assert 0 <= outcome.window <= 0.5 + MARGIN, sorted(outcome.ages)[-5:]
    assert not [n for n in outcome.notes if "still alive" in n], outcome.notes
