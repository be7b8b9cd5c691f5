"""Soak: tens of thousands of tasks through a real prefork worker while the collector fails.

    python bench/soak.py                     # 20,000 tasks, 10 s outages, 5 s stalls
    python bench/soak.py --tasks 2000 --rate 50 --outage 3 --stall 2 --http-timeout 1  # CI
    python bench/soak.py --exit-paths        # loss on SIGTERM / SIGQUIT / SIGKILL instead
    python bench/soak.py --exit-path warm --flush-interval 300 --json out.json  # one of them

What runs:

* a ``celery worker -P prefork -c 2`` on Redis (by default a ``redis-server`` of the run's
  own on a free port, gone with its data at the end; ``--redis URL`` to use another, where
  the run adds keys under its own prefix and queue and deletes nothing), running
  ``_soak_app.work``, which captures one event saying which context it expects and
  records the event's UUID in Redis;
* ``--producers`` threads publishing ``--tasks`` tasks (``--rate`` per second in all, so
  that the faults meet a steady flow) in batches of ``--batch``, each
  batch inside its own ``new_context(fresh=True)`` with a distinct ID, session ID and tag
  of its own, so an event restored into the wrong context is detectable;
* the loopback collector (``task_scopes.testing.CaptureServer``) in this process, failing
  on a schedule keyed to progress (tasks run / tasks): 500s, 429 with ``Retry-After: 1``,
  stalls of ``--stall`` seconds (longer than ``--http-timeout``, so the client times out,
  retries, and the collector receives the batch twice: the duplicates it absorbs), and
  ``--outage`` seconds fully down (socket closed); each fault waits until the previous
  one has cleared (two batches accepted), so one batch meets one incident at a time;
* halfway, during an outage, SIGTERM to the worker and a fresh worker started: the old
  worker's children must deliver what they hold once the collector is back
  (``task_scopes_shutdown_timeout``, default here 30 s, is longer than the outage).

It prints tasks published, tasks run, events captured (per process, from
``client.stats()`` written at each process's exit), events received (unique UUIDs),
duplicates, lost and misattributed events, and the worker's peak RSS (main + children)
per quarter of the run. Exit status 0 only when nothing captured was lost or
misattributed, every task ran, every process reported, and the RSS of the last quarter
is within ``--rss-tolerance`` of the first.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _root  # noqa: F401  (puts the repository root on sys.path, for tests.harness)
from _soak_ledger import Ledger, RssSample, RssSampler, Settings, redis_for, soak_worker

import task_scopes
from task_scopes.testing import CaptureServer, Reply
from tests.harness.worker import Worker, wait_for

MIB = 1024 * 1024
EVENT = "soak task"
EXIT_PATHS = ("warm", "recycle", "cold", "kill-main", "kill-child")  # see _soak_exits


@dataclass
class Fleet:
    """The worker consuming now, and the ones retired, with what happened to them."""

    settings: Settings
    log_dir: Path
    concurrency: int
    current: Worker | None = None
    started: int = 0
    notes: list[str] = field(default_factory=list)

    def start(self) -> Worker:
        self.started += 1
        worker = soak_worker(
            self.settings, f"soak-{self.started}", self.log_dir, concurrency=self.concurrency
        ).start(60)
        self.current = worker
        return worker


class Faults(threading.Thread):
    """Applies the fault schedule as the run progresses (fractions of tasks run)."""

    def __init__(
        self,
        server: CaptureServer,
        fleet: Fleet,
        ledger: Ledger,
        total: int,
        args: argparse.Namespace,
    ) -> None:
        super().__init__(name="faults", daemon=True)
        self.server, self.fleet, self.ledger, self.total = server, fleet, ledger, total
        self.outage, self.stall = args.outage, args.stall
        self.shutdown_budget = args.shutdown_timeout + 60
        self.schedule = [
            (0.10, "500"), (0.20, "429"), (0.30, "stall"), (0.40, "down"),
            (0.50, "restart"),
            (0.60, "500"), (0.70, "429"), (0.80, "stall"), (0.90, "down"),
        ]  # fmt: skip
        self.applied: list[str] = []
        self.abort = threading.Event()  # set when the run cannot be trusted any more
        self.started = time.monotonic()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for at, kind in self.schedule:
                wait_for(
                    lambda at=at: self.abort.is_set() or self.ledger.tasks_run() >= at * self.total,
                    3600,
                    0.1,
                )
                if self.abort.is_set():
                    return
                progress = self.ledger.tasks_run() / self.total
                elapsed = time.monotonic() - self.started
                detail = getattr(self, f"_{kind}")()
                line = f"at {elapsed:5.1f} s, {progress:6.1%} of tasks run: {detail}"
                print(f"fault {line}", file=sys.stderr, flush=True)
                self.applied.append(line)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _recovered(self, since: int, scripted: int = 0) -> None:
        """Wait until the ``scripted`` answers queued after request number ``since`` were
        given and two batches were accepted after them (or every task ran: no traffic), so
        that one batch meets one fault at a time, as in a real incident."""

        def done() -> bool:
            answers = self.server.requests[since + scripted :]
            return sum(1 for _, status, _ in answers if status == 200) >= 2

        wait_for(lambda: done() or self.ledger.tasks_run() >= self.total, 120, 0.1)

    def _500(self) -> str:
        since = len(self.server.requests)
        self.server.script(*[500] * 6)
        self._recovered(since, 6)
        return "6 x HTTP 500"

    def _429(self) -> str:
        since = len(self.server.requests)
        self.server.script(*[(429, {"Retry-After": "1"})] * 4)
        self._recovered(since, 4)
        return "4 x HTTP 429, Retry-After: 1"

    def _stall(self) -> str:
        since = len(self.server.requests)
        self.server.script(*[Reply(200, delay=self.stall)] * 2)
        self._recovered(since, 2)
        return f"2 x {self.stall:g} s stall, then 200"

    def _down(self) -> str:
        self.server.stop()
        threading.Event().wait(self.outage)  # the outage itself: a duration, not a sync
        since = len(self.server.requests)
        self.server.start()
        self._recovered(since)
        return f"collector down {self.outage:g} s"

    def _restart(self) -> str:
        old = self.fleet.current
        assert old is not None
        self.server.stop()
        down_at = time.monotonic()
        # The collector comes back on time whatever the new worker's start-up takes.
        back = threading.Timer(self.outage, self.server.start)
        back.start()
        old.signal(signal.SIGTERM)
        new = self.fleet.start()
        back.join()
        since = len(self.server.requests)
        code = old.wait(self.shutdown_budget)
        self._recovered(since)
        took = time.monotonic() - down_at
        self.fleet.notes.append(
            f"{old.name} (pid {old.pid}) SIGTERM during a {self.outage:g} s outage: "
            f"exit code {code} after {took:.1f} s; {new.name} (pid {new.pid}) took over"
        )
        return f"collector down {self.outage:g} s + SIGTERM {old.name}, start {new.name}"


def progress(
    ledger: Ledger, server: CaptureServer, halt: threading.Event, every: float = 10.0
) -> None:
    """Print a line to stderr every ``every`` seconds until ``halt`` is set."""
    started = time.monotonic()
    while not halt.wait(every):
        print(
            f"{time.monotonic() - started:6.1f} s: {ledger.tasks_run()} tasks run, "
            f"{len(server.events)} events received, {server.duplicates} duplicates",
            file=sys.stderr,
            flush=True,
        )


def publish(work: Any, args: argparse.Namespace, run_id: str, abort: threading.Event) -> int:
    """Publish ``args.tasks`` tasks from ``args.producers`` threads. Returns the count."""
    per_producer = args.tasks // args.producers
    counts = [0] * args.producers
    # Paced so that the faults, keyed to progress, meet a steady flow of tasks.
    interval = args.producers / args.rate
    errors: list[BaseException] = []

    def producer(index: int) -> None:
        try:
            first = index * per_producer
            last = args.tasks if index == args.producers - 1 else first + per_producer
            next_at = time.monotonic()
            for batch_start in range(first, last, args.batch):
                if abort.is_set():
                    return
                expected = f"{run_id}-p{index}-b{batch_start // args.batch}"
                with task_scopes.new_context(fresh=True):
                    task_scopes.identify_context(f"user-{expected}")
                    task_scopes.set_context_session(f"session-{expected}")
                    task_scopes.tag("soak_batch", expected)
                    for seq in range(batch_start, min(batch_start + args.batch, last)):
                        next_at += interval
                        time.sleep(max(0.0, next_at - time.monotonic()))  # pacing, not a sync
                        work.delay(expected, seq)
                        counts[index] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=producer, args=(i,), name=f"producer-{i}")
        for i in range(args.producers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(counts)


def misattributed(event: dict[str, Any]) -> bool:
    """The event's distinct ID, session ID or tag differ from what its task expected."""
    props = event.get("properties", {})
    expected = props.get("expected_batch")
    return (
        event.get("distinct_id") != f"user-{expected}"
        or props.get("$session_id") != f"session-{expected}"
        or props.get("soak_batch") != expected
    )


