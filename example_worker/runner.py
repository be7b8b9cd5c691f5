"""``python -m example_worker``: run the shop end to end and say what arrived.

With no arguments nothing outside this machine is needed: the loopback collector and the
shop's web app (:mod:`example_worker.web`, wrapped in ``task_scopes.wsgi.ContextMiddleware``)
run in this process on free ports, kombu's ``filesystem://`` broker and a ``file://``
result backend (the chord needs one) live in a temporary folder, and a real
``celery -A example_worker.app worker -P prefork`` subprocess runs the tasks. The shoppers'
browsers (:mod:`example_worker.browser`) post their checkouts to the web app over loopback
HTTP, at the same time, with posthog-js's ``X-POSTHOG-*`` tracing headers.

Exit status: 0 when every expected event (:data:`example_worker.plan.EXPECTED`) arrived
attributed to the right user and nothing else arrived; 1 otherwise (the web app refused a
checkout, the worker died, an event is missing or wrong), saying what; 2 when the demo
could not run (bad options, broker unreachable). With ``--host`` the events go to a real
PostHog, where arrival cannot be checked from here: the demo waits for the tasks, stops
the worker (which flushes) and exits 0 when every checkout was accepted and every task
finished.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

from kombu.utils.url import maybe_sanitize_url

from task_scopes.testing import CaptureServer

if TYPE_CHECKING:
    from example_worker.web import WebServer

__all__ = ["main"]

LOOPBACK_API_KEY = "phc_loopback_demo"
WORKER_STOP_BOUND = 40.0  # seconds: the exit flushes are bounded at 10 s each


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m example_worker",
        description=(
            "Run the task_scopes shop demo: three shoppers' checkouts go through a real "
            "Celery worker, and every event must arrive attributed to the right user."
        ),
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="Celery broker, e.g. redis://127.0.0.1:6379/5 or "
        "amqp://guest:guest@127.0.0.1:5672// (default: filesystem:// in a temporary folder)",
    )
    parser.add_argument(
        "--host",
        metavar="URL",
        help="send to this PostHog host instead of the loopback collector (needs --api-key; "
        "arrival cannot be verified then)",
    )
    parser.add_argument("--api-key", metavar="KEY", help="PostHog project API key for --host")
    parser.add_argument(
        "--out", metavar="FILE", help="write the events the collector received as JSON lines"
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, metavar="N", help="worker processes (default 2)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the events (default 30)",
    )
    # For tests: stop the loopback collector once N events arrived, to prove that the demo
    # reports what it did not receive.
    parser.add_argument("--stop-collector-after", type=int, metavar="N", help=argparse.SUPPRESS)
    return parser


def _say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def _backend_for(broker: str | None, folder: Path) -> str:
    """The result backend the chord needs: Redis with a Redis broker, else a ``file://``
    folder (``rpc://`` cannot serve a chord)."""
    if broker is not None and broker.startswith(("redis://", "rediss://")):
        return broker
    results = folder / "results"
    results.mkdir()
    return f"file://{results}"


def _worker_command(queue: str, run_id: str, concurrency: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "example_worker.app",
        "worker",
        "-P",
        "prefork",
        "-c",
        str(concurrency),
        "-Q",
        queue,
        "-n",
        f"shop-{run_id}@%h",
        "--loglevel",
        "WARNING",
        # No cluster chatter: this worker is alone on its queue, and mingle waits ~1 s.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def _stop_worker(worker: subprocess.Popen[bytes]) -> int | None:
    """Warm shutdown (SIGTERM: finish the running tasks, flush, exit). Returns the exit
    code, or None when it had to be killed after :data:`WORKER_STOP_BOUND` seconds."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        return worker.wait(WORKER_STOP_BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool: its own session
        worker.wait()
        return None


def _tail(path: Path, lines: int = 25) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return ["  | " + line for line in text[-lines:]]


def _worker_said(path: Path) -> list[str]:
    """task_scopes' own warnings in the worker's log (undelivered events, dropped tags)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.split("] ", 1)[-1] for line in lines if "task_scopes:" in line]


def _delete_queue(app: Any, queue: str) -> None:
    """Remove this run's queue, and the exchange Celery named after it, from a shared
    broker (Redis, RabbitMQ); best effort."""
    try:
        with app.connection_for_write() as connection:
            bound = app.amqp.queues[queue].bind(connection.default_channel)
            bound.declare()  # kombu's Redis channel only deletes bindings it knows of
            bound.delete()
            bound.exchange.delete()  # RabbitMQ keeps a durable exchange otherwise
    except Exception as exc:  # a leftover empty queue is harmless; say so and go on
        _say(f"note: could not delete queue {queue}: {exc}")


class Demo:
    """One run: the settings, the temporary folder, the worker and (loopback) the collector."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        from example_worker.plan import SHOPPERS, uuid7

        self.args = args
        self.folder = folder
        self.run_id = uuid.uuid4().hex[:8]
        self.queue = f"shop-demo-{self.run_id}"
        self.sessions = {s.name: uuid7() for s in SHOPPERS}
        self.windows = {s.name: uuid7() for s in SHOPPERS}  # one browser tab each
        # A hostname, though the transport ignores it: kombu warns when there is none.
        self.broker = args.broker or "filesystem://localhost/"
        self.backend = _backend_for(args.broker, folder)
        self.server: CaptureServer | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.web: WebServer | None = None
        self.worker_log = folder / "worker.log"

    # -- set-up --------------------------------------------------------------------

    def environment(self, host: str, api_key: str) -> dict[str, str]:
        """What :mod:`example_worker.app` reads, in this process and the worker's."""
        env = {
            "SHOP_BROKER_URL": self.broker,
            "SHOP_RESULT_BACKEND": self.backend,
            "SHOP_QUEUE": self.queue,
            "SHOP_POSTHOG_API_KEY": api_key,
            "SHOP_POSTHOG_HOST": host,
        }
        if self.broker.startswith("filesystem://"):
            env["SHOP_BROKER_FOLDER"] = str(self.folder / "broker")
        return env

    def start_worker(self, env: Mapping[str, str]) -> None:
        # The worker imports example_worker from this checkout, wherever it is started.
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        log: TextIO
        with open(self.worker_log, "w") as log:
            self.worker = subprocess.Popen(
                _worker_command(self.queue, self.run_id, self.args.concurrency),
                env={**os.environ, **env, "PYTHONPATH": path},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    # -- waiting ---------------------------------------------------------------------

    def wait_for_events(self, check: Callable[..., Any], shoppers: Collection[str]) -> str | None:
        """Wait until every event expected of ``shoppers`` (those whose checkout the web app
        accepted) arrived, the deadline passed, the worker died or (test option) the
        collector was stopped. Returns why it stopped early, or None."""
        assert self.server is not None and self.worker is not None
        stop_after = self.args.stop_collector_after
        deadline = time.monotonic() + self.args.timeout

        def arrived(events: list[dict[str, Any]]) -> bool:
            missing = check(events, self.sessions).missing
            return not any(missing.get(name) for name in shoppers)

        def done(events: list[dict[str, Any]]) -> bool:
            if stop_after is not None and len(events) >= stop_after:
                return True
            return arrived(events)

        while True:
            remaining = deadline - time.monotonic()
            # Short waits on the collector's condition so a dead worker is noticed quickly.
            events = self.server.wait_until(done, timeout=max(0.0, min(remaining, 0.5)))
            if stop_after is not None and len(events) >= stop_after:
                self.server.stop()
                return (
                    f"the collector was stopped after {len(events)} events "
                    f"(--stop-collector-after {stop_after}); nothing more can arrive"
                )
            if arrived(events):
                return None
            code = self.worker.poll()
            if code is not None:
                return f"the worker exited early with code {code}"
            if remaining <= 0:
                return f"gave up waiting after {self.args.timeout:g} s"

    def wait_for_tasks(self, results: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Wait for every enqueued task to finish (success or failure); returns what did
        not finish in time."""
        deadline = time.monotonic() + self.args.timeout
        unfinished = []
        for name, steps in results.items():
            for step, result in steps.items():
                try:
                    result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
                except Exception as exc:  # celery.exceptions.TimeoutError and broker errors
                    unfinished.append(f"{name}: {step} ({type(exc).__name__})")
        return unfinished


def _import_shop() -> tuple[ModuleType, ModuleType]:
    """Import the app only now: it reads its configuration from the environment (and the
    web app imports the tasks, hence the app)."""
    import example_worker.app as shop_app
    import example_worker.web as shop_web

    return shop_app, shop_web


def _check_broker(app: Any) -> str | None:
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.2)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.host and not args.api_key:
        parser.error("--host needs --api-key")
    if args.host and args.out:
        parser.error("--out keeps what the loopback collector received; --host has none")
    if args.host and args.stop_collector_after is not None:
        parser.error("--stop-collector-after needs the loopback collector")
    if args.concurrency < 1 or args.timeout <= 0:
        parser.error("--concurrency and --timeout must be positive")
    with tempfile.TemporaryDirectory(prefix="task_scopes-demo-") as tmp:
        try:
            return _run(args, Path(tmp))
        except KeyboardInterrupt:  # the worker was stopped on the way out
            _say("interrupted")
            return 130


def _run(args: argparse.Namespace, folder: Path) -> int:
    from example_worker import check

    demo = Demo(args, folder)
    if args.host:
        host, api_key = args.host, args.api_key
    else:
        if args.out:
            Path(args.out).write_text("")
        demo.server = _collector(args)
        host, api_key = demo.server.url, LOOPBACK_API_KEY
    env = demo.environment(host, api_key)
    os.environ.update(env)
    shop_app, shop_web = _import_shop()
    app = shop_app.app
    import task_scopes

    try:
        web = demo.web = shop_web.serve(demo.run_id)
        _say(
            f"broker   {maybe_sanitize_url(args.broker) or 'filesystem:// (temporary folder)'}",
            f"results  {maybe_sanitize_url(demo.backend).split('://')[0]}:// (the chord needs "
            "a result backend)",
            f"events   {host}" + ("  (loopback collector)" if demo.server else "  (PostHog)"),
            f"web      {web.url}  (WSGI app in task_scopes.wsgi.ContextMiddleware, "
            "served by wsgiref)",
            f"worker   celery -A example_worker.app worker -P prefork -c {args.concurrency} "
            f"-Q {demo.queue}",
        )
        problem = _check_broker(app)
        if problem:
            _say(f"FAILED: cannot reach the broker {maybe_sanitize_url(demo.broker)}: {problem}")
            return 2
        demo.start_worker(env)
        results, rejected = _checkout_all(demo, web.url, app)
        task_scopes.flush(timeout=5.0)  # the web app's own events

        if demo.server is None:
            return _finish_remote(demo, results, host, rejected)

        _say(f"waiting for the events (at most {args.timeout:g} s)...")
        early = demo.wait_for_events(check.check, results)
        if rejected:  # what the web app refused never produced an event: say so first
            early = "; ".join(
                ["the web app did not accept every checkout: " + "; ".join(rejected)]
                + ([early] if early else [])
            )
        assert demo.worker is not None
        code = _stop_worker(demo.worker)
        _say(
            "worker stopped warm (SIGTERM)"
            if code is not None
            else f"worker did not stop within {WORKER_STOP_BOUND:g} s of SIGTERM: killed"
        )
        verdict = check.check(list(demo.server.events), demo.sessions)
        _say("", *check.render(verdict, demo.sessions), "")
        if verdict.ok:
            _say("OK: every expected event arrived, attributed to the right user.")
        else:
            if early:
                _say(f"FAILED: {early}.")
            else:
                _say("FAILED:")
            # Only what was enqueued can be lost on the way; a refused checkout's events
            # were never produced.
            lost = sum(len(m) for name, m in verdict.missing.items() if name in results)
            if lost:
                _say(f"lost: {lost} expected events never reached the collector")
            _say(*("  " + line for line in check.problems(verdict)))
            said = _worker_said(demo.worker_log)
            if said:
                _say("the worker logged:", *("  " + line for line in said))
            if demo.worker.returncode not in (0, None) or (early and "worker" in early):
                _say("worker log (last lines):", *_tail(demo.worker_log))
        _say(check.counts(verdict))
        return 0 if verdict.ok else 1
    finally:
        if demo.worker is not None and demo.worker.poll() is None:
            _stop_worker(demo.worker)
        if demo.web is not None:
            demo.web.close()
        if args.broker is not None and demo.worker is not None:
            _delete_queue(app, demo.queue)
        task_scopes.shutdown(timeout=5.0)
        if demo.server is not None:
            demo.server.close()


def _checkout_all(
    demo: Demo, base_url: str, app: Any
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every shopper's browser posts its checkout, all at once (one server thread each).

    Returns the enqueued results (shopper name -> step -> ``AsyncResult``) and, one line
    each, the checkouts the web app did not accept.
    """
    from example_worker import browser
    from example_worker.plan import SHOPPERS

    _say(
        f"{len(SHOPPERS)} browsers POST /checkout at once, with posthog-js's tracing headers "
        f"{browser.DISTINCT_ID_HEADER} / {browser.SESSION_ID_HEADER} / "
        f"{browser.WINDOW_ID_HEADER}:"
    )
    with ThreadPoolExecutor(max_workers=len(SHOPPERS)) as pool:
        answers = list(
            pool.map(
                lambda s: browser.post_checkout(
                    base_url, s, demo.sessions[s.name], demo.windows[s.name]
                ),
                SHOPPERS,
            )
        )
    results: dict[str, dict[str, Any]] = {}
    rejected = []
    for shopper, answer in zip(SHOPPERS, answers, strict=True):
        who = f"  {shopper.distinct_id:<11} session {demo.sessions[shopper.name]}  -> "
        if answer.problem is not None:
            _say(who + answer.problem)
            rejected.append(f"{shopper.distinct_id}: {answer.problem}")
            continue
        status = f"{answer.status} {HTTPStatus(answer.status).phrase}"
        _say(who + f"{status}: " + ", ".join(answer.enqueued))
        results[shopper.name] = {
            step: app.AsyncResult(task_id) for step, task_id in answer.enqueued.items()
        }
    return results, rejected


def _collector(args: argparse.Namespace) -> CaptureServer:
    """The loopback collector; with ``--stop-collector-after N`` it refuses (503) every
    request after the one that brought its N-th event, decided in its own thread, so the
    outage starts at that point whatever the batching."""
    stop_after = args.stop_collector_after
    server: CaptureServer
    refusing = threading.Event()

    def on_event(_event: dict[str, Any]) -> None:
        if not refusing.is_set() and len(server.events) >= stop_after:
            refusing.set()
            server.script(*[503] * 100_000)

    server = CaptureServer(out=args.out, on_event=on_event if stop_after else None)
    return server.start()


def _finish_remote(
    demo: Demo, results: Mapping[str, Mapping[str, Any]], host: str, rejected: list[str]
) -> int:
    import task_scopes

    _say(f"waiting for the tasks to finish (at most {demo.args.timeout:g} s)...")
    unfinished = demo.wait_for_tasks(results)
    assert demo.worker is not None
    code = _stop_worker(demo.worker)
    left = task_scopes.flush(timeout=10.0)
    stats = task_scopes.get_client().stats()
    undelivered = _worker_said(demo.worker_log)
    _say(
        f"sent to {host}: arrival cannot be verified from here; look for the distinct IDs "
        "user_alice, user_bob and user_carol in PostHog.",
        f"web process: {stats.delivered} events delivered, {left} still queued, "
        f"{stats.failed} failed, {stats.dropped} dropped",
        "worker: stopped warm and flushed"
        + (f"; it reported: {' / '.join(undelivered)}" if undelivered else "")
        if code is not None
        else "worker: did not stop in time and was killed; its queued events are lost",
    )
    if rejected:
        _say("FAILED: the web app did not accept every checkout: " + "; ".join(rejected))
    if unfinished:
        _say("FAILED: tasks that did not finish: " + ", ".join(unfinished))
    return 1 if rejected or unfinished else 0
