"""``task_scopes.testing.capture_events()`` and the ``captured_events`` pytest fixture."""

from __future__ import annotations

import pytest

import task_scopes
from task_scopes import get_client, identify_context, new_context
from task_scopes.testing import CapturedEvents, capture_events

pytest_plugins = ["pytester"]


def test_capture_events_records_what_the_default_client_captures() -> None:
    with capture_events() as captured:
        with new_context():
            identify_context("user-1")
            task_scopes.capture("checkout", properties={"total": 10})
        task_scopes.capture("anonymous")
        events = captured.events
    assert [e["event"] for e in events] == ["checkout", "anonymous"]
    assert events[0]["distinct_id"] == "user-1"
    assert events[0]["properties"]["total"] == 10
    assert events[1]["properties"]["$process_person_profile"] is False
    assert captured.named("anonymous") == events[1:]


def test_capture_events_puts_the_previous_default_client_back() -> None:
    previous = get_client()
    with capture_events() as captured:
        assert get_client() is captured.client
        assert get_client() is not previous
    assert get_client() is previous


def test_capture_events_passes_client_options_through() -> None:
    with capture_events(before_send=lambda e: None) as captured:
        assert task_scopes.capture("dropped") is None
        assert captured.events == []


def test_captured_events_clear_forgets_what_was_captured() -> None:
    with capture_events() as captured:
        task_scopes.capture("old")
        captured.clear()
        task_scopes.capture("new")
        assert [e["event"] for e in captured.events] == ["new"]


def test_captured_events_fixture_comes_from_the_installed_plugin(
    captured_events: CapturedEvents,
) -> None:
    with new_context():
        identify_context("user-2")
        task_scopes.capture("from_fixture")
    [event] = captured_events.named("from_fixture")
    assert event["distinct_id"] == "user-2"


def test_the_plugin_is_registered_as_a_pytest11_entry_point(
    pytester: pytest.Pytester,
) -> None:
    # a project of a user: no conftest, only the installed package provides the fixture
    pytester.makepyfile(
        """
        import task_scopes

        def test_uses_fixture(captured_events):
            task_scopes.capture("user_test")
            assert [e["event"] for e in captured_events.events] == ["user_test"]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:celery")
    result.assert_outcomes(passed=1)
