"""Celery app of the benchmark worker: ``celery -A _worker_app worker -P solo``.

The configuration comes from ``BENCH_*`` environment variables set by ``_run.py``.
"""

from __future__ import annotations

from _configs import build_from_env

built = build_from_env()
app = built.app
