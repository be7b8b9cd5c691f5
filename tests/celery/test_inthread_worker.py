"""Tier 2: a real Celery worker in a thread of the test process (Celery's embedded worker,
solo and threads pools, memory:// broker): the producer's context reaches the task, bad
headers give an empty context, and nothing stays open after a task."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, signals
from celery.exceptions import Ignore
from plugin_support import WAIT, Postruns, in_thread_worker, make_app

import task_scopes
import task_scopes.celery
from task_scopes._scope import active_isolation_scope
from task_scopes.celery._header import encode, sign
from task_scopes.testing import CapturedEvents

CELERY_TAGS = {
    "celery_task_id",
    "celery_task_name",
    "celery_queue",
    "celery_retry_count",
    "celery_hostname",
}


def seen() -> dict[str, Any]:
    """The context as a task body sees it (JSON-safe: it travels back as the result)."""
    return {
        "distinct_id": task_scopes.get_context_distinct_id(),
        "session_id": task_scopes.get_context_session_id(),
        "tags": task_scopes.get_tags(),
    }


def own_tags(tags: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tags.items() if not k.startswith("celery_")}


@pytest.fixture(scope="module")
def app() -> Iterator[Celery]:
    """One app and one solo in-thread worker for the module; tests re-install options."""
    app = make_app("inthread")

    @app.task(name="inthread.report", shared=False)
    def report() -> dict[str, Any]:
        return seen()

    @app.task(name="inthread.capture", shared=False)
    def capture() -> str | None:
        return task_scopes.capture("task ran")

    @app.task(name="inthread.meddle", shared=False)
    def meddle() -> dict[str, Any]:
        task_scopes.identify_context("someone-else")
        task_scopes.tag("leaked", True)
        return seen()

    @app.task(name="inthread.publish_child", shared=False)
    def publish_child() -> str:
        task_scopes.tag("parent", "yes")
        return str(report.delay().id)

    @app.task(name="inthread.ignore", shared=False)
    def ignore() -> None:
        task_scopes.tag("ignored", True)
        raise Ignore()

    task_scopes.celery.install(app)
    try:
        with in_thread_worker(app):
            yield app
    finally:
        task_scopes.celery.uninstall(app)


@pytest.fixture
def reinstall(app: Celery) -> Iterator[Any]:
    """``reinstall(**overrides)`` for one test; default options again afterwards."""

    def apply(**overrides: Any) -> None:
        task_scopes.celery.install(app, **overrides)

    yield apply
    task_scopes.celery.install(app)


def run(app: Celery, name: str, **options: Any) -> Any:
    return app.tasks[name].apply_async(**options).get(timeout=WAIT, interval=0.005)


def run_as_user(app: Celery, name: str = "inthread.report", **options: Any) -> Any:
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.set_context_session("sess-1")
        task_scopes.tag("plan", "pro")
        task_scopes.tag("cart_items", (3, 1))
        return run(app, name, **options)


def test_task_sees_the_producers_distinct_id_session_and_tags(app: Celery) -> None:
    got = run_as_user(app)
    assert (got["distinct_id"], got["session_id"]) == ("user-1", "sess-1")
    assert own_tags(got["tags"]) == {"plan": "pro", "cart_items": [3, 1]}


def test_task_tags_describe_the_execution(app: Celery) -> None:
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        result = app.tasks["inthread.report"].delay()
    tags = result.get(timeout=WAIT, interval=0.005)["tags"]
    assert set(tags) >= CELERY_TAGS
    assert tags["celery_task_id"] == result.id
    assert tags["celery_task_name"] == "inthread.report"
    assert tags["celery_queue"] == app.conf.task_default_queue
    assert tags["celery_retry_count"] == 0
    assert tags["celery_hostname"]


def test_event_captured_in_the_task_is_attributed_to_the_producer(
    app: Celery, captured_events: CapturedEvents
) -> None:
    event_id = run_as_user(app, "inthread.capture")
    [event] = captured_events.named("task ran")
    assert event["uuid"] == event_id
    assert event["distinct_id"] == "user-1"
    props = event["properties"]
    assert (props["$session_id"], props["plan"], props["cart_items"]) == ("sess-1", "pro", [3, 1])
    assert props["celery_task_name"] == "inthread.capture"
    assert "$process_person_profile" not in props


def test_task_published_without_context_runs_personless(
    app: Celery, captured_events: CapturedEvents
) -> None:
    with task_scopes.new_context(fresh=True):
        run(app, "inthread.capture")
    [event] = captured_events.named("task ran")
    assert event["properties"]["$process_person_profile"] is False


def test_consecutive_tasks_see_only_their_own_producers_context(app: Celery) -> None:
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("alice")
        first = app.tasks["inthread.meddle"].delay()
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("bob")
        second = app.tasks["inthread.report"].delay()
    assert first.get(timeout=WAIT, interval=0.005)["distinct_id"] == "someone-else"
    got = second.get(timeout=WAIT, interval=0.005)
    assert got["distinct_id"] == "bob"
    assert "leaked" not in got["tags"]


def test_task_without_producer_context_sees_nothing_of_the_previous_task(app: Celery) -> None:
    run_as_user(app, "inthread.meddle")
    with task_scopes.new_context(fresh=True):
        got = run(app, "inthread.report")
    assert got["distinct_id"] is None and got["session_id"] is None
    assert own_tags(got["tags"]) == {}


def test_producer_context_is_unchanged_by_publishing(app: Celery) -> None:
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        task_scopes.tag("plan", "pro")
        before = seen()
        run(app, "inthread.meddle")
        assert seen() == before


def test_task_published_from_a_task_carries_the_restored_context(app: Celery) -> None:
    child_id = run_as_user(app, "inthread.publish_child")
    got = app.AsyncResult(child_id).get(timeout=WAIT, interval=0.005)
    assert got["distinct_id"] == "user-1"
    assert got["tags"]["plan"] == "pro"
    assert got["tags"]["parent"] == "yes"
    assert got["tags"]["celery_task_id"] == child_id


def test_posthog_headers_of_a_foreign_producer_are_restored(app: Celery) -> None:
    headers = {
        "X-POSTHOG-DISTINCT-ID": "ph-user",
        "X-POSTHOG-SESSION-ID": "ph-session",
        "X-POSTHOG-CONTEXT-TAGS": json.dumps({"plan": "team"}),
    }
    with task_scopes.new_context(fresh=True):
        got = run(app, "inthread.report", headers=headers)
    assert (got["distinct_id"], got["session_id"]) == ("ph-user", "ph-session")
    assert own_tags(got["tags"]) == {"plan": "team"}


def test_our_header_wins_over_posthog_headers(app: Celery) -> None:
    header, _ = encode("ours", None, {})
    headers = {"task_scopes": header, "X-POSTHOG-DISTINCT-ID": "theirs"}
    with task_scopes.new_context(fresh=True):
        assert run(app, "inthread.report", headers=headers)["distinct_id"] == "ours"


def test_a_signed_context_is_restored_when_a_secret_is_set(app: Celery, reinstall: Any) -> None:
    reinstall(secret="k3y")
    got = run_as_user(app)
    assert got["distinct_id"] == "user-1"


def test_propagate_false_restores_nothing(app: Celery, reinstall: Any) -> None:
    header, _ = encode("user-1", None, {"plan": "pro"})
    reinstall(propagate=False)
    with task_scopes.new_context(fresh=True):
        got = run(app, "inthread.report", headers={"task_scopes": header})
    assert got["distinct_id"] is None and own_tags(got["tags"]) == {}


# -- untrusted headers ---------------------------------------------------------------------

_VALID, _ = encode("intruder", "sess-x", {"role": "admin"})

UNTRUSTED: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "garbage": ({"task_scopes": "{not json"}, {}),
    "wrong-type": ({"task_scopes": 12345}, {}),
    "list": ({"task_scopes": ["v", 1]}, {}),
    "distinct-id-not-string": ({"task_scopes": '{"v":1,"d":{"id":1}}'}, {}),
    "tags-not-object": ({"task_scopes": '{"v":1,"d":"u","t":[1]}'}, {}),
    "unknown-version": ({"task_scopes": '{"v":99,"d":"u"}'}, {}),
    "posthog-tags-not-json": (
        {"X-POSTHOG-DISTINCT-ID": "u", "X-POSTHOG-CONTEXT-TAGS": "{nope"},
        {},
    ),
    "posthog-id-not-string": ({"X-POSTHOG-DISTINCT-ID": ["u"]}, {}),
    "unsigned-with-secret": ({"task_scopes": _VALID}, {"secret": "k3y"}),
    "forged-signature": (
        {"task_scopes": _VALID, "task_scopes_sig": "0" * 64},
        {"secret": "k3y"},
    ),
    "signed-with-another-secret": (
        {"task_scopes": _VALID, "task_scopes_sig": sign(_VALID, "other")},
        {"secret": "k3y"},
    ),
    "signature-of-another-header": (
        {"task_scopes": _VALID, "task_scopes_sig": sign(encode("u", None, {})[0], "k3y")},
        {"secret": "k3y"},
    ),
    "posthog-headers-with-secret": ({"X-POSTHOG-DISTINCT-ID": "intruder"}, {"secret": "k3y"}),
}


@pytest.mark.usefixtures("fresh_warnings")
@pytest.mark.parametrize(("headers", "options"), list(UNTRUSTED.values()), ids=list(UNTRUSTED))
def test_untrusted_header_gives_an_empty_context_and_a_warning(
    app: Celery,
    reinstall: Any,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, Any],
    options: dict[str, Any],
) -> None:
    reinstall(**options)
    with (
        caplog.at_level(logging.WARNING, logger="task_scopes"),
        task_scopes.new_context(fresh=True),
    ):
        result = app.tasks["inthread.report"].apply_async(headers=headers)
        got = result.get(timeout=WAIT, interval=0.005)
    assert got["distinct_id"] is None and got["session_id"] is None
    assert own_tags(got["tags"]) == {}
    assert got["tags"]["celery_task_id"] == result.id  # the task's own tags are still set
    warnings = [r.getMessage() for r in caplog.records if r.name == "task_scopes"]
    assert len(warnings) == 1 and result.id in warnings[0]


@pytest.mark.usefixtures("fresh_warnings")
def test_non_ascii_forged_signature_gives_an_empty_context(
    app: Celery, reinstall: Any, guard_swallows: None
) -> None:
    reinstall(secret="k3y")
    with task_scopes.new_context(fresh=True):
        result = app.tasks["inthread.report"].apply_async(
            headers={"task_scopes": _VALID, "task_scopes_sig": "é" * 64}
        )
        got = result.get(timeout=WAIT, interval=0.005)
    assert got["distinct_id"] is None
    assert got["tags"].get("celery_task_id") == result.id


@pytest.mark.usefixtures("fresh_warnings")
def test_bad_header_warnings_are_rate_limited(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="task_scopes"),
        task_scopes.new_context(fresh=True),
    ):
        for _ in range(5):
            run(app, "inthread.report", headers={"task_scopes": "{not json"})
    assert len([r for r in caplog.records if r.name == "task_scopes"]) == 1


# -- nothing stays open ------------------------------------------------------------------


class ScopeProbe:
    """Reads the worker thread's isolation scope around each task, from receivers that run
    after the plugin's: at ``task_received`` (before the task, same thread in the solo
    pool), at ``task_prerun`` (the task's scope) and at ``task_postrun`` (after it closed)."""

    def __init__(self) -> None:
        self.before: dict[str, Any] = {}
        self.during: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.threads: set[int] = set()

    def received(self, request: Any = None, **_: Any) -> None:
        self.before[request.id] = active_isolation_scope()

    def prerun(self, task_id: str | None = None, **_: Any) -> None:
        assert task_id is not None
        self.during[task_id] = active_isolation_scope()
        self.threads.add(threading.get_ident())

    def postrun(self, task_id: str | None = None, **_: Any) -> None:
        assert task_id is not None
        self.after[task_id] = active_isolation_scope()


@pytest.fixture
def probe() -> Iterator[ScopeProbe]:
    probe = ScopeProbe()
    pairs = [
        (signals.task_received, probe.received),
        (signals.task_prerun, probe.prerun),
        (signals.task_postrun, probe.postrun),
    ]
    for signal, receiver in pairs:
        signal.connect(receiver, weak=False)
    try:
        yield probe
    finally:
        for signal, receiver in pairs:
            signal.disconnect(receiver)


def test_a_thousand_ignored_tasks_leave_no_scope_open(
    app: Celery, probe: ScopeProbe, postruns: Postruns
) -> None:
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        ids = [app.tasks["inthread.ignore"].delay().id for _ in range(1000)]
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-2")
        last = run(app, "inthread.report")
    postruns.wait(ids[-1])
    assert postruns.states[ids[0]] == ["IGNORED"]
    assert len(probe.threads) == 1  # solo pool: one thread ran them all
    for task_id in ids:
        # The task ran in a scope of its own, and postrun put back exactly what was there.
        assert probe.during[task_id] is not probe.before[task_id]
        assert probe.during[task_id].distinct_id == "user-1"
        assert probe.after[task_id] is probe.before[task_id]
    assert len({id(probe.after[t]) for t in ids}) == 1
    assert last["distinct_id"] == "user-2"
    assert "ignored" not in last["tags"]


# -- threads pool ---------------------------------------------------------------------------


def test_threads_pool_tasks_of_different_producers_never_see_each_other() -> None:
    app = make_app("threads")
    barrier = threading.Barrier(2, timeout=WAIT)

    @app.task(name="threads.rendezvous", shared=False)
    def rendezvous(me: str) -> dict[str, Any]:
        before = seen()
        task_scopes.tag("mine", me)
        task_scopes.identify_context(f"{me}-changed")
        barrier.wait()  # both tasks are running now, in two pool threads
        after = seen()
        barrier.wait()  # neither finishes before the other has read its context
        return {"before": before, "after": after, "thread": threading.get_ident()}

    task_scopes.celery.install(app)
    try:
        with in_thread_worker(app, pool="threads", concurrency=2):
            results = {}
            for me in ("alice", "bob"):
                with task_scopes.new_context(fresh=True):
                    task_scopes.identify_context(me)
                    task_scopes.tag("producer", me)
                    results[me] = rendezvous.delay(me)
            got = {me: r.get(timeout=WAIT, interval=0.005) for me, r in results.items()}
    finally:
        task_scopes.celery.uninstall(app)
    assert got["alice"]["thread"] != got["bob"]["thread"]
    for me in ("alice", "bob"):
        assert got[me]["before"]["distinct_id"] == me
        assert got[me]["before"]["tags"]["producer"] == me
        assert got[me]["after"]["distinct_id"] == f"{me}-changed"
        assert got[me]["after"]["tags"]["mine"] == me
        assert got[me]["after"]["tags"]["producer"] == me
