"""One measurement of one configuration, in a process of its own; prints one JSON line.

    python bench/_run.py publish --config task_scopes --calls 2000 --rounds 5
    python bench/_run.py eager   --config posthog --tasks 3000 --collector URL --status URL
    python bench/_run.py e2e     --config sentry --tasks 5000 --redis URL ...

Run by ``overhead.py``; see its docstring for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from _configs import build
from _root import BENCH

from tests.harness.worker import Worker


def _events(status_url: str | None) -> int:
    """Unique events the loopback receiver holds (its ``GET /`` answers ``{"events": n}``)."""
    if not status_url:
        return 0
    with urllib.request.urlopen(status_url + "/", timeout=10) as response:
        return int(json.load(response)["events"])


def _wait_events(status_url: str | None, expected: int, *, quiet: float, deadline: float) -> int:
    """Poll until ``expected`` events arrived, or none arrived for ``quiet`` seconds, or the
    deadline (``time.monotonic()``) passed. Returns the count seen last (0 at once without
    a receiver: bare Celery sends nothing)."""
    if not status_url:
        return 0
    seen = _events(status_url)
    changed = time.monotonic()
    while seen < expected and time.monotonic() < deadline:
        time.sleep(0.02)
        now_seen = _events(status_url)
        if now_seen != seen:
            seen, changed = now_seen, time.monotonic()
        elif time.monotonic() - changed > quiet:
            break
    return seen


def run_publish(args: argparse.Namespace) -> dict[str, Any]:
    """µs per ``.delay()`` to the in-process ``memory://`` broker, inside the caller context.

    ``--warmup`` calls first (excluded), then ``--rounds`` rounds of ``--calls`` calls; the
    figure is the best round (noise from other processes only ever adds time).
    """
    built = build(
        args.config,
        broker="memory://",
        queue=f"bench-{uuid.uuid4().hex[:8]}",
        collector_url=args.collector,
        sentry_dsn=args.sentry_dsn,
    )
    delay = built.work.delay
    rounds: list[float] = []
    with built.caller_context():
        for i in range(args.warmup):
            delay(i)
        for _ in range(args.rounds):
            start = time.perf_counter()
            for i in range(args.calls):
                delay(i)
            rounds.append((time.perf_counter() - start) / args.calls * 1e6)
    return {"publish_us": min(rounds), "publish_rounds_us": rounds}


def run_eager(args: argparse.Namespace) -> dict[str, Any]:
    """µs per eager task (``task_always_eager``), the task capturing one event.

    ``--tasks`` tasks in ``--rounds`` rounds; each round's clock runs over its ``.delay()``
    calls *plus one flush of the event client*, so serializing and sending the events are
    in the figure. The figure is the best round; CPU time of the whole process (all
    threads) per task is that of the same round.
    """
    built = build(
        args.config,
        broker="memory://",
        queue=f"bench-{uuid.uuid4().hex[:8]}",
        eager=True,
        collector_url=args.collector,
        sentry_dsn=args.sentry_dsn,
    )
    delay = built.work.delay
    status = args.status if built.capture is not None else None
    per_round = max(1, args.tasks // args.rounds)
    rounds: list[tuple[float, float]] = []
    with built.caller_context():
        for i in range(args.warmup):
            delay(i)
        built.flush()
        before = _wait_events(status, args.warmup, quiet=2.0, deadline=time.monotonic() + 30)
        for _ in range(args.rounds):
            cpu0 = time.process_time()
            start = time.perf_counter()
            for i in range(per_round):
                delay(i)
            built.flush()
            elapsed = time.perf_counter() - start
            rounds.append(
                (elapsed / per_round * 1e6, (time.process_time() - cpu0) / per_round * 1e6)
            )
    captured = per_round * args.rounds
    after = _wait_events(status, before + captured, quiet=3.0, deadline=time.monotonic() + 60)
    best = min(rounds)
    result: dict[str, Any] = {
        "eager_us": best[0],
        "eager_cpu_us": best[1],
        "eager_rounds_us": [r[0] for r in rounds],
    }
    if built.capture is not None:
        result["eager_captured"] = captured
        result["eager_delivered"] = after - before
    return result


def run_sustained(args: argparse.Namespace) -> dict[str, Any]:
    """Sustained capture, flushed only at the end, so a consumer that falls behind shows.

    Two loops, each ending with one flush: ``--eager-loop`` eager tasks back to back (each
    capturing one event), then one thread capturing ``--rate`` events a second for
    ``--seconds`` seconds (paced every 100 events). Figures: the percentage of the captured
    events the receiver got, for each loop, and the capture rate the second loop held.
    """
    built = build(
        args.config,
        broker="memory://",
        queue=f"bench-{uuid.uuid4().hex[:8]}",
        eager=True,
        collector_url=args.collector,
        sentry_dsn=args.sentry_dsn,
    )
    if built.capture is None:
        return {}
    status = args.status
    delay = built.work.delay
    result: dict[str, Any] = {}
    with built.caller_context():
        before = _events(status)
        for i in range(args.eager_loop):
            delay(i)
        built.flush()
        got = _wait_events(
            status, before + args.eager_loop, quiet=5.0, deadline=time.monotonic() + 120
        )
        result["sustained_eager_delivered_pct"] = 100.0 * (got - before) / args.eager_loop
        capture = built.capture
        total = int(args.rate * args.seconds)
        before = _events(status)
        start = time.perf_counter()
        for i in range(total):
            capture("bench_sustained", {"i": i})
            if i % 100 == 99:
                ahead = start + (i + 1) / args.rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
        elapsed = time.perf_counter() - start
        built.flush()
        got = _wait_events(status, before + total, quiet=5.0, deadline=time.monotonic() + 120)
    result["sustained_capture_eps"] = total / elapsed
    result["sustained_capture_delivered_pct"] = 100.0 * (got - before) / total
    return result


def _cpu_seconds(proc: Any) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def _thread_cpu(proc: Any) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``proc``, by thread ID."""
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def _peak_rss(pid: int) -> int | None:
    """The process's peak resident set (``VmHWM``) in bytes, or None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput, worker CPU and peak RSS with a real ``celery worker -P solo`` on Redis.

    The worker is started and warmed up with ``--warmup`` tasks (their events delivered)
    before anything is measured. Then it stops consuming its queue, the ``--tasks``
    messages are published (the clock starts at the first), and it consumes again. The
    worker stores its clock when the counter reaches ``--tasks``; the orchestrator adds the
    arrival time of the last event at the receiver. Worker CPU is counted from the moment
    it resumes consuming (``e2e_consume``) to the end.
    """
    import psutil  # type: ignore[import-untyped]
    import redis

    rdb = redis.Redis.from_url(args.redis)
    queue = f"bench-{args.config}-{uuid.uuid4().hex[:8]}"
    # Keys of this run only: a --redis URL given by hand is shared, and nothing is flushed.
    warm, timed = f"{queue}:warm", f"{queue}:timed"
    env = {
        "BENCH_CONFIG": args.config,
        "BENCH_BROKER": args.redis,
        "BENCH_QUEUE": queue,
        "BENCH_REDIS": args.redis,
        "BENCH_COLLECTOR": args.collector or "",
        "BENCH_SENTRY_DSN": args.sentry_dsn or "",
    }
    log_dir = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    worker = Worker(
        "_worker_app",
        name=queue,
        queue=queue,
        log_path=log_dir / "worker.log",
        env=env,
        pool="solo",
        concurrency=1,
        loglevel="WARNING",
        path=[BENCH],
        ready=lambda: bool(rdb.exists(f"{queue}:ready")),  # set by _worker_app
    )
    log = worker.log_path
    try:
        worker.start(120)
        built = build(
            args.config,
            broker=args.redis,
            queue=queue,
            collector_url=args.collector,
            sentry_dsn=args.sentry_dsn,
            redis_url=args.redis,
        )
        delay = built.work.delay
        instrumented = built.capture is not None
        status = args.status if instrumented else None
        proc = psutil.Process(worker.pid)
        with built.caller_context():
            for i in range(args.warmup):
                delay(i, warm, args.warmup)
            deadline = time.monotonic() + 120
            while rdb.get(f"{warm}:done") is None:
                if not worker.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"worker not ready; log in {log}")
                time.sleep(0.02)
            before = _wait_events(status, args.warmup, quiet=3.0, deadline=time.monotonic() + 30)
            # Stop consuming, publish everything, then consume: a concurrent publisher would
            # compete with the worker for the two cores and starve it, so the figures would
            # measure the publisher and the worker's idle polling.
            control = built.app.control
            name = [worker.hostname]
            if not control.cancel_consumer(queue, destination=name, reply=True, timeout=30):
                raise RuntimeError(f"worker did not stop consuming; log in {log}")
            start = time.perf_counter()
            for i in range(args.tasks):
                delay(i, timed, args.tasks)
            published = time.perf_counter()
        cpu0 = _cpu_seconds(proc)
        threads0 = _thread_cpu(proc)
        consume = time.perf_counter()
        if not control.add_consumer(queue, destination=name, reply=True, timeout=30):
            raise RuntimeError(f"worker did not resume consuming; log in {log}")
        rss_max = 0
        deadline = time.monotonic() + max(120.0, args.tasks / 20)
        seen, changed = _events(status), time.monotonic()
        while time.monotonic() < deadline:
            rss_max = max(rss_max, proc.memory_info().rss)
            done = rdb.get(f"{timed}:done") is not None
            now_seen = _events(status)
            if now_seen != seen:
                seen, changed = now_seen, time.monotonic()
            if done and (seen >= before + args.tasks or time.monotonic() - changed > 3.0):
                break
            if not worker.alive():
                raise RuntimeError(f"worker exited; log in {log}")
            time.sleep(0.02)
        else:
            done_count = int(rdb.get(timed) or 0)
            raise RuntimeError(f"timed out: {done_count} tasks done; log in {log}")
        cpu = _cpu_seconds(proc) - cpu0
        threads = _thread_cpu(proc)
        main_cpu = threads.get(worker.pid, 0.0) - threads0.get(worker.pid, 0.0)
        peak = _peak_rss(worker.pid) or rss_max
        done_at = float(rdb.get(f"{timed}:done") or "nan")
    finally:
        if worker.proc is not None:
            worker.stop(30)
    shutil.rmtree(log_dir)
    result: dict[str, Any] = {
        "e2e_start": start,
        "e2e_published": published,
        "e2e_consume": consume,
        "e2e_tasks_done": done_at,
        "e2e_tasks": args.tasks,
        "worker_cpu_us": cpu / args.tasks * 1e6,
        "worker_main_thread_cpu_us": main_cpu / args.tasks * 1e6,
        "worker_other_threads_cpu_us": (cpu - main_cpu) / args.tasks * 1e6,
        "worker_rss_mib": peak / 2**20,
        "worker_rss_sampled_mib": rss_max / 2**20,
    }
    if instrumented:
        result["e2e_events_before"] = before
        result["e2e_captured"] = args.tasks
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=("publish", "eager", "e2e", "sustained"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--collector", help="PostHog-style capture host (loopback)")
    parser.add_argument("--sentry-dsn")
    parser.add_argument("--status", help="receiver URL answering GET / with event counts")
    parser.add_argument("--redis", help="Redis URL (e2e): overhead.py passes its own server's")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--eager-loop", type=int, default=21_000)
    parser.add_argument("--rate", type=float, default=10_000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    runner = {
        "publish": run_publish,
        "eager": run_eager,
        "e2e": run_e2e,
        "sustained": run_sustained,
    }[args.scenario]
    result = runner(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
