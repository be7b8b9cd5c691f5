"""task_scopes.asgi.ContextMiddleware with FastAPI, driven through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from fastapi.responses import StreamingResponse

import task_scopes
from task_scopes.asgi import ContextMiddleware, _header_map, _request_url
from task_scopes.testing import CapturedEvents

from .support import USERS, Orders

BASE = "http://testserver"


class Boom(Exception):
    pass


class Rendezvous:
    """Lets ``n`` coroutines through only once all of them arrived (asyncio.Barrier is 3.11+)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrived = 0
        self.all_here = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.n:
            self.all_here.set()
        await asyncio.wait_for(self.all_here.wait(), timeout=10)


def make_app(
    orders: Orders,
    *,
    rendezvous: Rendezvous | None = None,
    barrier: threading.Barrier | None = None,
    raised: list[BaseException] | None = None,
    **middleware: Any,
) -> FastAPI:
    app = FastAPI()

    @app.get("/orders/{order_id}")
    async def place_order(order_id: str) -> dict[str, Any]:
        if rendezvous is not None:
            # Both requests must be in flight at once, or this times out and the test fails.
            await rendezvous.wait()
        task_scopes.capture("request handled", properties={"order_id": order_id})
        task_distinct_id = orders.place_order.delay(order_id).result
        return {"distinct_id": task_scopes.get_context_distinct_id(), "task": task_distinct_id}

    @app.get("/sync-orders/{order_id}")
    def place_order_sync(order_id: str) -> dict[str, Any]:
        # A plain def endpoint: FastAPI runs it in a worker thread with a copied context.
        if barrier is not None:
            barrier.wait(timeout=10)
        task_scopes.tag("endpoint", "sync")
        task_scopes.capture("request handled", properties={"order_id": order_id})
        task_distinct_id = orders.place_order.delay(order_id).result
        return {"distinct_id": task_scopes.get_context_distinct_id(), "task": task_distinct_id}

    @app.get("/whoami")
    async def whoami() -> dict[str, Any]:
        return {
            "distinct_id": task_scopes.get_context_distinct_id(),
            "session_id": task_scopes.get_context_session_id(),
            "window_id": task_scopes.get_isolation_scope().window_id,
            "tags": task_scopes.get_tags(),
        }

    @app.get("/boom")
    async def boom() -> None:
        exc = Boom("checkout failed")
        if raised is not None:
            raised.append(exc)
        raise exc

    @app.get("/stream")
    async def stream(fail: bool = False) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0)  # let the other request run between chunks
                task_scopes.capture("chunk", properties={"i": i})
                yield f"{i}\n".encode()
                if fail and i == 1:
                    exc = Boom("stream broke")
                    if raised is not None:
                        raised.append(exc)
                    raise exc

        return StreamingResponse(body(), media_type="text/plain")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"distinct_id": task_scopes.get_context_distinct_id()})
        await websocket.close()

    app.add_middleware(ContextMiddleware, **middleware)
    return app


