"""Web middleware tests: minimal Django settings and an eager Celery app the views call."""

from __future__ import annotations

from collections.abc import Iterator

import django
import pytest
from celery import Celery
from django.conf import settings

import task_scopes
import task_scopes.celery

from .support import Orders

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="task-scopes-tests-only",
        ALLOWED_HOSTS=["testserver", "localhost", "127.0.0.1"],
        INSTALLED_APPS=[],
        DATABASES={},
        MIDDLEWARE=["task_scopes.django.ContextMiddleware"],
        # Each test module sets ROOT_URLCONF to itself (override_settings).
        ROOT_URLCONF=None,
        USE_TZ=True,
    )
    django.setup()


@pytest.fixture
def orders() -> Iterator[Orders]:
    """The eager Celery app and its ``place_order`` task (captures ``order placed``)."""
    app = Celery("web-tests", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    task_scopes.celery.install(app)

    @app.task(name="web_tests.place_order", shared=False)
    def place_order(order_id: str) -> str | None:
        task_scopes.capture("order placed", properties={"order_id": order_id})
        return task_scopes.get_context_distinct_id()

    # Bind the task now: two threads making Celery bind it lazily at the same time race
    # (one of them sees a task whose request_stack is still None).
    app.finalize(auto=True)
    assert place_order.request_stack is not None
    try:
        yield Orders(app, place_order)
    finally:
        task_scopes.celery.uninstall(app)
