"""A private ``redis-server`` on a free loopback port, for one test session or benchmark run.

The suite and the benchmarks never use a Redis they did not start: a developer's Redis on
6379 keeps its data whatever they run. The server has no persistence (``--save ""``,
``--appendonly no``), its working directory is a new temporary directory, and stopping it
removes that directory: nothing it held survives the run.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

DATABASES = 256  # a database per test; the suite cycles through them


class RedisServerError(RuntimeError):
    """The private ``redis-server`` could not be started (the message has its log)."""


class RedisServerMissing(RedisServerError):
    """The ``redis-server`` binary is not on ``PATH``."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` subprocess of our own. Context manager: started on entry, stopped
    (and its directory removed) on exit.

    Args:
        binary: the executable, looked up on ``PATH`` when it has no slash.
        databases: how many numbered databases it has (``--databases``).
    """

    def __init__(self, binary: str = "redis-server", *, databases: int = DATABASES) -> None:
        self.binary = binary
        self.databases = databases
        self.port: int | None = None
        self.directory: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:<port>/<db>``; ``db`` in ``range(databases)``."""
        if self.port is None:
            raise RedisServerError("the private redis-server is not running")
        if not 0 <= db < self.databases:
            raise ValueError(f"db {db} not in 0..{self.databases - 1}")
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it on a free port and return once it answers PING.

        Raises:
            RedisServerMissing: ``binary`` is not found.
            RedisServerError: it exited or did not answer within ``timeout`` seconds (three
                attempts, in case another process took the free port first).
        """
        path = shutil.which(self.binary)
        if path is None:
            raise RedisServerMissing(f"{self.binary} not found on PATH")
        self.directory = Path(tempfile.mkdtemp(prefix="task_scopes-redis-"))
        problem = ""
        for _ in range(3):
            port = _free_port()
            self.proc = subprocess.Popen(
                [path, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory),
                 "--logfile", str(self.directory / "redis.log"),
                 "--databases", str(self.databases), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            if self._wait_ready(port, timeout):
                self.port = port
                return self
            problem = self._discard()
        shutil.rmtree(self.directory, ignore_errors=True)
        raise RedisServerError(f"the private {self.binary} did not start:\n{problem}")

    def _wait_ready(self, port: int, timeout: float) -> bool:
        assert self.proc is not None
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    # Polling a starting server: there is no readiness event to block on.
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def _discard(self) -> str:
        """Stop a server that did not come up; return the end of its log."""
        assert self.proc is not None and self.directory is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        log = self.directory / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def stop(self) -> None:
        """SIGTERM (no save is configured, so nothing is written), wait, remove the
        directory. Idempotent."""
        proc, self.proc, self.port = self.proc, None, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
