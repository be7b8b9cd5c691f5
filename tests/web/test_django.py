"""task_scopes.django.ContextMiddleware with Django's own test clients, sync and async."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from asgiref.sync import iscoroutinefunction
from django.core.exceptions import ImproperlyConfigured
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path

import task_scopes
from task_scopes.django import ContextMiddleware
from task_scopes.testing import CapturedEvents

from .support import USERS, Orders
from .test_asgi_fastapi import Rendezvous

BASE = "http://testserver"


class Boom(Exception):
    pass


@dataclass
class State:
    """What the views of this module use; set per test by the ``state`` fixture."""

    orders: Orders
    barrier: threading.Barrier | None = None
    rendezvous: Rendezvous | None = None
    raised: list[BaseException] = field(default_factory=list)


_state: State | None = None


def _current() -> State:
    assert _state is not None, "the state fixture sets up the views"
    return _state


def _whoami() -> dict[str, Any]:
    return {
        "distinct_id": task_scopes.get_context_distinct_id(),
        "session_id": task_scopes.get_context_session_id(),
        "window_id": task_scopes.get_isolation_scope().window_id,
        "tags": task_scopes.get_tags(),
    }


def place_order(request: HttpRequest, order_id: str) -> HttpResponse:
    state = _current()
    if state.barrier is not None:
        # Both requests must be in flight at once, or this times out and the test fails.
        state.barrier.wait(timeout=10)
    task_scopes.capture("request handled", properties={"order_id": order_id})
    task_distinct_id = state.orders.place_order.delay(order_id).result
    return JsonResponse(
        {"distinct_id": task_scopes.get_context_distinct_id(), "task": task_distinct_id}
    )


async def aplace_order(request: HttpRequest, order_id: str) -> HttpResponse:
    state = _current()
    if state.rendezvous is not None:
        await state.rendezvous.wait()
    task_scopes.capture("request handled", properties={"order_id": order_id})
    task_distinct_id = state.orders.place_order.delay(order_id).result
    return JsonResponse(
        {"distinct_id": task_scopes.get_context_distinct_id(), "task": task_distinct_id}
    )


def whoami(request: HttpRequest) -> HttpResponse:
    return JsonResponse(_whoami())


async def awhoami(request: HttpRequest) -> HttpResponse:
    return JsonResponse(_whoami())


def boom(request: HttpRequest) -> HttpResponse:
    exc = Boom("checkout failed")
    _current().raised.append(exc)
    raise exc


async def aboom(request: HttpRequest) -> HttpResponse:
    exc = Boom("async checkout failed")
    _current().raised.append(exc)
    raise exc


def missing(request: HttpRequest) -> HttpResponse:
    raise Http404("no such order")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def body() -> Iterator[bytes]:
        for i in range(3):
            task_scopes.capture("chunk", properties={"i": i})
            yield f"{i}\n".encode()

    return StreamingHttpResponse(body())


async def astream(request: HttpRequest) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[bytes]:
        for i in range(3):
            await asyncio.sleep(0)
            task_scopes.capture("chunk", properties={"i": i})
            yield f"{i}\n".encode()

    return StreamingHttpResponse(body())


def tenant_tags(request: HttpRequest) -> dict[str, Any]:
    """Used through TASK_SCOPES_EXTRA_TAGS as a dotted path."""
    return {"tenant": request.headers.get("X-Tenant")}


urlpatterns = [
    path("orders/<str:order_id>", place_order),
    path("aorders/<str:order_id>", aplace_order),
    path("whoami", whoami),
    path("awhoami", awhoami),
    path("boom", boom),
    path("aboom", aboom),
    path("missing", missing),
    path("stream", stream),
    path("astream", astream),
]


@pytest.fixture(autouse=True)
def state(orders: Orders) -> Iterator[State]:
    global _state
    _state = State(orders)
    try:
        with override_settings(ROOT_URLCONF=__name__):
            yield _state
    finally:
        _state = None


def test_concurrent_sync_requests_are_attributed_to_their_own_users(
    state: State, captured_events: CapturedEvents
) -> None:
    state.barrier = threading.Barrier(2)

    def call(user: str) -> dict[str, Any]:
        reply = Client().get(f"/orders/{USERS[user]['order']}", headers=Orders.headers(user))
        assert reply.status_code == 200
        return dict(reply.json())

    with ThreadPoolExecutor(max_workers=2) as pool:
        replies = dict(zip(USERS, pool.map(call, USERS), strict=True))
    for user, reply in replies.items():
        assert reply == {"distinct_id": USERS[user]["distinct_id"]} | {
            "task": USERS[user]["distinct_id"]
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


def test_concurrent_async_requests_are_attributed_to_their_own_users(
    state: State, captured_events: CapturedEvents
) -> None:
    async def both() -> list[Any]:
        state.rendezvous = Rendezvous(2)
        client = AsyncClient()
        return list(
            await asyncio.gather(
                *(
                    client.get(f"/aorders/{USERS[user]['order']}", headers=Orders.headers(user))
                    for user in USERS
                )
            )
        )

    replies = asyncio.run(both())
    assert [r.status_code for r in replies] == [200, 200]
    for user, reply in zip(USERS, replies, strict=True):
        assert reply.json()["task"] == USERS[user]["distinct_id"]
    Orders.assert_attributed(captured_events.events)


def test_middleware_stays_async_in_an_async_chain() -> None:
    async def get_response(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    def sync_get_response(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    assert iscoroutinefunction(ContextMiddleware(get_response))
    assert not iscoroutinefunction(ContextMiddleware(sync_get_response))


def test_sync_view_under_asgi_is_attributed(captured_events: CapturedEvents) -> None:
    async def get() -> Any:
        return await AsyncClient().get("/orders/o-alice", headers=Orders.headers("alice"))

    assert asyncio.run(get()).json()["task"] == "user-alice"
    (event,) = captured_events.named("order placed")
    assert event["properties"]["$session_id"] == "session-alice"


def test_control_characters_stripped_long_values_capped() -> None:
    reply = Client().get(
        "/whoami",
        headers={
            "X-POSTHOG-DISTINCT-ID": "\x00user\x1b-al\x7fice\t",
            "X-POSTHOG-SESSION-ID": "s" * 5000,
        },
    )
    assert reply.json()["distinct_id"] == "user-alice"
    assert reply.json()["session_id"] == "s" * 200


def test_missing_headers_give_personless_events(captured_events: CapturedEvents) -> None:
    assert Client().get("/orders/o-anon").status_code == 200
    for name in ("request handled", "order placed"):
        (event,) = captured_events.named(name)
        assert event["properties"]["$process_person_profile"] is False
        assert "$session_id" not in event["properties"]


def test_context_never_leaks_to_the_caller_or_the_next_request() -> None:
    client = Client()
    with task_scopes.new_context():
        task_scopes.identify_context("caller")
        task_scopes.tag("caller_tag", 1)
        first = client.get("/whoami", headers=Orders.headers("alice")).json()
        second = client.get("/whoami?page=2").json()
        assert task_scopes.get_context_distinct_id() == "caller"
        assert task_scopes.get_tags() == {"caller_tag": 1}
    assert first["distinct_id"] == "user-alice"
    assert "caller_tag" not in first["tags"]
    assert second == {
        "distinct_id": None,
        "session_id": None,
        "window_id": None,
        "tags": {"$current_url": f"{BASE}/whoami?page=2", "$request_method": "GET"},
    }
    assert task_scopes.get_context_distinct_id() is None


def test_unhandled_exception_is_captured_once_and_reraised_unchanged(
    state: State, captured_events: CapturedEvents
) -> None:
    with pytest.raises(Boom) as info:
        Client().post("/boom", headers=Orders.headers("alice"))
    assert info.value is state.raised[0]
    (event,) = captured_events.named("$exception")
    assert event["distinct_id"] == "user-alice"
    props = event["properties"]
    assert props["$session_id"] == "session-alice"
    assert props["$exception_type"] == "Boom"
    assert props["$current_url"] == f"{BASE}/boom"
    assert props["$request_method"] == "POST"
    assert props["$exception_list"][0]["mechanism"]["type"] == "django"
    assert props["$exception_list"][0]["mechanism"]["handled"] is False


def test_unhandled_exception_in_async_view_is_captured_once(
    state: State, captured_events: CapturedEvents
) -> None:
    async def get() -> Any:
        return await AsyncClient().get("/aboom", headers=Orders.headers("bob"))

    with pytest.raises(Boom) as info:
        asyncio.run(get())
    assert info.value is state.raised[0]
    (event,) = captured_events.named("$exception")
    assert event["distinct_id"] == "user-bob"
    assert event["properties"]["$exception_message"] == "async checkout failed"


def test_unhandled_exception_without_test_client_reraise_gives_500_and_is_captured(
    captured_events: CapturedEvents,
) -> None:
    reply = Client(raise_request_exception=False).get("/boom", headers=Orders.headers("alice"))
    assert reply.status_code == 500
    assert len(captured_events.named("$exception")) == 1


def test_http404_is_not_captured(captured_events: CapturedEvents) -> None:
    assert Client().get("/missing", headers=Orders.headers("alice")).status_code == 404
    assert captured_events.named("$exception") == []


@override_settings(TASK_SCOPES_CAPTURE_EXCEPTIONS=False)
def test_exception_capture_switched_off_still_reraises(captured_events: CapturedEvents) -> None:
    with pytest.raises(Boom):
        Client().get("/boom", headers=Orders.headers("alice"))
    assert captured_events.named("$exception") == []


def test_streamed_body_is_scoped_while_each_chunk_is_produced(
    captured_events: CapturedEvents,
) -> None:
    reply = Client().get("/stream", headers=Orders.headers("alice"))
    body = iter(reply.streaming_content)
    assert next(body) == b"0\n"
    assert task_scopes.get_context_distinct_id() is None
    assert b"".join(body) == b"1\n2\n"
    reply.close()
    chunks = captured_events.named("chunk")
    assert [e["properties"]["i"] for e in chunks] == [0, 1, 2]
    assert {e["distinct_id"] for e in chunks} == {"user-alice"}


def test_async_streamed_body_is_scoped(captured_events: CapturedEvents) -> None:
    async def both() -> list[bytes]:
        async def read(user: str) -> bytes:
            reply = await AsyncClient().get("/astream", headers=Orders.headers(user))
            return b"".join([chunk async for chunk in reply.streaming_content])

        return list(await asyncio.gather(read("alice"), read("bob")))

    assert asyncio.run(both()) == [b"0\n1\n2\n", b"0\n1\n2\n"]
    chunks = captured_events.named("chunk")
    for user in USERS.values():
        mine = [e for e in chunks if e["distinct_id"] == user["distinct_id"]]
        assert sorted(e["properties"]["i"] for e in mine) == [0, 1, 2]


@override_settings(
    TASK_SCOPES_DISTINCT_ID_HEADER="X-User-Id",
    TASK_SCOPES_SESSION_ID_HEADER="X-Session",
    TASK_SCOPES_WINDOW_ID_HEADER="X-Window",
    TASK_SCOPES_EXTRA_TAGS=f"{__name__}.tenant_tags",
)
def test_settings_choose_headers_and_extra_tags() -> None:
    reply = Client().get(
        "/whoami",
        headers={"X-User-Id": "user-7", "X-Session": "s-7", "X-Window": "w-7", "X-Tenant": "acme"}
        | Orders.headers("alice"),
    )
    assert reply.json()["distinct_id"] == "user-7"
    assert reply.json()["session_id"] == "s-7"
    assert reply.json()["window_id"] == "w-7"
    assert reply.json()["tags"]["tenant"] == "acme"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("TASK_SCOPES_SESSION_ID_HEADER", "bad header"),
        ("TASK_SCOPES_WINDOW_ID_HEADER", "bad header"),
        ("TASK_SCOPES_CAPTURE_EXCEPTIONS", "yes"),
        ("TASK_SCOPES_EXTRA_TAGS", "no.such.module.tags"),
    ],
)
def test_invalid_setting_raises_improperly_configured_naming_it(setting: str, value: Any) -> None:
    with override_settings(**{setting: value}), pytest.raises(ImproperlyConfigured, match=setting):
        Client().get("/whoami")


@override_settings(ALLOWED_HOSTS=["testserver"])
def test_disallowed_host_does_not_break_the_middleware() -> None:
    # Nothing below this middleware validates the host here, so the view still answers;
    # the middleware tags the path it can read instead of failing the request.
    reply = Client().get("/whoami", headers=Orders.headers("alice"), HTTP_HOST="evil.example")
    assert reply.status_code == 200
    assert reply.json()["tags"]["$current_url"] == "/whoami"
    assert reply.json()["distinct_id"] == "user-alice"
