"""Groups (PostHog's ``$groups``): on scopes, in ``capture(groups=...)``, merged per type."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import task_scopes
from task_scopes import Scope, get_context_groups, new_context, set_context_groups
from task_scopes.testing import CapturedEvents, capture_events


@pytest.fixture
def captured() -> Iterator[CapturedEvents]:
    with capture_events() as events:
        yield events


@pytest.fixture
def global_scope() -> Iterator[Scope]:
    scope = task_scopes.get_global_scope()
    yield scope
    for group_type in list(scope.groups):
        scope.set_group(group_type, None)


def test_capture_groups_become_the_groups_property_as_posthog_python_sends_them(
    captured: CapturedEvents,
) -> None:
    with new_context(fresh=True):
        task_scopes.capture("seat_added", groups={"company": "acme", "team": 7})
    [event] = captured.named("seat_added")
    assert event["properties"]["$groups"] == {"company": "acme", "team": 7}


def test_an_event_without_groups_has_no_groups_property(captured: CapturedEvents) -> None:
    with new_context(fresh=True):
        task_scopes.capture("plain")
    assert "$groups" not in captured.named("plain")[0]["properties"]


def test_context_groups_apply_to_every_event_and_capture_groups_win_per_type(
    captured: CapturedEvents,
) -> None:
    with new_context(fresh=True):
        set_context_groups({"company": "acme", "project": "p1"})
        task_scopes.capture("a")
        task_scopes.capture("b", groups={"project": "p2"})
    first, second = captured.named("a")[0], captured.named("b")[0]
    assert first["properties"]["$groups"] == {"company": "acme", "project": "p1"}
    assert second["properties"]["$groups"] == {"company": "acme", "project": "p2"}


def test_groups_merge_global_then_isolation_then_current_and_leave_with_the_context(
    global_scope: Scope,
) -> None:
    global_scope.set_group("region", "eu")
    with new_context(fresh=True):
        set_context_groups({"company": "acme"})
        with new_context():
            set_context_groups({"company": "globex", "region": None})
            with task_scopes.new_scope() as current:
                current.set_group("team", "t1")
                # "region" removed from the isolation scope only: the global one still shows
                assert get_context_groups() == {
                    "region": "eu",
                    "company": "globex",
                    "team": "t1",
                }
        assert get_context_groups() == {"region": "eu", "company": "acme"}
    assert get_context_groups() == {"region": "eu"}


def test_a_groups_dict_in_properties_is_merged_under_the_groups_argument(
    captured: CapturedEvents,
) -> None:
    with new_context(fresh=True):
        set_context_groups({"company": "acme"})
        task_scopes.capture(
            "e", properties={"$groups": {"team": "t1", "company": "x"}}, groups={"team": "t2"}
        )
    assert captured.named("e")[0]["properties"]["$groups"] == {"company": "x", "team": "t2"}


def test_exceptions_captured_in_a_context_carry_its_groups(captured: CapturedEvents) -> None:
    with pytest.raises(KeyError), new_context(fresh=True):
        set_context_groups({"company": "acme"})
        raise KeyError("missing")
    [event] = captured.named("$exception")
    assert event["properties"]["$groups"] == {"company": "acme"}


def test_fork_copies_groups_and_clear_forgets_them() -> None:
    scope = Scope(groups={"company": "acme"})
    child = scope.fork()
    child.set_group("company", "globex")
    assert scope.groups == {"company": "acme"}
    assert child.groups == {"company": "globex"}
    scope.clear()
    assert scope.groups == {}