def run(app: FastAPI, requests: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            return await requests(client)

    return asyncio.run(main())


def test_concurrent_requests_are_attributed_to_their_own_users(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    app = make_app(orders, rendezvous=Rendezvous(2))

    async def both(client: httpx.AsyncClient) -> list[httpx.Response]:
        return await asyncio.gather(
            *(
                client.get(f"/orders/{USERS[user]['order']}", headers=Orders.headers(user))
                for user in USERS
            )
        )

    replies = run(app, both)
    for user, reply in zip(USERS, replies, strict=True):
        assert reply.status_code == 200
        assert reply.json() == {
            "distinct_id": USERS[user]["distinct_id"],
            "task": USERS[user]["distinct_id"],
        }
    events = captured_events.events
    Orders.assert_attributed(events)
    for user in USERS.values():
        (event,) = [
            e
            for e in events
            if e["event"] == "request handled" and e["properties"]["order_id"] == user["order"]
        ]
        assert event["properties"]["$current_url"] == f"{BASE}/orders/{user['order']}"
        assert event["properties"]["$request_method"] == "GET"


def test_concurrent_sync_endpoints_in_the_threadpool_are_attributed(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    app = make_app(orders, barrier=threading.Barrier(2))

    async def both(client: httpx.AsyncClient) -> list[httpx.Response]:
        return await asyncio.gather(
            *(
                client.get(f"/sync-orders/{USERS[user]['order']}", headers=Orders.headers(user))
                for user in USERS
            )
        )

    replies = run(app, both)
    assert [r.status_code for r in replies] == [200, 200]
    events = captured_events.events
    Orders.assert_attributed(events)
    assert {e["properties"]["endpoint"] for e in events} == {"sync"}


def test_control_characters_stripped_long_values_capped(orders: Orders) -> None:
    app = make_app(orders)

    async def get(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get(
            "/whoami",
            headers=[
                (b"x-posthog-distinct-id", b"\x00user\x1b-al\x7fice\t"),
                (b"x-posthog-session-id", b"s" * 5_000),
            ],
        )

    body = run(app, get).json()
    assert body["distinct_id"] == "user-alice"
    assert body["session_id"] == "s" * 200


def test_missing_headers_give_personless_events_and_fresh_context(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    app = make_app(orders)

    async def get(client: httpx.AsyncClient) -> httpx.Response:
        with task_scopes.new_context():
            task_scopes.identify_context("caller")
            task_scopes.tag("caller_tag", 1)
            reply = await client.get("/orders/o-anon?x=1")
            assert task_scopes.get_context_distinct_id() == "caller"
            assert task_scopes.get_tags() == {"caller_tag": 1}
            return reply

    reply = run(app, get)
    assert reply.json() == {"distinct_id": None, "task": None}
    for name in ("request handled", "order placed"):
        (event,) = captured_events.named(name)
        props = event["properties"]
        assert props["$process_person_profile"] is False
        assert "$session_id" not in props
        assert "caller_tag" not in props
    (request_event,) = captured_events.named("request handled")
    assert request_event["properties"]["$current_url"] == f"{BASE}/orders/o-anon?x=1"
    assert task_scopes.get_context_distinct_id() is None


def test_unhandled_exception_is_captured_once_and_reraised_unchanged(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    raised: list[BaseException] = []
    app = make_app(orders, raised=raised)

    async def get(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/boom", headers=Orders.headers("alice"))

    with pytest.raises(Boom) as info:
        run(app, get)
    assert info.value is raised[0]
    (event,) = captured_events.named("$exception")
    assert event["distinct_id"] == "user-alice"
    props = event["properties"]
    assert props["$session_id"] == "session-alice"
    assert props["$exception_type"] == "Boom"
    assert props["$current_url"] == f"{BASE}/boom"
    assert props["$exception_list"][0]["mechanism"] == {
        "type": "asgi",
        "handled": False,
        "synthetic": False,
    }


def test_exception_capture_switched_off_still_reraises(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    app = make_app(orders, capture_exceptions=False)

    async def get(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/boom", headers=Orders.headers("alice"))

    with pytest.raises(Boom):
        run(app, get)
    assert captured_events.named("$exception") == []


def test_streamed_responses_are_scoped_for_the_whole_body(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    app = make_app(orders)

    async def both(client: httpx.AsyncClient) -> list[bytes]:
        async def read(user: str) -> bytes:
            async with client.stream("GET", "/stream", headers=Orders.headers(user)) as reply:
                return b"".join([chunk async for chunk in reply.aiter_bytes()])

        return list(await asyncio.gather(read("alice"), read("bob")))

    assert run(app, both) == [b"0\n1\n2\n", b"0\n1\n2\n"]
    chunks = captured_events.named("chunk")
    assert len(chunks) == 6
    for user in USERS.values():
        mine = [e for e in chunks if e["distinct_id"] == user["distinct_id"]]
        assert sorted(e["properties"]["i"] for e in mine) == [0, 1, 2]
        assert {e["properties"]["$session_id"] for e in mine} == {user["session_id"]}


def test_exception_in_streamed_body_is_captured_and_reraised(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    raised: list[BaseException] = []
    app = make_app(orders, raised=raised)

    async def get(client: httpx.AsyncClient) -> bytes:
        async with client.stream("GET", "/stream?fail=true", headers=Orders.headers("bob")) as r:
            return b"".join([chunk async for chunk in r.aiter_bytes()])

    with pytest.raises(Boom) as info:
        run(app, get)
    assert info.value is raised[0]
    (event,) = captured_events.named("$exception")
    assert event["distinct_id"] == "user-bob"
    assert event["properties"]["$exception_message"] == "stream broke"


def test_custom_header_names_and_extra_tags(orders: Orders) -> None:
    def tenant(scope: MutableMapping[str, Any]) -> dict[str, Any]:
        return {"tenant": dict(scope["headers"]).get(b"x-tenant", b"").decode()}

    app = make_app(orders, distinct_id_header="X-User-Id", extra_tags=tenant)

    async def get(client: httpx.AsyncClient) -> httpx.Response:
        headers = {"X-User-Id": "user-7", "X-Tenant": "acme"} | Orders.headers("alice")
        return await client.get("/whoami", headers=headers)

    body = run(app, get).json()
    assert body["distinct_id"] == "user-7"
    assert body["session_id"] == "session-alice"
    assert body["window_id"] == "window-alice"
    assert body["tags"]["tenant"] == "acme"


def test_lifespan_is_passed_through_without_a_scope() -> None:
    seen: list[str | None] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(task_scopes.get_context_distinct_id())

    middleware = ContextMiddleware(inner)

    async def main() -> None:
        with task_scopes.new_context():
            task_scopes.identify_context("outer")
            await middleware({"type": "lifespan"}, _never, _discard)
            await middleware(
                {"type": "http", "method": "GET", "path": "/", "headers": []}, _never, _discard
            )

    asyncio.run(main())
    # lifespan ran in the caller's context untouched; http got a fresh one
    assert seen == ["outer", None]


def test_websocket_is_passed_through(orders: Orders) -> None:
    # Spoken as raw ASGI messages: Starlette's TestClient warns about httpx (-W error).
    app = make_app(orders)
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return await incoming.get()

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        incoming.put_nowait({"type": "websocket.connect"})
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": "/ws",
            "raw_path": b"/ws",
            "root_path": "",
            "query_string": b"",
            "headers": [
                (k.lower().encode(), v.encode()) for k, v in Orders.headers("alice").items()
            ],
            "subprotocols": [],
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 5000),
        }
        await asyncio.wait_for(app(scope, receive, send), timeout=10)

    asyncio.run(main())
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(sent[1]["text"]) == {"distinct_id": None}


async def _never() -> MutableMapping[str, Any]:
    raise AssertionError("receive() must not be called")


async def _discard(message: MutableMapping[str, Any]) -> None:
    pass


@pytest.mark.parametrize(
    ("scope", "url"),
    [
        (
            {
                "scheme": "https",
                "server": ("shop.example", 443),
                "root_path": "/api",
                "path": "/a b",
                "query_string": b"x=1",
                "headers": [],
            },
            "https://shop.example/api/a%20b?x=1",
        ),
        (
            {"scheme": "http", "server": ("10.0.0.1", 8000), "path": "/", "headers": []},
            "http://10.0.0.1:8000/",
        ),
        (
            {
                "scheme": "http",
                "server": ("10.0.0.1", 8000),
                "path": "/p",
                "headers": [(b"Host", b"shop.example"), (b"host", b"second.example")],
            },
            "http://shop.example/p",
        ),
    ],
)
def test_current_url_is_built_from_the_asgi_scope(scope: dict[str, Any], url: str) -> None:
    assert _request_url(scope, _header_map(scope)) == url
