"""pytest plugin (entry point ``task_scopes``): the ``captured_events`` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import CapturedEvents, capture_events


@pytest.fixture
def captured_events() -> Iterator[CapturedEvents]:
    """Record what the code under test captures with the default client.

    ``captured_events.events`` flushes and returns the events as dicts in PostHog's
    format; Celery tasks run eagerly or in an in-thread worker capture into it too.
    """
    with capture_events() as captured:
        yield captured
