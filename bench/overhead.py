"""What task_scopes costs per task, against bare Celery and against the peers, side by side.

    python bench/overhead.py                 # full comparison, ~25 minutes on 2 cores
    python bench/overhead.py --quick         # smoke run: 1 repetition, 500 tasks
    python bench/overhead.py --json out.json

Configurations (see ``_configs.py``): ``bare`` Celery, ``task_scopes``, and, when the
``bench`` extra is installed, ``posthog`` (``PosthogCeleryIntegration``, lifecycle events
off) and ``sentry`` (sentry-sdk ``CeleryIntegration``, traces off). Every measurement runs
in a fresh subprocess; repetitions interleave the configurations, rotating their order.

Figures (each subprocess reports one value per figure; a repetition runs ``--procs``
processes per configuration and scenario, interleaved, and keeps each figure's best:
lowest time or CPU, highest rate, lowest delivery; the table gives min / median / max of
those over the repetitions and the ratio of medians to ``bare``):

publish
    µs per ``.delay()`` to the ``memory://`` broker, the caller inside a context with a
    user, a session and three tags; warm-up excluded, best of 5 rounds of 2,000 calls.
eager
    µs per task with ``task_always_eager=True``, the task capturing one event, over the
    calls plus one flush of the event client (so sending is included); best of 5 rounds
    of 600 tasks. ``bare`` runs the same task body without the capture call. ``eager
    cpu`` is the process CPU time (all threads) over the same round.
e2e throughput
    tasks/s through a real ``celery worker -P solo`` on a private Redis, from the first of
    N publishes until the worker finished the N-th task *and* the last event reached the
    loopback receiver. Each task increments a Redis counter (all configurations). The
    worker is started and warmed up first, then stops consuming (``cancel_consumer``)
    while the N tasks are published, and consumes again (``add_consumer``): on two cores a
    concurrent publisher starves the worker, and the figures would measure the publisher
    and the worker's idle polling instead.
worker drain / publish, redis
    the two parts of it: tasks/s from ``add_consumer`` to the end, and µs per publish.
worker cpu / worker peak rss
    the worker's own CPU time (user + system, children included) per task from
    ``add_consumer`` to the end, split into its main thread and the others (the event
    clients' sending threads); its peak resident set (``VmHWM``) over its whole life.
delivered
    unique events at the receiver / events captured, eager and end to end.
sustained
    flushed only at the end, so a consumer that falls behind shows: 21,000 eager tasks
    back to back (delivered %), then one thread capturing 10,000 events a second for
    10 s (the rate it held, and delivered %), default client options; run once per
    configuration, in the first repetition; not for Sentry, which sends one HTTP request
    per event.

Receivers run in this process on loopback (``_receivers.py``): for PostHog's capture API
(task_scopes and PostHog) one that answers at once, counts event UUIDs, and checks every
request with the test suite's collector rules after the measurement (a refused request
fails the run), so parsing does not compete with the measured process for the two cores;
for Sentry a small envelope counter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _configs import CONFIGS, available
from _receivers import Receivers
from _root import BENCH

from tests.harness.redis_server import RedisServer


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool = False
    target: float | None = None  # on the ratio to bare, for task_scopes
    percent: bool = False  # an absolute percentage, not a ratio

    def meets(self, value: float) -> bool:
        if self.target is None:
            return True
        return (
            value >= self.target
            if self.higher_is_better or self.percent
            else (value <= self.target)
        )


FIGURES = (
    Figure("publish_us", "publish", "µs/call", target=1.05),
    Figure("eager_us", "eager, 1 capture", "µs/task", target=1.5),
    Figure("eager_cpu_us", "eager cpu", "µs/task"),
    Figure("e2e_tps", "e2e throughput", "tasks/s", higher_is_better=True, target=0.90),
    Figure("drain_tps", "worker drain", "tasks/s", higher_is_better=True),
    Figure("e2e_publish_us", "publish, redis", "µs/call"),
    Figure("worker_cpu_us", "worker cpu", "µs/task", target=1.15),
    Figure("worker_main_thread_cpu_us", "  main thread", "µs/task"),
    Figure("worker_other_threads_cpu_us", "  other threads", "µs/task"),
    Figure("worker_rss_mib", "worker peak rss", "MiB", target=1.15),
    Figure("eager_delivered_pct", "delivered, eager", "%", percent=True, target=100.0),
    Figure("e2e_delivered_pct", "delivered, e2e", "%", percent=True, target=100.0),
    Figure(
        "sustained_eager_delivered_pct",
        "sustained eager",
        "%",
        percent=True,
        target=100.0,
    ),
    Figure("sustained_capture_eps", "sustained capture", "ev/s", higher_is_better=True),
    Figure(
        "sustained_capture_delivered_pct",
        "  delivered",
        "%",
        percent=True,
        target=100.0,
    ),
)


def _run(scenario: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """One subprocess measuring ``scenario`` for ``config``; returns its figures."""
    with Receivers() as rx:
        cmd = [
            sys.executable, str(BENCH / "_run.py"), scenario, "--config", config,
            "--collector", rx.capture.url, "--sentry-dsn", rx.sentry.dsn,
            "--status", rx.status_url(config), "--redis", args.redis,
        ]  # fmt: skip
        if scenario == "publish":
            cmd += ["--calls", str(args.calls), "--rounds", str(args.rounds)]
        elif scenario == "eager":
            cmd += ["--tasks", str(args.eager_tasks), "--rounds", str(args.rounds)]
        elif scenario == "sustained":
            cmd += ["--eager-loop", str(args.eager_loop), "--seconds", str(args.sustained_seconds)]
        else:
            cmd += ["--tasks", str(args.tasks)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=BENCH)
        if done.returncode != 0:
            raise RuntimeError(
                f"{scenario}/{config} failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        delivered, last_arrival = rx.delivered(config)
    if scenario == "eager" and "eager_captured" in result:
        result["eager_delivered_pct"] = 100.0 * result["eager_delivered"] / result["eager_captured"]
    if scenario == "e2e":
        end = result["e2e_tasks_done"]
        if "e2e_captured" in result:
            got = delivered - result["e2e_events_before"]
            result["e2e_delivered"] = got
            result["e2e_delivered_pct"] = 100.0 * got / result["e2e_captured"]
            if got and last_arrival is not None:
                end = max(end, last_arrival)
        tasks = result["e2e_tasks"]
        result["e2e_seconds"] = end - result["e2e_start"]
        result["e2e_tps"] = tasks / result["e2e_seconds"]
        result["drain_tps"] = tasks / (end - result["e2e_consume"])
        result["e2e_publish_us"] = (result["e2e_published"] - result["e2e_start"]) / tasks * 1e6
    return result


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def _best_of(kept: dict[str, Any] | None, result: dict[str, Any]) -> dict[str, Any]:
    """Figure by figure, the better of two processes' results: the lower time, the
    higher rate; the lower delivery percentage (a loss anywhere counts)."""
    if kept is None:
        return dict(result)
    out = dict(kept)
    for fig in FIGURES:
        if fig.key in result and fig.key in kept:
            better = max if fig.higher_is_better and not fig.percent else min
            out[fig.key] = better(kept[fig.key], result[fig.key])
        elif fig.key in result:
            out[fig.key] = result[fig.key]
    return out


def summarize(
    samples: dict[str, dict[str, list[float]]], configs: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{figure: {config: {min, median, max, ratio?}}}`` from the per-run values."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for fig in FIGURES:
        per = samples.get(fig.key, {})
        rows: dict[str, dict[str, float]] = {}
        base = per.get("bare")
        for config in configs:
            values = per.get(config)
            if not values:
                continue
            row = {
                "min": min(values),
                "median": statistics.median(values),
                "max": max(values),
                "n": len(values),
            }
            if not fig.percent and base and statistics.median(base) and config != "bare":
                row["ratio"] = row["median"] / statistics.median(base)
            rows[config] = row
        if rows:
            out[fig.key] = rows
    return out


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """The printed table: one block per figure, one line per configuration."""
    head = (
        f"{'figure':<18} {'unit':<8} {'config':<12} {'min':>9} {'median':>9} {'max':>9}"
        f" {'vs bare':>8}  {'target':<10}"
    )
    lines = [head, "-" * len(head)]
    for fig in FIGURES:
        rows = summary.get(fig.key)
        if not rows:
            continue
        first = True
        for config, row in rows.items():
            ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ""
            target = ""
            if config == "task_scopes" and fig.target is not None:
                if fig.percent:
                    value, want = row["min"], f"{fig.target:.0f}%"
                    target = f">= {want}" if fig.higher_is_better or fig.percent else want
                else:
                    value = row["ratio"]
                    target = (">= " if fig.higher_is_better else "<= ") + f"{fig.target:.2f}x"
                target += "  ok" if fig.meets(value) else "  MISSED"
            label = fig.label if first else ""
            unit = fig.unit if first else ""
            lines.append(
                f"{label:<18} {unit:<8} {config:<12} {_fmt(row['min']):>9} "
                f"{_fmt(row['median']):>9} {_fmt(row['max']):>9} {ratio:>8}  {target}"
            )
            first = False
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Overhead of task_scopes against bare Celery and the peers."
    )
    parser.add_argument("--quick", action="store_true", help="1 repetition, 500 tasks")
    parser.add_argument("--json", metavar="FILE", help="write samples and summary here")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--tasks", type=int, default=None, help="e2e tasks (default 5000)")
    parser.add_argument(
        "--procs",
        type=int,
        default=None,
        help="processes per configuration, scenario and repetition, interleaved; the best "
        "counts, figure by figure (default 3; sustained: 1)",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    parser.add_argument(
        "--scenarios", default="publish,eager,e2e,sustained", help="comma-separated subset"
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("TASK_SCOPES_BENCH_REDIS", "private"),
        help="'private' (default): a redis-server of its own on a free loopback port, for "
        "the whole run (tests.harness.redis_server); or a Redis URL, where each e2e run "
        "adds keys and a queue of its own and deletes nothing",
    )
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    args.tasks = args.tasks if args.tasks is not None else (500 if args.quick else 5000)
    args.eager_tasks = 500 if args.quick else 3000
    args.eager_loop = 2_000 if args.quick else 21_000
    args.sustained_seconds = 1.0 if args.quick else 10.0
    args.calls = 500 if args.quick else 2000
    args.rounds = 3 if args.quick else 5
    args.procs = args.procs if args.procs is not None else (1 if args.quick else 3)

    configs: list[str] = []
    for name in args.configs.split(","):
        why = available(name)
        if why is None:
            configs.append(name)
        else:
            print(f"skipping {name}: {why}", file=sys.stderr)
    if "bare" not in configs:
        parser.error("the 'bare' configuration is required (ratios are to it)")
    scenarios = args.scenarios.split(",")

    with contextlib.ExitStack() as stack:
        if args.redis == "private" and "e2e" in scenarios:
            args.redis = stack.enter_context(RedisServer()).url(0)
        return _measure(args, configs, scenarios, reps)


def _measure(args: argparse.Namespace, configs: list[str], scenarios: list[str], reps: int) -> int:
    started = time.monotonic()
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    for rep in range(reps):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for scenario in scenarios:
            if scenario == "sustained" and rep > 0:
                continue  # a delivery figure, pass or fail: one run per configuration
            # each configuration's best of --procs processes, run interleaved (a slow
            # spell of the machine lasts seconds, longer than a round); the sustained
            # figures are pass or fail, one process each
            procs = args.procs if scenario != "sustained" else 1
            best: dict[str, dict[str, Any]] = {}
            for _ in range(procs):
                for config in order:
                    if scenario == "sustained" and config == "sentry":
                        continue  # one HTTP request per event: 100,000 of them take minutes
                    t0 = time.monotonic()
                    try:
                        result = _run(scenario, config, args)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        failures.append(f"rep {rep + 1} {scenario}/{config}: {exc}")
                        print(f"[rep {rep + 1}/{reps}] FAILED {failures[-1]}", file=sys.stderr)
                        continue
                    runs.append({"rep": rep, "scenario": scenario, "config": config, **result})
                    best[config] = _best_of(best.get(config), result)
                    shown = {k: round(v, 1) for k, v in result.items() if k in _SHOWN}
                    print(
                        f"[rep {rep + 1}/{reps}] {scenario:<7} {config:<12} "
                        f"{time.monotonic() - t0:5.1f}s {shown}",
                        file=sys.stderr,
                        flush=True,
                    )
            for config, result in best.items():
                for fig in FIGURES:
                    if fig.key in result:
                        samples[fig.key][config].append(float(result[fig.key]))
    summary = summarize(samples, configs)
    elapsed = time.monotonic() - started
    print(
        f"\ntask_scopes overhead: {reps} repetition(s), {args.tasks} e2e tasks, "
        f"{args.eager_tasks} eager tasks, {args.rounds}x{args.calls} publishes, each figure "
        f"the best of {args.procs} processes per repetition; medians over repetitions; "
        f"ratio = median / bare median\n"
    )
    print(table(summary))
    for failure in failures:
        print(f"FAILED (left out of the table): {failure.splitlines()[0]}")
    print(
        f"\n{platform.python_implementation()} {platform.python_version()}, "
        f"{_versions()}, {os.cpu_count()} CPUs, {elapsed / 60:.1f} min"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "argv": sys.argv[1:],
                    "reps": reps,
                    "tasks": args.tasks,
                    "configs": configs,
                    "versions": _versions(),
                    "elapsed_s": elapsed,
                    "summary": summary,
                    "runs": runs,
                    "failures": failures,
                },
                indent=2,
            )
        )
    return 1 if failures else 0


_SHOWN = {f.key for f in FIGURES}


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("celery", "kombu", "task_scopes", "posthog", "sentry-sdk"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


if __name__ == "__main__":
    raise SystemExit(main())
