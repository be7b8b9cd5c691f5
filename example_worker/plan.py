"""Who shops in the demo, and — written out by hand — every event each one must produce.

The expected list is explicit on purpose: the demo's verdict compares what the collector
received with this table, not with anything derived from what was received.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

__all__ = ["EXPECTED", "SHOPPERS", "Expected", "Shopper", "uuid7"]


@dataclass(frozen=True)
class Shopper:
    """One user of the shop and what their checkout contains.

    ``items``: ``(sku, quantity)`` pairs; ``loyalty_points``: points to credit (the task
    retries once), None for none; ``gift_card``: a code to redeem (the task fails), or None.
    """

    name: str
    distinct_id: str
    plan: str
    order_id: str
    items: tuple[tuple[str, int], ...]
    total_cents: int
    loyalty_points: int | None = None
    gift_card: str | None = None


SHOPPERS: tuple[Shopper, ...] = (
    Shopper(
        "alice",
        "user_alice",
        plan="pro",
        order_id="A-1001",
        items=(("mug", 2), ("tee", 1), ("cap", 1)),
        total_cents=5400,
    ),
    Shopper(
        "bob",
        "user_bob",
        plan="free",
        order_id="B-2002",
        items=(("hoodie", 1), ("socks", 3)),
        total_cents=7300,
        loyalty_points=73,
    ),
    Shopper(
        "carol",
        "user_carol",
        plan="team",
        order_id="C-3003",
        items=(("poster", 1),),
        total_cents=1500,
        gift_card="GIFT-EXPIRED-42",
    ),
)


@dataclass(frozen=True)
class Expected:
    """One event the collector must receive for a shopper.

    ``task``: the ``celery_task_name`` it must carry, None for an event captured in the web
    process itself; ``retry``: the ``celery_retry_count`` it must carry (None: web event,
    no such tag); ``sku``: the ``sku`` property, for the per-item chord events;
    ``request``: for a web event, the request it was captured in, as ``"METHOD /path"``
    (from the ``$request_method`` and ``$current_url`` tags the web middleware sets).
    """

    event: str
    task: str | None
    retry: int | None = 0
    sku: str | None = None
    request: str | None = None

    def describe(self) -> str:
        where = self.task or self.request or "web request"
        extra = f", sku={self.sku}" if self.sku else ""
        retry = f", retry {self.retry}" if self.retry else ""
        return f"{self.event} ({where}{extra}{retry})"


WEB = Expected("checkout_requested", None, retry=None, request="POST /checkout")
ORDER = Expected("order_processed", "shop.process_order")
RECEIPT = Expected("receipt_sent", "shop.send_receipt")  # chain step, published by the worker
SUMMARY = Expected("stock_reservation_completed", "shop.summarise_reservation")  # chord body


def _reserved(sku: str) -> Expected:
    return Expected("stock_reserved", "shop.reserve_stock", sku=sku)  # chord header


EXPECTED: dict[str, tuple[Expected, ...]] = {
    "alice": (
        WEB,
        ORDER,
        RECEIPT,
        _reserved("mug"),
        _reserved("tee"),
        _reserved("cap"),
        SUMMARY,
    ),
    "bob": (
        WEB,
        ORDER,
        RECEIPT,
        _reserved("hoodie"),
        _reserved("socks"),
        SUMMARY,
        Expected("loyalty_service_busy", "shop.sync_loyalty_points", retry=0),
        Expected("loyalty_points_synced", "shop.sync_loyalty_points", retry=1),
    ),
    "carol": (
        WEB,
        ORDER,
        RECEIPT,
        _reserved("poster"),
        SUMMARY,
        Expected("$exception", "shop.redeem_gift_card"),
    ),
}


def uuid7() -> str:
    """A UUIDv7 string (48-bit Unix milliseconds, then random bits): the shape PostHog
    expects of a ``$session_id``. The standard library has ``uuid.uuid7`` from 3.14 only."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value &= ~(0xF << 76)
    value |= 0x7 << 76  # version 7
    value &= ~(0x3 << 62)
    value |= 0x2 << 62  # RFC 4122 variant
    return str(uuid.UUID(int=value))