def rss_quarters(samples: list[RssSample], total: int) -> list[tuple[int, int] | None]:
    """Peak ``(main + children, largest child)`` RSS per quarter of tasks run."""
    peaks: list[tuple[int, int] | None] = [None] * 4
    for sample in samples:
        quarter = min(3, sample.progress * 4 // max(total, 1))
        peak = peaks[quarter]
        peaks[quarter] = (
            (sample.total, sample.largest_child)
            if peak is None
            else (max(peak[0], sample.total), max(peak[1], sample.largest_child))
        )
    return peaks


def summarize(
    args: argparse.Namespace,
    published: int,
    ledger: Ledger,
    server: CaptureServer,
    sampler: RssSampler,
    seconds: float,
) -> dict[str, Any]:
    captured = ledger.captured()
    stats = ledger.stats()
    children = ledger.children()
    events = [e for e in server.events if e.get("event") == EVENT]
    received = {e["uuid"] for e in events}
    lost = [c for c in captured if c.uuid not in received]
    wrong = [e for e in events if misattributed(e)]
    per_process = {pid: s for pid, s in sorted(stats.items())}
    quarters = rss_quarters(sampler.samples, published)
    return {
        "tasks": args.tasks,
        "producers": args.producers,
        "distinct_ids": len({e["distinct_id"] for e in events}),
        "seconds": round(seconds, 1),
        "tasks_published": published,
        "tasks_run": ledger.tasks_run(),
        "events_captured": len(captured),
        "events_captured_by_processes": sum(s["captured"] for s in stats.values()),
        "per_process": per_process,
        "children_started": sorted(children),
        "children_unreported": sorted(children - set(stats)),
        "events_received": len(received),
        "other_events_received": len(server.events) - len(events),
        "duplicates": server.duplicates,
        "requests": dict(Counter(status for _, status, _ in server.requests)),
        "lost": len(lost),
        "lost_sample": [c.uuid for c in lost[:5]],
        "misattributed": len(wrong),
        "misattributed_sample": [
            {"distinct_id": e["distinct_id"], "expected": e["properties"].get("expected_batch")}
            for e in wrong[:5]
        ],
        "failed": sum(s["failed"] for s in stats.values()),
        "dropped": sum(s["dropped"] for s in stats.values()),
        "rss_peak_mib": [None if q is None else round(q[0] / MIB, 1) for q in quarters],
        "rss_largest_child_mib": [None if q is None else round(q[1] / MIB, 1) for q in quarters],
        "rss_samples": len(sampler.samples),
    }


def verdict(summary: dict[str, Any], tolerance: float, restarted: bool) -> list[str]:
    """Reasons the run failed; empty when it passed."""
    problems = []
    if summary["tasks_run"] < summary["tasks_published"]:
        problems.append("not every published task ran")
    if summary["lost"]:
        problems.append(f"{summary['lost']} captured events lost")
    if summary["misattributed"]:
        problems.append(f"{summary['misattributed']} events misattributed")
    if summary["children_unreported"]:
        problems.append(f"pool children never reported: {summary['children_unreported']}")
    if summary["events_captured_by_processes"] != summary["events_captured"]:
        problems.append("client.stats() captured counts disagree with the tasks' records")
    if summary["failed"] or summary["dropped"]:
        problems.append("the client gave up on or dropped events")
    if not restarted:
        problems.append("the halfway worker restart did not happen")
    first, last = summary["rss_peak_mib"][0], summary["rss_peak_mib"][3]
    if first is None or last is None:
        problems.append("no RSS samples in the first or last quarter")
    elif last > first * (1 + tolerance):
        problems.append(f"RSS grew from {first} MiB to {last} MiB (> {tolerance:.0%})")
    return problems


def report(summary: dict[str, Any], faults: list[str], notes: list[str]) -> None:
    s = summary
    lines = [
        f"soak: {s['tasks']} tasks from {s['producers']} producer threads "
        f"({s['distinct_ids']} distinct IDs), {s['seconds']} s",
        *(f"  fault {line}" for line in faults),
        *(f"  restart: {note}" for note in notes),
        f"tasks published        {s['tasks_published']}",
        f"tasks run              {s['tasks_run']}",
        f"events captured        {s['events_captured']} (tasks' records); "
        f"{s['events_captured_by_processes']} (sum of client.stats() of "
        f"{len(s['per_process'])} processes)",
    ]
    for pid, st in s["per_process"].items():
        lines.append(
            f"  pid {pid:>7} {st['role']:5}  captured {st['captured']:>6}  delivered "
            f"{st['delivered']:>6}  failed {st['failed']}  dropped {st['dropped']}"
        )
    lines += [
        f"events received        {s['events_received']} unique UUIDs "
        f"(+{s['other_events_received']} other events)",
        f"duplicates             {s['duplicates']} (retried deliveries the collector absorbed)",
        f"collector answers      {s['requests']}",
        f"lost                   {s['lost']} {s['lost_sample'] or ''}",
        f"misattributed          {s['misattributed']} {s['misattributed_sample'] or ''}",
        f"worker peak RSS (MiB)  main+children per quarter: {s['rss_peak_mib']}; "
        f"largest child: {s['rss_largest_child_mib']} ({s['rss_samples']} samples)",
        f"  first quarter {s['rss_peak_mib'][0]} MiB, last quarter {s['rss_peak_mib'][3]} MiB",
    ]
    print("\n".join(lines), flush=True)


def soak(args: argparse.Namespace) -> int:
    with redis_for(args.redis) as url, CaptureServer() as server:
        settings = Settings(
            broker=url,
            collector=server.url,
            flush_interval=args.flush_interval,
            shutdown_timeout=args.shutdown_timeout,
            http_timeout=args.http_timeout,
        )
        app_module = settings.app_module()
        app_module.app.finalize(auto=True)
        ledger = Ledger(settings)
        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="soak-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        fleet = Fleet(settings, log_dir, args.concurrency)
        fleet.start()
        sampler = RssSampler(lambda: fleet.current, ledger.tasks_run)
        faults = Faults(server, fleet, ledger, args.tasks, args)
        started = time.monotonic()
        halt = threading.Event()
        threading.Thread(target=progress, args=(ledger, server, halt), daemon=True).start()
        sampler.start()
        faults.start()
        try:
            run_id = settings.prefix.split(":")[1]
            published = publish(app_module.work, args, run_id, faults.abort)
            done = wait_for(
                lambda: faults.abort.is_set() or ledger.tasks_run() >= published,
                args.deadline,
                0.2,
            )
            faults.join(args.deadline)
            assert fleet.current is not None
            code = fleet.current.stop(args.shutdown_timeout + 60)
            fleet.notes.append(f"{fleet.current.name} SIGTERM at the end: exit code {code}")
        finally:
            halt.set()
            sampler.stop()
            if fleet.current is not None:
                fleet.current.kill()
        wait_for(lambda: len(server.events) >= len(ledger.captured()), 10, 0.1)
        seconds = time.monotonic() - started
        summary = summarize(args, published, ledger, server, sampler, seconds)
    report(summary, faults.applied, fleet.notes)
    problems = verdict(summary, args.rss_tolerance, fleet.started >= 2)
    if not done:
        problems.append(f"tasks still running after {args.deadline} s")
    if faults.error is not None:
        problems.append(f"fault schedule failed: {faults.error!r}")
    summary["problems"] = problems
    summary["logs"] = str(log_dir)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"worker logs in {log_dir}")
    print("verdict: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)), flush=True)
    return 0 if not problems else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--tasks", type=int, default=20_000, help="tasks to publish")
    add("--producers", type=int, default=4, help="publishing threads")
    add("--rate", type=float, default=100.0, help="tasks published per second, in all")
    add("--batch", type=int, default=50, help="tasks per producer context (distinct ID)")
    add("--concurrency", type=int, default=2, help="prefork pool children")
    add(
        "--redis",
        default="private",
        help="broker and bookkeeping: 'private' (default), a redis-server of the run's own "
        "on a free port, gone with its data at the end; or a Redis URL, where the run adds "
        "keys under its own prefix and queue and deletes nothing",
    )
    add("--outage", type=float, default=10.0, help="seconds the collector is fully down")
    add("--stall", type=float, default=5.0, help="seconds a stalled collector answer takes")
    add("--http-timeout", type=float, default=3.0, help="task_scopes_timeout, seconds")
    add("--flush-interval", type=float, default=0.5, help="task_scopes_flush_interval")
    add("--shutdown-timeout", type=float, default=30.0, help="task_scopes_shutdown_timeout")
    add("--rss-tolerance", type=float, default=0.15, help="allowed last/first quarter growth")
    add("--deadline", type=float, default=1800.0, help="seconds to wait for the tasks")
    add("--log-dir", help="worker logs (default: a new temporary directory)")
    add("--json", help="also write the summary (or the exit-path outcomes) as JSON here")
    exits = parser.add_argument_group("exit paths")
    exits.add_argument("--exit-paths", action="store_true", help="measure loss per exit path")
    exits.add_argument(
        "--exit-path",
        choices=EXIT_PATHS,
        help="one exit-path measurement, with --exit-tasks, --flush-interval, "
        "--shutdown-timeout, --exit-outage, --per-child, --kills",
    )
    exits.add_argument("--exit-tasks", type=int, default=400, help="tasks per measurement")
    exits.add_argument(
        "--exit-outage",
        type=float,
        default=0.0,
        help="--exit-path: seconds the collector is down (warm: from the signal; cold, "
        "kill-main, kill-child: before each signal)",
    )
    exits.add_argument("--per-child", type=int, default=10, help="recycle: tasks per child")
    exits.add_argument("--kills", type=int, default=4, help="kill-child: children killed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: where is it stuck?
    if args.exit_paths or args.exit_path:
        from _soak_exits import main as exits

        return exits(args)
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
