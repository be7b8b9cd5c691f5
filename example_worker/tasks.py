"""The shop's tasks. None of them knows who the user is: task_scopes restores the caller's
distinct ID, session ID and tags before each task body runs, so a plain ``capture()`` here
is attributed to the shopper whose web request enqueued it, through chains, chords and
retries.

Each task tags its own ``order_id`` (from its arguments, not from the caller's context):
its events and a failure's ``$exception`` carry it, and the demo uses it to check that the
context that travelled in the message header matches the data that travelled in the
arguments.

The tasks are ``shared=False``: they belong to the shop app only. Celery's default would
also register them on every app finalized later in the same process (a test suite's own
app, say), where their names could collide.
"""

from __future__ import annotations

from typing import Any

from celery import Task

import task_scopes
from example_worker.app import app

__all__ = [
    "GiftCardExpired",
    "LoyaltyServiceBusy",
    "process_order",
    "redeem_gift_card",
    "reserve_stock",
    "send_receipt",
    "summarise_reservation",
    "sync_loyalty_points",
]


class LoyaltyServiceBusy(Exception):
    """The loyalty service asked us to come back later (retried)."""


class GiftCardExpired(Exception):
    """A gift card past its date: a real failure, captured as ``$exception``."""


@app.task(name="shop.process_order", shared=False)
def process_order(order_id: str, items: list[list[Any]], total_cents: int) -> dict[str, Any]:
    """Charge and record the order; returns what the next step of the chain needs."""
    task_scopes.tag("order_id", order_id)
    task_scopes.capture(
        "order_processed",
        properties={"order_id": order_id, "lines": len(items), "total_cents": total_cents},
    )
    return {"order_id": order_id, "total_cents": total_cents}


@app.task(name="shop.send_receipt", shared=False)
def send_receipt(order: dict[str, Any]) -> str:
    """Second step of the checkout chain: e-mail the receipt. Returns the order ID."""
    order_id = str(order["order_id"])
    task_scopes.tag("order_id", order_id)
    task_scopes.capture("receipt_sent", properties={"order_id": order_id, "channel": "email"})
    return order_id


@app.task(name="shop.reserve_stock", shared=False)
def reserve_stock(order_id: str, sku: str, quantity: int) -> dict[str, Any]:
    """One header task of the reservation chord: reserve ``quantity`` units of ``sku``."""
    task_scopes.tag("order_id", order_id)
    task_scopes.capture(
        "stock_reserved", properties={"order_id": order_id, "sku": sku, "quantity": quantity}
    )
    return {"sku": sku, "quantity": quantity}


@app.task(name="shop.summarise_reservation", shared=False)
def summarise_reservation(reservations: list[dict[str, Any]], order_id: str) -> int:
    """Body of the reservation chord; returns the number of units reserved."""
    task_scopes.tag("order_id", order_id)
    units = sum(int(r["quantity"]) for r in reservations)
    task_scopes.capture(
        "stock_reservation_completed",
        properties={"order_id": order_id, "lines": len(reservations), "units": units},
    )
    return units


@app.task(name="shop.sync_loyalty_points", shared=False, bind=True, max_retries=3)
def sync_loyalty_points(self: Task, order_id: str, points: int) -> int:
    """Credit loyalty points. The loyalty service is busy on the first attempt, so the task
    retries once; both attempts' events carry ``celery_retry_count`` (0, then 1)."""
    task_scopes.tag("order_id", order_id)
    if self.request.retries == 0:
        task_scopes.capture("loyalty_service_busy", properties={"order_id": order_id})
        raise self.retry(exc=LoyaltyServiceBusy("loyalty service answered 503"), countdown=0.2)
    task_scopes.capture(
        "loyalty_points_synced", properties={"order_id": order_id, "points": points}
    )
    return points


@app.task(name="shop.redeem_gift_card", shared=False)
def redeem_gift_card(order_id: str, code: str) -> None:
    """Always fails: the plugin captures the failure once, as ``$exception``, with the
    shopper's distinct ID and the ``order_id`` tag set here."""
    task_scopes.tag("order_id", order_id)
    raise GiftCardExpired(f"gift card {code} expired")
