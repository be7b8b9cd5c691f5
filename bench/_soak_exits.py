"""What reaches the collector when a worker exits, each way it can exit.

    python bench/soak.py --exit-paths [--exit-tasks 400]
    python bench/soak.py --exit-path kill-child --flush-interval 2 --kills 2 --json out.json

Each measurement starts a real prefork worker (``_soak_app``) on Redis, feeds it tasks that
each capture one event after ``hold`` seconds of simulated work (so events are captured at
a steady rate), ends it one way, and compares the events the tasks recorded in Redis with
the events the loopback collector received:

* ``warm``: SIGTERM to the main process (warm shutdown) while tasks run;
* ``recycle``: ``--max-tasks-per-child``: each child exits after N tasks;
* ``cold``: SIGQUIT to the main process (cold shutdown) while tasks run;
* ``kill-main``: SIGKILL to the main process; its children are orphaned;
* ``kill-child``: SIGKILL to the pool child, several times in a row.

For a lost event, its *age* is how long before the signal it was captured; the largest age
is the loss window. An event captured at ``t`` is handed to the transport at the
consumer's next wake-up, at most ``task_scopes_flush_interval`` (or ``flush_at`` events)
later, so a process killed without a flush loses at most the events of its last interval.
The measurements run with ``flush_at`` 1000 so that the interval alone bounds the window.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _soak_ledger import Captured, Ledger, Settings, redis_for, soak_worker
from celery import Celery

import task_scopes
import task_scopes.celery
from task_scopes.testing import CaptureServer
from tests.harness.worker import Worker, wait_for

EVENT = "soak task"


@dataclass
class Outcome:
    """The result of one exit-path measurement. Ages and windows in seconds."""

    scenario: str
    flush_interval: float
    captured: int
    received: int
    lost: list[Captured]
    signals: list[tuple[int, float]]  # (pid signalled, wall time)
    notes: list[str] = field(default_factory=list)
    exit_code: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ages(self) -> list[float]:
        """Per lost event: seconds from its capture to the signal that ended its process
        (``pid`` -1 in :attr:`signals`: the whole worker). Negative: captured after it."""
        out = []
        for event in self.lost:
            times = sorted(at for pid, at in self.signals if pid in (event.pid, -1))
            later = [at for at in times if at >= event.at]
            if later:
                out.append(later[0] - event.at)
            elif times:
                out.append(times[-1] - event.at)
        return out

    @property
    def window(self) -> float:
        return max(self.ages, default=0.0)

    def as_dict(self) -> dict[str, Any]:
        """The outcome as JSON-ready data: every field, plus ``ages`` and ``window``."""
        return {
            "scenario": self.scenario,
            "flush_interval": self.flush_interval,
            "captured": self.captured,
            "received": self.received,
            "lost": [event._asdict() for event in self.lost],
            "signals": self.signals,
            "notes": self.notes,
            "exit_code": self.exit_code,
            "details": self.details,
            "ages": self.ages,
            "window": self.window,
        }

    def line(self) -> str:
        return (
            f"{self.scenario:<11} flush_interval {self.flush_interval:>5g} s: "
            f"captured {self.captured:>5}, received {self.received:>5}, lost {len(self.lost):>4}"
            f", loss window {self.window:6.2f} s"
            + (f", exit code {self.exit_code}" if self.exit_code is not None else "")
            + "".join(f"; {note}" for note in self.notes)
        )


class Rig:
    """A broker, a collector and a producer app shared by the measurements of one run."""

    def __init__(self, broker: str, server: CaptureServer, log_dir: Path) -> None:
        self.broker = broker
        self.server = server
        self.log_dir = log_dir
        self.producer = Celery("soak-exits-producer", broker=broker, set_as_current=False)
        self.producer.conf.broker_connection_retry_on_startup = True
        task_scopes.celery.install(self.producer)

    def close(self) -> None:
        task_scopes.celery.uninstall(self.producer)

    def settings(self, flush_interval: float, shutdown_timeout: float = 30.0) -> Settings:
        return Settings(
            broker=self.broker,
            collector=self.server.url,
            flush_interval=flush_interval,
            flush_at=1000,
            shutdown_timeout=shutdown_timeout,
        )

    def publish(self, settings: Settings, count: int, hold: float) -> None:
        """Publish ``count`` tasks from one context (their events name it)."""
        batch = uuid.uuid4().hex[:8]
        with task_scopes.new_context(fresh=True):
            task_scopes.identify_context(f"user-{batch}")
            task_scopes.set_context_session(f"session-{batch}")
            task_scopes.tag("soak_batch", batch)
            for seq in range(count):
                self.producer.send_task(
                    "soak.work", (batch, seq, hold), queue=settings.queue, ignore_result=True
                )

    def outcome(
        self,
        scenario: str,
        settings: Settings,
        signals: list[tuple[int, float]],
        settle: float = 5.0,
    ) -> Outcome:
        """Compare what the tasks recorded with what the collector received, once every
        process has exited (``settle``: seconds for requests still being answered)."""
        ledger = Ledger(settings)
        captured = ledger.captured()
        wanted = {c.uuid for c in captured}

        def received() -> set[str]:
            return {e["uuid"] for e in self.server.events if e["uuid"] in wanted}

        self.server.wait_until(lambda _: len(received()) >= len(wanted), settle)
        got = received()
        lost = [c for c in captured if c.uuid not in got]
        return Outcome(scenario, settings.flush_interval, len(captured), len(got), lost, signals)

    @contextmanager
    def outage(self, seconds: float) -> Iterator[None]:
        """The collector down for ``seconds`` before the block, back right after it."""
        if not seconds:
            yield
            return
        self.server.stop()
        try:
            threading.Event().wait(seconds)  # the outage itself: a duration, not a sync
            yield
        finally:
            self.server.start()

    @contextmanager
    def worker(self, settings: Settings, name: str, **kwargs: Any) -> Iterator[Worker]:
        worker = soak_worker(settings, name, self.log_dir, **kwargs).start(60)
        try:
            yield worker
        finally:
            worker.kill()


def _captured_by(ledger: Ledger, pid: int) -> int:
    return sum(1 for c in ledger.captured() if c.pid == pid)


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait for processes to exit; returns those still alive (then SIGKILLed)."""

    def alive() -> list[int]:
        return [p for p in pids if psutil.pid_exists(p) and _not_zombie(p)]

    wait_for(lambda: not alive(), timeout, 0.05)
    left = alive()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def warm(
    rig: Rig,
    tasks: int,
    hold: float = 0.02,
    flush_interval: float = 300.0,
    outage: float = 0.0,
    shutdown_timeout: float = 30.0,
) -> Outcome:
    """SIGTERM while tasks run, with a flush interval far longer than the run: only the
    exit flush can deliver. With ``outage``, the collector goes down at the signal and
    comes back ``outage`` seconds later: delivered if ``shutdown_timeout`` covers the
    outage plus the transport's backoff (capped at 10 s)."""
    settings = rig.settings(flush_interval, shutdown_timeout)
    ledger = Ledger(settings)
    with rig.worker(settings, "warm") as worker:
        rig.publish(settings, tasks, hold)
        wait_for(lambda: ledger.tasks_run() >= tasks // 2, 120, 0.05)
        back = threading.Timer(outage, rig.server.start)
        if outage:
            rig.server.stop()
            back.start()
        at = time.time()
        worker.signal(signal.SIGTERM)
        code = worker.wait(shutdown_timeout + outage + 120)
        took = time.time() - at
        if outage:
            back.join()
    outcome = rig.outcome("warm", settings, [(-1, at)])
    outcome.exit_code = code
    outcome.details["tasks_run"] = ledger.tasks_run()
    outcome.details["exit_seconds"] = took
    # Covered: the timeout outlasts the outage plus one backoff wait of the transport.
    outcome.details["covered"] = not outage or shutdown_timeout >= outage + 12
    outcome.notes.append(f"{ledger.tasks_run()} of {tasks} tasks ran before it stopped")
    if outage:
        outcome.notes.append(
            f"collector down {outage:g} s from the signal, shutdown_timeout "
            f"{shutdown_timeout:g} s, exited after {took:.1f} s"
        )
    return outcome


def recycle(
    rig: Rig, tasks: int, per_child: int = 10, hold: float = 0.0, flush_interval: float = 300.0
) -> Outcome:
    """``--max-tasks-per-child``: every child but the last exits on its own. Their events
    must all arrive before the worker is stopped (the flush interval never elapses)."""
    settings = rig.settings(flush_interval)
    ledger = Ledger(settings)
    extra = ["--max-tasks-per-child", str(per_child)]
    with rig.worker(settings, "recycle", concurrency=1, extra=extra) as worker:
        rig.publish(settings, tasks, hold)
        wait_for(lambda: ledger.tasks_run() >= tasks, 300, 0.05)
        # Children that did their per_child tasks have exited (the last may be exiting).
        recycled = (tasks - 1) // per_child * per_child
        wanted = {c.uuid for c in ledger.captured()}

        def delivered(events: list[dict[str, Any]]) -> int:
            return len({e["uuid"] for e in events} & wanted)

        early = delivered(rig.server.wait_until(lambda ev: delivered(ev) >= recycled, 60))
        at = time.time()
        code = worker.stop(120)
    outcome = rig.outcome("recycle", settings, [(-1, at)])
    outcome.exit_code = code
    outcome.details.update(
        children=len(ledger.children()), delivered_before_stop=early, recycled_events=recycled
    )
    outcome.notes.append(
        f"{len(ledger.children())} children; {early} events delivered before the stop "
        f"(expected >= {recycled}: the recycled children's)"
    )
    return outcome


def main_signal(
    rig: Rig,
    signum: int,
    tasks: int,
    flush_interval: float,
    hold: float = 0.02,
    outage: float = 0.0,
) -> Outcome:
    """``signum`` (SIGQUIT or SIGKILL) to the main process while tasks run; with
    ``outage``, the collector goes down that many seconds before the signal and comes back
    just after it."""
    name = {signal.SIGQUIT: "cold", signal.SIGKILL: "kill-main"}[signum]
    settings = rig.settings(flush_interval)
    ledger = Ledger(settings)
    with rig.worker(settings, name) as worker:
        # enough work to outlast the run-up below at 2 children (the rest stays queued)
        rig.publish(settings, max(tasks, int((2 * flush_interval + 5) * 2 / hold)), hold)
        # Run past two intervals so that the loss window is not cut short by the start.
        started = time.monotonic()
        wait_for(
            lambda: (
                ledger.tasks_run() >= 20 and time.monotonic() - started > 2 * flush_interval + 1
            ),
            120,
            0.02,
        )
        children = [c.pid for c in worker.children()]
        with rig.outage(outage):
            at = time.time()
            worker.signal(signum)
        code = worker.wait(60)
        left = _wait_gone(children, 60)
    outcome = rig.outcome(name, settings, [(-1, at)])
    outcome.exit_code = code
    if outage:
        outcome.notes.append(f"collector down {outage:g} s before the signal")
    if left:
        outcome.notes.append(f"children {left} still alive 60 s after: SIGKILLed")
    return outcome


def kill_child(
    rig: Rig,
    tasks: int,
    flush_interval: float,
    kills: int = 4,
    hold: float = 0.02,
    outage: float = 0.0,
) -> Outcome:
    """SIGKILL the pool child ``kills`` times, each after it ran for two intervals (with
    ``outage``: the collector down for that long before each kill)."""
    settings = rig.settings(flush_interval)
    ledger = Ledger(settings)
    signals: list[tuple[int, float]] = []
    with rig.worker(settings, "kill-child", concurrency=1) as worker:
        rig.publish(settings, max(tasks, int(kills * (2 * flush_interval + 3) / hold)), hold)
        for _ in range(kills):
            wait_for(lambda: bool(worker.children()), 60, 0.02)
            child = worker.children()[0].pid
            started = time.monotonic()
            wait_for(
                lambda child=child, started=started: (
                    _captured_by(ledger, child) >= 5
                    and time.monotonic() - started > 2 * flush_interval + 0.5
                ),
                120,
                0.02,
            )
            with rig.outage(outage):
                signals.append((child, time.time()))
                os.kill(child, signal.SIGKILL)
            wait_for(lambda child=child: [c.pid for c in worker.children()] != [child], 60)
        code = worker.stop(120)
    outcome = rig.outcome("kill-child", settings, signals)
    outcome.exit_code = code
    outcome.notes.append(f"{kills} children killed")
    if outage:
        outcome.notes.append(f"collector down {outage:g} s before each kill")
    return outcome


@contextmanager
def rig(broker: str, log_dir: Path | None = None) -> Iterator[Rig]:
    """A collector and a producer on ``broker`` (a Redis URL) for a series of measurements."""
    with CaptureServer() as server:
        built = Rig(broker, server, log_dir or Path(tempfile.mkdtemp(prefix="soak-exits-")))
        try:
            yield built
        finally:
            built.close()


def single(r: Rig, args: argparse.Namespace) -> Outcome:
    """The one measurement ``args.exit_path`` names, with the options given."""
    tasks, interval, outage = args.exit_tasks, args.flush_interval, args.exit_outage
    if args.exit_path == "warm":
        return warm(
            r, tasks, flush_interval=interval, outage=outage,
            shutdown_timeout=args.shutdown_timeout,
        )  # fmt: skip
    if args.exit_path == "recycle":
        return recycle(r, tasks, per_child=args.per_child, flush_interval=interval)
    if args.exit_path == "kill-child":
        return kill_child(r, tasks, interval, kills=args.kills, outage=outage)
    signum = {"cold": signal.SIGQUIT, "kill-main": signal.SIGKILL}[args.exit_path]
    return main_signal(r, signum, tasks, interval, outage=outage)


def every_path(r: Rig, tasks: int) -> list[Outcome]:
    """Every exit path, at flush intervals 0.5 s and 5 s; prints one line each."""
    outcomes = [warm(r, tasks), recycle(r, tasks // 4)]
    for timeout in (10.0, 30.0):
        outcomes.append(warm(r, tasks, flush_interval=0.5, outage=10.0, shutdown_timeout=timeout))
        print(outcomes[-1].line(), flush=True)
    for interval in (0.5, 5.0):
        for signum in (signal.SIGQUIT, signal.SIGKILL):
            outcomes.append(main_signal(r, signum, tasks * 4, interval))
            print(outcomes[-1].line(), flush=True)
        outcomes.append(kill_child(r, tasks * 4, interval))
        print(outcomes[-1].line(), flush=True)
    outcomes.append(main_signal(r, signal.SIGQUIT, tasks * 4, 0.5, outage=5.0))
    print(outcomes[-1].line(), flush=True)
    outcomes.append(kill_child(r, tasks * 4, 0.5, kills=2, outage=5.0))
    print(outcomes[-1].line(), flush=True)
    return outcomes


def main(args: argparse.Namespace) -> int:
    """``--exit-path NAME``: that measurement; ``--exit-paths``: every one. Prints one line
    per measurement and, with ``--json``, writes the outcomes (one object, or a list).

    Exit status 1 when a warm or recycled exit lost events (but for an outage that
    outlasted the shutdown timeout), else 0.
    """
    tasks = args.exit_tasks
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="soak-exits-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"exit paths: {tasks} tasks each, 20 ms of work per task; logs in {log_dir}")
    with redis_for(args.redis) as url, rig(url, log_dir) as r:
        outcomes = [single(r, args)] if args.exit_path else every_path(r, tasks)
    print("\nsummary")
    for outcome in outcomes:
        print(outcome.line())
    if args.json:
        data = [o.as_dict() for o in outcomes]
        Path(args.json).write_text(json.dumps(data[0] if args.exit_path else data, indent=2))
    # Warm and recycled exits must lose nothing, but for the outage outlasting the timeout.
    bad = [
        o
        for o in outcomes
        if o.scenario in ("warm", "recycle") and o.lost and o.details.get("covered", True)
    ]
    return 1 if bad else 0
