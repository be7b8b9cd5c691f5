"""Celery app of the soak and exit-path workers: ``celery -A _soak_app worker -P prefork``.

Configured from ``SOAK_*`` environment variables (see :class:`_soak_ledger.Settings`),
so the driver and every worker it starts build the same app. Bookkeeping goes to Redis
under ``SOAK_PREFIX`` so that it survives the processes that wrote it:

* ``{prefix}:run`` (INCR): tasks that ran to the end of their body.
* ``{prefix}:captured`` (RPUSH): ``"uuid pid wall_time seq"`` for every event the task's
  ``capture()`` accepted, written right after the capture (so an event whose process was
  killed before it was sent is still known).
* ``{prefix}:stats`` (HSET ``pid`` -> JSON): ``client.stats()`` of each pool child at
  ``worker_process_shutdown`` and of the main process at ``worker_shutdown``, written
  *after* the plugin's exit flush (handlers run in the order they were connected).
* ``{prefix}:children`` (SADD): pid of every pool child started.
* ``{prefix}:ready:{pid}``: set by the main process at ``worker_ready``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import redis
from celery import Celery, signals

import task_scopes
import task_scopes.celery

BROKER = os.environ["SOAK_BROKER"]
PREFIX = os.environ["SOAK_PREFIX"]
QUEUE = os.environ["SOAK_QUEUE"]

app = Celery("soak", broker=BROKER, set_as_current=True)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
    task_scopes_api_key="phc_soak",
    task_scopes_host=os.environ["SOAK_COLLECTOR"],
    task_scopes_flush_interval=float(os.environ.get("SOAK_FLUSH_INTERVAL", "0.5")),
    task_scopes_flush_at=int(os.environ.get("SOAK_FLUSH_AT", "100")),
    task_scopes_shutdown_timeout=float(os.environ.get("SOAK_SHUTDOWN_TIMEOUT", "30")),
    task_scopes_timeout=float(os.environ.get("SOAK_HTTP_TIMEOUT", "3")),
)
task_scopes.celery.install(app)
HTTP_LOG = os.environ.get("SOAK_HTTP_LOG")

_redis: tuple[int, redis.Redis] | None = None


def store() -> redis.Redis:
    """This process's Redis client (a new one after fork: connections are per process)."""
    global _redis
    if _redis is None or _redis[0] != os.getpid():
        _redis = (os.getpid(), redis.Redis.from_url(BROKER))
    return _redis[1]


def key(name: str) -> str:
    return f"{PREFIX}:{name}"


@app.task(name="soak.work")
def work(expected: str, seq: int, hold: float = 0.0) -> int:
    """Capture one event saying which context it expects; count the run.

    Args:
        expected: the batch key the producer put in its context: the distinct ID must be
            ``user-{expected}``, the session ID ``session-{expected}`` and the tag
            ``soak_batch`` ``expected``.
        seq: the task's sequence number in the run.
        hold: seconds of simulated work before the capture (paces the exit-path runs).
    """
    if hold:
        time.sleep(hold)
    uid = task_scopes.capture(
        "soak task", properties={"expected_batch": expected, "seq": seq, "pid": os.getpid()}
    )
    pipe = store().pipeline(transaction=False)
    if uid is not None:
        pipe.rpush(key("captured"), f"{uid} {os.getpid()} {time.time():.6f} {seq}")
    pipe.incr(key("run"))
    pipe.execute()
    return seq


def _report_stats(role: str) -> None:
    # The app's client: task_scopes_api_key binds it to every task run of the app (made
    # on first use, so a process that ran no task reports zeros).
    client = task_scopes.celery.app_client(app)
    stats = (client or task_scopes.get_client()).stats()._asdict()
    stats["role"] = role
    store().hset(key("stats"), str(os.getpid()), json.dumps(stats))


# Connected after install(): they run after the plugin's own handlers, i.e. after its flush.
@signals.worker_process_init.connect(weak=False)
def _on_worker_process_init(**_: Any) -> None:
    store().sadd(key("children"), os.getpid())
    if HTTP_LOG:
        # Every HTTP attempt and retry of this child's event client, in a file of its own.
        handler = logging.FileHandler(f"{HTTP_LOG}.{os.getpid()}")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        for name in ("urllib3", "task_scopes"):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.DEBUG)


@signals.worker_process_shutdown.connect(weak=False)
def _on_worker_process_shutdown(**_: Any) -> None:
    _report_stats("child")


@signals.worker_ready.connect(weak=False)
def _on_worker_ready(**_: Any) -> None:
    store().set(key(f"ready:{os.getpid()}"), 1)


@signals.worker_shutdown.connect(weak=False)
def _on_worker_shutdown(**_: Any) -> None:
    _report_stats("main")
