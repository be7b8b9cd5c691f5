"""Shared by the web middleware tests: two users and an eager Celery app the views call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery

# Two users whose requests run at the same time.
USERS = {
    "alice": {
        "distinct_id": "user-alice",
        "session_id": "session-alice",
        "window_id": "window-alice",
        "order": "o-alice",
    },
    "bob": {
        "distinct_id": "user-bob",
        "session_id": "session-bob",
        "window_id": "window-bob",
        "order": "o-bob",
    },
}


@dataclass
class Orders:
    """An eager Celery app with one task that captures, called by the views under test."""

    app: Celery
    # The celery Task. Views read ``.delay(...).result``: EagerResult.get() checks a
    # process-wide flag that a concurrent eager task in another thread has set, and raises.
    place_order: Any

    @staticmethod
    def headers(user: str) -> dict[str, str]:
        """The tracing headers posthog-js sends for ``user``."""
        return {
            "X-POSTHOG-DISTINCT-ID": USERS[user]["distinct_id"],
            "X-POSTHOG-SESSION-ID": USERS[user]["session_id"],
            "X-POSTHOG-WINDOW-ID": USERS[user]["window_id"],
        }

    @staticmethod
    def assert_attributed(events: list[dict[str, Any]]) -> None:
        """Each user's request event and task event carry that user's IDs, nobody else's."""
        for user in USERS.values():
            for name in ("request handled", "order placed"):
                mine = [
                    e
                    for e in events
                    if e["event"] == name and e["properties"].get("order_id") == user["order"]
                ]
                assert len(mine) == 1, (name, user, events)
                assert mine[0]["distinct_id"] == user["distinct_id"], mine[0]
                assert mine[0]["properties"]["$session_id"] == user["session_id"], mine[0]
                assert mine[0]["properties"]["$window_id"] == user["window_id"], mine[0]
            (task_event,) = [
                e
                for e in events
                if e["event"] == "order placed" and e["properties"]["order_id"] == user["order"]
            ]
            # Captured inside the task, which the Celery plugin scoped and tagged.
            assert task_event["properties"]["celery_task_name"] == "web_tests.place_order"
