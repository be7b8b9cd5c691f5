"""Tier 2: what ``before_task_publish`` writes on the real message (memory:// broker, the
message read back raw from its queue)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from celery import Celery
from plugin_support import installed, make_app, raw_headers

import task_scopes
import task_scopes.celery
from task_scopes.celery._header import decode, sign

POSTHOG = ("X-POSTHOG-DISTINCT-ID", "X-POSTHOG-SESSION-ID", "X-POSTHOG-CONTEXT-TAGS")


@pytest.fixture
def app() -> Iterator[Celery]:
    app = make_app("publish")

    @app.task(name="publish.work", shared=False)
    def work() -> None:
        """Never run here: these tests read the message off the queue."""

    yield app
    task_scopes.celery.uninstall(app)


def publish(app: Celery, **options: Any) -> dict[str, Any]:
    """Publish ``publish.work`` to a fresh queue; return the headers the broker got."""
    queue = f"publish_{uuid.uuid4().hex[:8]}"
    app.tasks["publish.work"].apply_async(queue=queue, **options)
    return raw_headers(app, queue)


def publish_as_user(app: Celery, **options: Any) -> dict[str, Any]:
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.set_context_session("sess-1")
        task_scopes.tag("plan", "pro")
        return publish(app, **options)


def test_exactly_one_top_level_header_is_added(app: Celery) -> None:
    bare = publish_as_user(app)
    task_scopes.celery.install(app)
    ours = publish_as_user(app)
    assert set(ours) - set(bare) == {"task_scopes"}
    assert isinstance(ours["task_scopes"], str)


def test_no_nested_headers_dict_is_written(app: Celery) -> None:
    task_scopes.celery.install(app, posthog_headers=True, secret="k")
    headers = publish_as_user(app)
    assert "headers" not in headers
    added = {k: v for k, v in headers.items() if k.startswith(("task_scopes", "X-POSTHOG"))}
    assert all(isinstance(v, str) for v in added.values())


def test_header_carries_the_callers_distinct_id_session_and_tags(app: Celery) -> None:
    task_scopes.celery.install(app)
    when = datetime(2024, 5, 17, 12, 0, tzinfo=timezone.utc)
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.set_context_session("sess-1")
        task_scopes.tag("plan", "pro")
        task_scopes.tag("signed_up", when)
        headers = publish(app)
    context = decode(headers["task_scopes"])
    assert (context.distinct_id, context.session_id) == ("user-1", "sess-1")
    assert context.tags == {"plan": "pro", "signed_up": "2024-05-17T12:00:00+00:00"}


def test_current_scope_overrides_travel(app: Celery) -> None:
    task_scopes.celery.install(app)
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.tag("step", "outer")
        with task_scopes.new_scope() as scope:
            scope.set_tag("step", "inner")
            scope.set_distinct_id("user-2")
            headers = publish(app)
    context = decode(headers["task_scopes"])
    assert context.distinct_id == "user-2"
    assert context.tags == {"step": "inner"}


def test_window_id_travels_even_alone_and_the_current_scope_overrides_it(app: Celery) -> None:
    task_scopes.celery.install(app, posthog_headers=True)
    with task_scopes.new_context(fresh=True):
        task_scopes.get_isolation_scope().set_window_id("win-1")
        alone = publish(app)
        with task_scopes.new_scope() as scope:
            scope.set_window_id("win-2")
            overridden = publish(app)
    alone_payload = json.loads(alone["task_scopes"])
    assert isinstance(alone_payload.pop("p"), int)  # the publish time
    assert alone_payload == {"v": 1, "w": "win-1"}
    assert decode(overridden["task_scopes"]).window_id == "win-2"
    # PostHog's Celery integration has no window header: none is written for it.
    assert not [key for key in alone if key.upper().startswith("X-POSTHOG")]


def test_global_tags_describe_the_producer_and_do_not_travel(app: Celery) -> None:
    task_scopes.celery.install(app)
    scope = task_scopes.get_global_scope()
    scope.set_tag("service", "web")
    try:
        headers = publish_as_user(app)
    finally:
        scope.remove_tag("service")
    assert "service" not in (decode(headers["task_scopes"]).tags or {})


def test_a_caller_without_context_sends_only_the_publish_time(app: Celery) -> None:
    task_scopes.celery.install(app)
    with task_scopes.new_context(fresh=True):
        before = time.time_ns() // 1_000_000
        headers = publish(app)
        after = time.time_ns() // 1_000_000
    payload = json.loads(headers["task_scopes"])
    assert set(payload) == {"v", "p"}
    assert before <= payload["p"] <= after


@pytest.mark.parametrize(
    "theirs",
    [
        {"task_scopes": '{"d":"from-caller","v":1}'},
        {"X-POSTHOG-DISTINCT-ID": "ph-user"},
    ],
    ids=["ours", "posthog"],
)
def test_an_empty_context_leaves_a_context_the_caller_wrote(
    app: Celery, theirs: dict[str, str]
) -> None:
    task_scopes.celery.install(app)
    with task_scopes.new_context(fresh=True):
        headers = publish(app, headers=theirs)
    assert {key: headers.get(key) for key in theirs} == theirs
    assert ("task_scopes" in headers) == ("task_scopes" in theirs)


def test_groups_travel_and_global_groups_stay(app: Celery) -> None:
    task_scopes.celery.install(app)
    task_scopes.get_global_scope().set_group("region", "eu")
    try:
        with task_scopes.new_context(fresh=True):
            task_scopes.set_context_groups({"company": "acme", "team": 7})
            headers = publish(app)
    finally:
        task_scopes.get_global_scope().set_group("region", None)
    assert decode(headers["task_scopes"]).groups == {"company": "acme", "team": 7}


def test_celery_tags_of_a_running_task_do_not_travel(app: Celery) -> None:
    task_scopes.celery.install(app)
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.tag("celery_task_id", "parent-task")
        task_scopes.tag("$set", {"x": 1})
        headers = publish(app)
    payload = json.loads(headers["task_scopes"])
    assert isinstance(payload.pop("p"), int)
    assert payload == {"v": 1, "d": "user-1"}


def test_the_users_own_headers_stay_beside_ours(app: Celery) -> None:
    task_scopes.celery.install(app)
    headers = publish_as_user(app, headers={"x-request-id": "req-7"})
    assert headers["x-request-id"] == "req-7"
    assert decode(headers["task_scopes"]).distinct_id == "user-1"


def test_propagate_false_writes_no_header(app: Celery) -> None:
    task_scopes.celery.install(app, propagate=False)
    assert "task_scopes" not in publish_as_user(app)


def test_secret_signs_the_exact_header_string(app: Celery) -> None:
    task_scopes.celery.install(app, secret="k3y")
    headers = publish_as_user(app)
    assert headers["task_scopes_sig"] == sign(headers["task_scopes"], "k3y")
    assert decode(headers["task_scopes"], headers["task_scopes_sig"], "k3y").distinct_id == (
        "user-1"
    )


def test_no_signature_without_a_secret(app: Celery) -> None:
    task_scopes.celery.install(app)
    assert "task_scopes_sig" not in publish_as_user(app)


def test_posthog_headers_are_written_at_top_level(app: Celery) -> None:
    task_scopes.celery.install(app, posthog_headers=True)
    headers = publish_as_user(app)
    assert headers["X-POSTHOG-DISTINCT-ID"] == "user-1"
    assert headers["X-POSTHOG-SESSION-ID"] == "sess-1"
    assert json.loads(headers["X-POSTHOG-CONTEXT-TAGS"]) == {"plan": "pro"}
    assert "task_scopes" in headers


def test_posthog_headers_are_not_written_by_default(app: Celery) -> None:
    task_scopes.celery.install(app)
    assert not set(POSTHOG) & set(publish_as_user(app))


def test_reinstalling_with_posthog_headers_changes_what_is_published(app: Celery) -> None:
    task_scopes.celery.install(app)
    assert "X-POSTHOG-DISTINCT-ID" not in publish_as_user(app)
    task_scopes.celery.install(app, posthog_headers=True)
    assert publish_as_user(app)["X-POSTHOG-DISTINCT-ID"] == "user-1"


@pytest.mark.usefixtures("fresh_warnings")
def test_an_oversized_tag_is_dropped_named_and_the_task_still_published(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    task_scopes.celery.install(app)
    with (
        caplog.at_level(logging.WARNING, logger="task_scopes"),
        task_scopes.new_context(fresh=True),
    ):
        task_scopes.identify_context("user-1")
        task_scopes.tag("attachment_text", "x" * 1000)
        for i in range(12):
            task_scopes.tag(f"note_{i}", "n" * 900)
        task_scopes.tag("plan", "pro")
        headers = publish(app)
    assert len(headers["task_scopes"].encode()) <= 8192
    context = decode(headers["task_scopes"])
    assert context.distinct_id == "user-1"
    assert context.tags is not None and context.tags["plan"] == "pro"
    assert "attachment_text" not in context.tags
    warnings = [r.getMessage() for r in caplog.records if r.name == "task_scopes"]
    assert len(warnings) == 1 and "attachment_text" in warnings[0]


@pytest.mark.usefixtures("fresh_warnings")
def test_a_tag_that_cannot_be_encoded_is_named_in_a_warning(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    task_scopes.celery.install(app)
    with (
        caplog.at_level(logging.WARNING, logger="task_scopes"),
        task_scopes.new_context(fresh=True),
    ):
        task_scopes.identify_context("user-1")
        task_scopes.tag("db_connection", object())
        headers = publish(app)
    assert decode(headers["task_scopes"]).tags == {}
    warnings = [r.getMessage() for r in caplog.records if r.name == "task_scopes"]
    assert len(warnings) == 1 and "db_connection" in warnings[0]


def test_max_header_bytes_setting_caps_the_header(app: Celery) -> None:
    task_scopes.celery.install(app, max_header_bytes=512)
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        for i in range(10):
            task_scopes.tag(f"t{i}", "v" * 100)
        headers = publish(app)
    assert len(headers["task_scopes"].encode()) <= 512


def test_an_app_that_is_not_installed_gets_no_header(app: Celery) -> None:
    other = make_app("publish_other")
    with installed(other):
        assert "task_scopes" not in publish_as_user(app)


def test_posthog_tags_header_is_capped_like_ours(app: Celery) -> None:
    task_scopes.celery.install(app, posthog_headers=True)
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        for i in range(300):
            task_scopes.tag(f"note_{i}", "n" * 900)
        headers = publish(app)
    assert json.loads(headers["X-POSTHOG-CONTEXT-TAGS"]) == decode(headers["task_scopes"]).tags
    assert len(headers["X-POSTHOG-CONTEXT-TAGS"].encode()) <= 8192


def test_posthog_id_headers_are_cleaned_and_capped_like_ours(app: Celery) -> None:
    task_scopes.celery.install(app, posthog_headers=True)
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1\n" + "x" * 200_000)
        task_scopes.set_context_session("sess\x00-1")
        headers = publish(app)
    assert len(headers.get("X-POSTHOG-DISTINCT-ID", "")) <= 1000
    assert headers["X-POSTHOG-SESSION-ID"] == "sess-1"
