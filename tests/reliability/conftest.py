"""Fixtures of the reliability tests.

The exit-path tests drive the same harness the published figures come from
(``bench/_soak_harness.py``, ``bench/_soak_exits.py``), so ``bench`` goes on ``sys.path``.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

SOAK_REDIS = os.environ.get("TASK_SCOPES_RELIABILITY_REDIS")


@pytest.fixture
def soak_redis(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis URL for worker subprocesses: ``redis_url`` (a database of its own, flushed),
    or ``TASK_SCOPES_RELIABILITY_REDIS`` as given (not flushed; queues and keys are unique
    per test) on machines where other test runs flush the numbered databases.

    Fails the test, rather than letting it fail obscurely, when the database was flushed
    by someone else while it ran.
    """
    url = SOAK_REDIS or request.getfixturevalue("redis_url")
    store = redis.Redis.from_url(url)
    sentinel = f"reliability:sentinel:{uuid.uuid4().hex}"
    store.set(sentinel, 1)
    yield url
    present = store.delete(sentinel)
    if not present:
        pytest.fail(f"{url} was flushed by another process during the test; run it again")
