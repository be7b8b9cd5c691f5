"""A ``celery worker`` subprocess for the tests and the benchmarks.

One class for every suite that needs a real worker: the end-to-end tests
(``tests/e2e``), the interop tests, the soak and exit-path measurements and the overhead
benchmark (``bench/``). The worker runs in a session (process group) of its own with its
output in a log file; waits poll something observable (a log line, a key, a process
exit) with a deadline, and never sleep in place of waiting.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
INTERNAL_ERROR = "task_scopes: internal error"
# Generous: the machine is small and shared. Waits end as soon as the condition holds.
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 90.0


class WorkerError(RuntimeError):
    """The worker exited early or was not ready in time; the message has its log's tail."""


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` every ``interval`` seconds until it holds or ``timeout`` seconds
    passed. Returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        # Polling state of other processes: there is nothing to block on.
        time.sleep(interval)


class Worker:
    """One ``celery -A <app> worker`` subprocess, logging to ``log_path``.

    Args:
        app: the module ``-A`` names, importable from the repository root or ``path``.
        name: node name prefix (``-n {name}@%h``), unique per run.
        queue: the one queue it consumes (``-Q``).
        log_path: the worker's stdout and stderr; appended to.
        env: environment variables for the worker, on top of this process's; a None value
            removes the variable.
        pool: ``-P``; concurrency: ``-c``.
        loglevel: ``-l``; readiness is read from the log unless ``ready`` is given, which
            needs ``INFO``.
        extra_args: more ``celery worker`` arguments, e.g. ``["--max-tasks-per-child", "5"]``.
        path: directories put on the worker's ``PYTHONPATH`` before the repository root.
        ready: a predicate telling that the worker consumes (e.g. a key its
            ``worker_ready`` handler set), for workers logging below ``INFO``.
    """

    def __init__(
        self,
        app: str,
        *,
        name: str,
        queue: str,
        log_path: Path,
        env: Mapping[str, str | None] | None = None,
        pool: str = "prefork",
        concurrency: int = 2,
        loglevel: str = "INFO",
        extra_args: Sequence[str] = (),
        path: Sequence[Path] = (),
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.app = app
        self.name = name
        self.queue = queue
        self.log_path = log_path
        self.env = dict(env or {})
        self.pool = pool
        self.concurrency = concurrency
        self.loglevel = loglevel
        self.extra_args = list(extra_args)
        self.path = list(path)
        self._ready = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # stop() needed SIGKILL
        self.returncode: int | None = None
        self._log_offset = 0

    @property
    def hostname(self) -> str:
        """The node name Celery gives this worker (``-n name@%h``)."""
        return f"{self.name}@{socket.gethostname()}"

    @property
    def pid(self) -> int:
        """The main process's pid. Raises RuntimeError before :meth:`start`."""
        if self.proc is None:
            raise RuntimeError(f"worker {self.name} not started")
        return self.proc.pid

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", self.app, "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-Q", self.queue,
            "-n", f"{self.name}@%h", "-l", self.loglevel,
            # No cluster chatter: the worker is alone on its queue, and mingle waits ~1 s.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = READY_TIMEOUT) -> Worker:
        """Start the worker and return once it is ready.

        Raises:
            WorkerError: it exited or was not ready within ``timeout`` seconds (it is
                killed then).
        """
        env = {**os.environ, **self.env}
        env = {key: value for key, value in env.items() if value is not None}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (*map(str, self.path), str(ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        ready = self._ready or self._ready_in_log
        if wait_for(lambda: not self.alive() or ready(), timeout, 0.1) and self.alive():
            return self
        if self.alive():
            problem = f"not ready after {timeout:.0f}s"
        else:
            problem = f"exited with {self.proc.returncode} before it was ready"
        self.kill()
        raise WorkerError(f"worker {self.name} {problem}\n{self.log_tail()}")

    def _ready_in_log(self) -> bool:
        marker = f"{self.name}@"
        return any(
            marker in line and line.rstrip().endswith("ready.") for line in self.log().splitlines()
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the main process."""
        if self.proc is None:
            raise RuntimeError(f"worker {self.name} not started")
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """Wait for the main process to exit; its exit status, or None on timeout."""
        if self.proc is None:
            raise RuntimeError(f"worker {self.name} not started")
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Warm shutdown: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL the whole
        process group. Returns the exit status; :attr:`killed` tells whether SIGKILL was
        needed."""
        proc = self.proc
        if proc is None:
            raise RuntimeError(f"worker {self.name} not started")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Still unreaped, so its pid (the group id) cannot have been reused: the
                # group is the worker and its pool children, nothing else.
                self.killed = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        self.returncode = proc.returncode
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the main process and any pool children left (cleanup after a failure or
        after a scenario that orphaned them). Idempotent."""
        proc = self.proc
        if proc is None:
            return
        orphans = self.children()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # unreaped: the group is still ours
            proc.wait(10)
        for child in orphans:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.returncode = proc.returncode

    def children(self) -> list[psutil.Process]:
        """The pool children (direct children of the main process) alive now."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> tuple[int, int] | None:
        """``(main + children, largest child)`` resident set size in bytes, or None when
        the main process is gone."""
        try:
            main = psutil.Process(self.pid)
            total = main.memory_info().rss
            largest = 0
            for child in main.children():
                try:
                    size = child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                total += size
                largest = max(largest, size)
            return total, largest
        except psutil.NoSuchProcess:
            return None

    def log(self) -> str:
        """What this run of the worker wrote to its log so far."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        tail = self.log().splitlines()[-lines:]
        return f"--- worker {self.name} log (last {len(tail)} lines) ---\n" + "\n".join(tail)

    def internal_errors(self) -> list[str]:
        """Lines of the log where task_scopes' guard reported one of its own errors."""
        return [line for line in self.log().splitlines() if INTERNAL_ERROR in line]
