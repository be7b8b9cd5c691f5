"""The shop's web app: a plain WSGI application wrapped in ``task_scopes.wsgi.ContextMiddleware``.

The middleware opens a fresh isolation scope per request, identified from the
``X-POSTHOG-DISTINCT-ID`` and ``X-POSTHOG-SESSION-ID`` headers that posthog-js sends with
tracing headers enabled, and tags it with ``$current_url`` and ``$request_method``. The
view never handles the user: it tags what only it knows (the shopper's ``plan``), captures
``checkout_requested`` and calls ``.delay()``; the tasks' events are attributed to the same
user and session because the plugin carries the context in each task message.

``$``-prefixed tags describe the request itself and stay on the web process's events; the
other tags (``plan``, ``demo_run``) travel to the tasks.

:func:`serve` runs the app on loopback with the standard library's ``wsgiref``, one thread
per request; any WSGI server (gunicorn, uWSGI, Flask's ``app.wsgi_app``) takes
:func:`make_app`'s result as it is.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from celery import chain, chord

import task_scopes
from example_worker.tasks import (
    process_order,
    redeem_gift_card,
    reserve_stock,
    send_receipt,
    summarise_reservation,
    sync_loyalty_points,
)
from task_scopes.wsgi import ContextMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["Checkout", "WebServer", "checkout", "make_app", "serve"]

MAX_BODY_BYTES = 64 * 1024
_KINDS = {str: "a string", int: "an integer", list: "a list"}


@dataclass(frozen=True)
class Checkout:
    """The body of ``POST /checkout`` (JSON object).

    ``plan``: the shopper's plan; a real shop reads it from its accounts, the demo's browser
    sends it. ``items``: ``[sku, quantity]`` pairs. ``loyalty_points``: points to credit, or
    None. ``gift_card``: a code to redeem, or None.
    """

    order_id: str
    plan: str
    items: tuple[tuple[str, int], ...]
    total_cents: int
    loyalty_points: int | None = None
    gift_card: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> Checkout:
        """Validate a decoded JSON body.

        Raises:
            ValueError: a field is missing or has the wrong type, naming it.
        """
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")

        def get(name: str, kind: type, optional: bool = False) -> Any:
            value = data.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{name!r} must be {_KINDS[kind]}")
            return value

        raw_items = get("items", list)
        if not raw_items or not all(
            isinstance(i, list)
            and len(i) == 2
            and isinstance(i[0], str)
            and isinstance(i[1], int)
            and not isinstance(i[1], bool)
            for i in raw_items
        ):
            raise ValueError("'items' must be a non-empty list of [sku, quantity] pairs")
        return cls(
            order_id=get("order_id", str),
            plan=get("plan", str),
            items=tuple((sku, quantity) for sku, quantity in raw_items),
            total_cents=get("total_cents", int),
            loyalty_points=get("loyalty_points", int, optional=True),
            gift_card=get("gift_card", str, optional=True),
        )


def checkout(order: Checkout) -> dict[str, str]:
    """The view of ``POST /checkout``, run inside the request's scope (the middleware's).

    Returns:
        The enqueued work: step name -> the Celery task ID to wait on.
    """
    task_scopes.tag("plan", order.plan)
    task_scopes.capture(
        "checkout_requested",
        properties={"order_id": order.order_id, "total_cents": order.total_cents},
    )
    items = [[sku, quantity] for sku, quantity in order.items]
    enqueued = {
        # The receipt step is published by the worker once the order is processed; the
        # result is the chain's last step.
        "order+receipt": chain(
            process_order.s(order.order_id, items, order.total_cents),
            send_receipt.s(),
        ).delay(),
        # One task per item, then a summary the worker publishes when all are done.
        "stock chord": chord(
            reserve_stock.s(order.order_id, sku, quantity) for sku, quantity in items
        )(summarise_reservation.s(order.order_id)),
    }
    if order.loyalty_points is not None:
        enqueued["loyalty (retries once)"] = sync_loyalty_points.delay(
            order.order_id, order.loyalty_points
        )
    if order.gift_card is not None:
        enqueued["gift card (fails)"] = redeem_gift_card.delay(order.order_id, order.gift_card)
    return {step: result.id for step, result in enqueued.items()}


def _reply(start_response: StartResponse, status: HTTPStatus, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        f"{status.value} {status.phrase}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return [data]


def shop(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The shop's WSGI application (unwrapped): ``POST /checkout`` only."""
    if environ.get("PATH_INFO") != "/checkout":
        return _reply(start_response, HTTPStatus.NOT_FOUND, {"error": "no such page"})
    if environ.get("REQUEST_METHOD") != "POST":
        return _reply(start_response, HTTPStatus.METHOD_NOT_ALLOWED, {"error": "POST only"})
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            raise ValueError(f"the body must be 1 to {MAX_BODY_BYTES} bytes")
        order = Checkout.from_json(json.loads(environ["wsgi.input"].read(length)))
    except ValueError as exc:  # json.JSONDecodeError is one
        return _reply(start_response, HTTPStatus.BAD_REQUEST, {"error": str(exc)})
    enqueued = checkout(order)
    return _reply(
        start_response, HTTPStatus.ACCEPTED, {"order_id": order.order_id, "enqueued": enqueued}
    )


def make_app(run_id: str | None = None) -> WSGIApplication:
    """The shop wrapped in the middleware, the one line a real app adds.

    Args:
        run_id: tagged ``demo_run`` on every request (through the middleware's
            ``extra_tags``), so one demo run's events can be told from another's.
    """
    extra = {"demo_run": run_id} if run_id else None
    return ContextMiddleware(shop, extra_tags=lambda environ: extra)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck request must not keep the demo from exiting


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        pass  # the browser side prints each request and its answer


class WebServer:
    """A WSGI app served on loopback by ``wsgiref``, one thread per request."""

    def __init__(self, app: WSGIApplication, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = make_server(
            host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.url = f"http://{host}:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="shop-web", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop accepting requests and wait for the serving thread (bounded)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> WebServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve(run_id: str | None = None, port: int = 0) -> WebServer:
    """Serve :func:`make_app` on ``127.0.0.1:port`` (0: a free port) in a thread."""
    return WebServer(make_app(run_id), port=port)
