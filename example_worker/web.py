"""What a web view does: one ``new_context()`` per request, the user and session set once,
then plain ``.delay()`` calls. Nothing task-specific is passed about the user.

In a real app the middleware (``task_scopes.wsgi``, ``task_scopes.asgi``,
``task_scopes.django``) opens the context and reads the session from the request; here the
demo plays the request itself.
"""

from __future__ import annotations

from celery import chain, chord
from celery.result import AsyncResult

import task_scopes
from example_worker.plan import Shopper
from example_worker.tasks import (
    process_order,
    redeem_gift_card,
    reserve_stock,
    send_receipt,
    summarise_reservation,
    sync_loyalty_points,
)

__all__ = ["checkout"]


def checkout(shopper: Shopper, session_id: str, run_id: str) -> dict[str, AsyncResult]:
    """Handle ``POST /checkout`` for ``shopper``; returns the enqueued results by step name.

    Args:
        shopper: who is checking out, and what.
        session_id: the browser session (a UUIDv7 string).
        run_id: tagged on everything, so one run's events can be told from another's.
    """
    with task_scopes.new_context():
        task_scopes.identify_context(shopper.distinct_id)
        task_scopes.set_context_session(session_id)
        task_scopes.tag("plan", shopper.plan)
        task_scopes.tag("request_path", "/checkout")
        task_scopes.tag("demo_run", run_id)
        task_scopes.capture(
            "checkout_requested",
            properties={"order_id": shopper.order_id, "total_cents": shopper.total_cents},
        )
        items = [[sku, quantity] for sku, quantity in shopper.items]
        results: dict[str, AsyncResult] = {
            # The receipt step is published by the worker once the order is processed.
            "order+receipt": chain(
                process_order.s(shopper.order_id, items, shopper.total_cents),
                send_receipt.s(),
            ).delay(),
            # One task per item, then a summary the worker publishes when all are done.
            "stock chord": chord(
                reserve_stock.s(shopper.order_id, sku, quantity) for sku, quantity in items
            )(summarise_reservation.s(shopper.order_id)),
        }
        if shopper.loyalty_points is not None:
            results["loyalty (retries once)"] = sync_loyalty_points.delay(
                shopper.order_id, shopper.loyalty_points
            )
        if shopper.gift_card is not None:
            results["gift card (fails)"] = redeem_gift_card.delay(
                shopper.order_id, shopper.gift_card
            )
        return results
