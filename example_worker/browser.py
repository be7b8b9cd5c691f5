"""The shoppers' browsers: what posthog-js sends to the shop when tracing headers are on.

With tracing headers enabled for the shop's host (posthog-js's ``tracing_headers`` option,
``__add_tracing_headers`` in older releases), posthog-js adds the person's distinct ID, the
session ID and the ID of the browser tab (its window ID) to each request as
``X-POSTHOG-DISTINCT-ID``, ``X-POSTHOG-SESSION-ID`` and ``X-POSTHOG-WINDOW-ID``; the web
app's middleware turns them into the request's context. Nothing else in the request says
who the shopper is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests

from example_worker.plan import Shopper

__all__ = ["Answer", "cart", "post_checkout", "tracing_headers"]

DISTINCT_ID_HEADER = "X-POSTHOG-DISTINCT-ID"
SESSION_ID_HEADER = "X-POSTHOG-SESSION-ID"
WINDOW_ID_HEADER = "X-POSTHOG-WINDOW-ID"


@dataclass(frozen=True)
class Answer:
    """The web app's answer to one checkout.

    ``enqueued``: step name -> Celery task ID, empty unless the request was accepted;
    ``problem``: why it was not (status and error), None when it was.
    """

    status: int
    enqueued: dict[str, str]
    problem: str | None


def tracing_headers(distinct_id: str, session_id: str, window_id: str) -> dict[str, str]:
    """The three headers posthog-js adds to a request to the shop."""
    return {
        DISTINCT_ID_HEADER: distinct_id,
        SESSION_ID_HEADER: session_id,
        WINDOW_ID_HEADER: window_id,
    }


def cart(shopper: Shopper) -> dict[str, Any]:
    """The JSON body of the shopper's ``POST /checkout``: the order, not the user."""
    return {
        "order_id": shopper.order_id,
        "plan": shopper.plan,
        "items": [[sku, quantity] for sku, quantity in shopper.items],
        "total_cents": shopper.total_cents,
        "loyalty_points": shopper.loyalty_points,
        "gift_card": shopper.gift_card,
    }


def post_checkout(
    base_url: str, shopper: Shopper, session_id: str, window_id: str, *, timeout: float = 30.0
) -> Answer:
    """Send the shopper's checkout as their browser would.

    Args:
        base_url: the web app, e.g. ``http://127.0.0.1:8000``.
        session_id: the browser's PostHog session (a UUIDv7 string).
        window_id: the browser tab's PostHog window ID (a UUIDv7 string).
        timeout: seconds for connecting and for the answer.

    Returns:
        The answer; a connection failure or timeout is an :class:`Answer` with status 0.
    """
    try:
        response = requests.post(
            f"{base_url}/checkout",
            json=cart(shopper),
            headers=tracing_headers(shopper.distinct_id, session_id, window_id),
            timeout=timeout,
        )
    except requests.RequestException as exc:
        return Answer(0, {}, f"{type(exc).__name__}: {exc}")
    if response.status_code != 202:
        return Answer(
            response.status_code, {}, f"{response.status_code} {response.reason}: {response.text}"
        )
    enqueued = response.json().get("enqueued")
    if not isinstance(enqueued, dict):
        return Answer(response.status_code, {}, f"no 'enqueued' in the answer: {response.text}")
    return Answer(response.status_code, {str(k): str(v) for k, v in enqueued.items()}, None)
