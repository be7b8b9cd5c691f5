"""Celery app of the benchmark worker: ``celery -A _worker_app worker -P solo``.

The configuration comes from ``BENCH_*`` environment variables set by ``_run.py``. At
``worker_ready`` it sets ``{BENCH_QUEUE}:ready`` in Redis: the worker logs at WARNING, so
that key, not a log line, tells ``_run.py`` it consumes.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from _configs import build_from_env
from celery import signals

built = build_from_env()
app = built.app


@signals.worker_ready.connect(weak=False)
def _on_worker_ready(**_: Any) -> None:
    with redis.Redis.from_url(os.environ["BENCH_REDIS"]) as client:
        client.set(f"{os.environ['BENCH_QUEUE']}:ready", 1)
