"""Per-operation cost of task_scopes' hot paths, in one process, with real Celery objects.

    python bench/profile_hot_paths.py               # µs per operation, best of 5 rounds
    python bench/profile_hot_paths.py --cprofile trace_capture   # top functions of one

Operations (the caller inside a context with a user, a session and three tags):

publish_bare / publish
    ``.delay()`` to ``memory://``, plugin uninstalled / installed.
before_task_publish
    the plugin's ``before_task_publish`` handler alone (encode the header).
trace_bare / trace / trace_capture
    Celery's own per-task tracer (``celery.app.trace.build_tracer``, what a worker runs for
    every message) on a request carrying the header, without a broker: plugin uninstalled
    with an empty task; installed (prerun decode + scope open, postrun close); installed
    with a task calling ``capture()`` once.
capture
    ``task_scopes.capture()`` inside a restored task scope: build, check and serialize the
    event in the caller's thread, then enqueue the JSON string.
batch_encode
    the consumer's work per event: join the serialized events into a ``/batch/`` body,
    gzip (serializing moved into ``capture()``).
send
    ``HttpTransport.send()`` of 100-event batches to a loopback collector subprocess,
    per event.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import pstats
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from _configs import SESSION, TAGS, USER
from celery import Celery, signals
from celery.app.trace import build_tracer

import task_scopes
import task_scopes.celery
from task_scopes._consumer import Consumer, Counters
from task_scopes._event import freeze
from task_scopes._transport import HttpTransport, batch_body


class _Discard:
    """A transport that drops every batch (the consumer is not what ``capture`` measures)."""

    def send(self, batch: Any) -> int:
        return 0

    def close(self) -> None:
        pass


def _context() -> Any:
    ctx = task_scopes.new_context()
    ctx.__enter__()
    task_scopes.identify_context(USER)
    task_scopes.set_context_session(SESSION)
    for key, value in TAGS.items():
        task_scopes.tag(key, value)
    return ctx


def _best(fn: Callable[[int], None], n: int, rounds: int = 5) -> float:
    """µs per operation: ``fn(n)`` does n operations; best of ``rounds`` after a warm-up."""
    fn(max(1, n // 10))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(n)
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def build(n: int) -> dict[str, Callable[[int], None]]:
    """The operations, each ``op(count)``."""
    app = Celery("profile", broker="memory://", set_as_current=True)
    app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)
    app.conf.task_scopes_api_key = "phc_profile"
    app.conf.task_scopes_flush_at = 10**7
    app.conf.task_scopes_max_queue_size = 10**8
    app.conf.task_scopes_flush_interval = 3600.0

    @app.task(name="bench.empty")  # type: ignore[untyped-decorator]
    def empty(i: int) -> int:
        return i

    @app.task(name="bench.capture")  # type: ignore[untyped-decorator]
    def capturing(i: int) -> int:
        task_scopes.capture("bench task done", properties={"i": i, "source": "bench"})
        return i

    task_scopes.celery.install(app)
    task_scopes.init(
        "phc_profile", transport=_Discard(), flush_at=10**7, max_queue_size=10**8,
        flush_interval=3600.0,
    )  # fmt: skip
    _context()

    # A request as the worker builds it: the message headers (ours included) + delivery.
    grabbed: dict[str, Any] = {}

    def grab(headers: Any = None, **_: Any) -> None:
        grabbed.update(headers)

    signals.before_task_publish.connect(grab, weak=False)
    empty.delay(0)
    signals.before_task_publish.disconnect(grab)
    request = dict(grabbed)
    request.update(
        delivery_info={"exchange": "", "routing_key": "celery", "priority": 0,
                       "redelivered": False},
        hostname="bench@host", reply_to=None, correlation_id=request["id"],
    )  # fmt: skip
    if "task_scopes" not in request:
        raise SystemExit("no task_scopes header on the published message")
    from task_scopes.celery._signals import _on_before_task_publish

    def publish(count: int) -> None:
        delay = empty.delay
        for i in range(count):
            delay(i)

    def publish_bare(count: int) -> None:
        task_scopes.celery.uninstall(app)
        try:
            publish(count)
        finally:
            task_scopes.celery.install(app)

    def before_task_publish(count: int) -> None:
        for _ in range(count):
            _on_before_task_publish(headers={"id": "x", "task": "bench.empty"})

    def tracer(task: Any) -> Callable[[int], None]:
        trace = build_tracer(task.name, task, app=app, hostname="bench@host")

        def run(count: int) -> None:
            for i in range(count):
                trace(request["id"], (i,), {}, request)

        return run

    trace, trace_capture = tracer(empty), tracer(capturing)

    def trace_bare(count: int) -> None:
        task_scopes.celery.uninstall(app)
        try:
            tracer(empty)(count)
        finally:
            task_scopes.celery.install(app)

    def capture(count: int) -> None:
        # Inside a scope shaped like a task's: restored context plus the celery_* tags.
        with task_scopes.new_context(fresh=True):
            task_scopes.identify_context(USER)
            task_scopes.set_context_session(SESSION)
            for key, value in {
                **TAGS,
                "celery_task_id": request["id"],
                "celery_task_name": "bench.capture",
                "celery_retry_count": 0,
                "celery_queue": "celery",
                "celery_hostname": "h",
            }.items():
                task_scopes.tag(key, value)  # fmt: skip
            cap = task_scopes.capture
            for i in range(count):
                cap("bench task done", properties={"i": i, "source": "bench"})

    events: list[str] = []
    client = task_scopes.Client("phc_profile", transport=_Discard())
    with task_scopes.new_context():
        task_scopes.identify_context(USER)
        task_scopes.set_context_session(SESSION)
        for key, value in TAGS.items():
            task_scopes.tag(key, value)
        for key in ("celery_task_id", "celery_task_name", "celery_queue", "celery_hostname"):
            task_scopes.tag(key, request["id"])
        grab_events: list[dict[str, Any]] = []
        client.before_send = lambda e: grab_events.append(e)
        client.capture("bench task done", properties={"i": 1, "source": "bench"})
        events = [freeze(e) for e in grab_events] * 100  # what capture() queues

    def batch_encode(count: int) -> None:
        consumer = Consumer(deque(), _Discard(), Counters(), flush_at=100, flush_interval=1.0)
        for _ in range(count // 100 or 1):
            consumer.queue.extend(events)
            batch = consumer._take()
            gzip.compress(batch_body("phc_profile", batch), compresslevel=1)

    collector = subprocess.Popen(
        [sys.executable, "-m", "task_scopes.collector", "--port", "0", "--out", "/dev/null"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert collector.stdout is not None
    url = collector.stdout.readline().split()[2]
    transport = HttpTransport("phc_profile", url)
    batch = Consumer(
        deque(events), _Discard(), Counters(), flush_at=100, flush_interval=1.0
    )._take()

    def send(count: int) -> None:
        for _ in range(count // 100 or 1):
            if transport.send(batch):
                raise RuntimeError("collector refused a batch")

    ops = {
        "publish_bare": publish_bare,
        "publish": publish,
        "before_task_publish": before_task_publish,
        "trace_bare": trace_bare,
        "trace": trace,
        "trace_capture": trace_capture,
        "capture": capture,
        "batch_encode": batch_encode,
        "send": send,
    }
    ops["_collector"] = lambda count: collector.terminate()
    return ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="operations per round")
    parser.add_argument("--cprofile", metavar="OP", help="profile one operation instead")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    ops = build(args.n)
    stop = ops.pop("_collector")
    try:
        if args.cprofile:
            op = ops[args.cprofile]
            op(args.n // 10)
            profiler = cProfile.Profile()
            profiler.runcall(op, args.n)
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(args.top)
            return 0
        for name, op in ops.items():
            per = _best(op, args.n if name not in ("batch_encode", "send") else args.n * 4)
            print(f"{name:<22} {per:8.2f} µs/op")
    finally:
        stop(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
