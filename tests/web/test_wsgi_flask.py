"""task_scopes.wsgi.ContextMiddleware with Flask: test client, and a real threaded server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from flask import Flask, Response, got_request_exception, request
from werkzeug.serving import make_server

import task_scopes
from task_scopes import _internal
from task_scopes.testing import CapturedEvents
from task_scopes.wsgi import ContextMiddleware

from .support import USERS, Orders


class Boom(Exception):
    pass


def make_app(
    orders: Orders,
    *,
    barrier: threading.Barrier | None = None,
    raised: list[BaseException] | None = None,
    propagate: bool = True,
    **middleware: Any,
) -> Flask:
    app = Flask(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = propagate

    @app.get("/orders/<order_id>")
    def place_order(order_id: str) -> dict[str, Any]:
        if barrier is not None:
            # Both requests must be in flight at once, or this times out and the test fails.
            barrier.wait(timeout=10)
        task_scopes.capture("request handled", properties={"order_id": order_id})
        task_distinct_id = orders.place_order.delay(order_id).result
        return {"distinct_id": task_scopes.get_context_distinct_id(), "task": task_distinct_id}

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        return {
            "distinct_id": task_scopes.get_context_distinct_id(),
            "session_id": task_scopes.get_context_session_id(),
            "window_id": task_scopes.get_isolation_scope().window_id,
            "tags": task_scopes.get_tags(),
        }

    @app.get("/boom")
    def boom() -> str:
        exc = Boom("checkout failed")
        if raised is not None:
            raised.append(exc)
        raise exc

    @app.get("/stream")
    def stream() -> Response:
        fail = request.args.get("fail") == "1"

        def body() -> Iterator[str]:
            for i in range(3):
                task_scopes.capture("chunk", properties={"i": i})
                yield f"{i}\n"
                if fail and i == 1:
                    exc = Boom("stream broke")
                    if raised is not None:
                        raised.append(exc)
                    raise exc

        return Response(body(), mimetype="text/plain")

    app.wsgi_app = ContextMiddleware(app.wsgi_app, **middleware)  # type: ignore[method-assign]
    return app


def test_concurrent_requests_on_a_real_server_are_attributed_to_their_own_users(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    barrier = threading.Barrier(2)
    app = make_app(orders, barrier=barrier)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        base = f"http://127.0.0.1:{server.port}"

        def call(user: str) -> dict[str, Any]:
            order = USERS[user]["order"]
            reply = requests.get(f"{base}/orders/{order}", headers=Orders.headers(user), timeout=30)
            reply.raise_for_status()
            return dict(reply.json())

        with ThreadPoolExecutor(max_workers=2) as pool:
            replies = dict(zip(USERS, pool.map(call, USERS), strict=True))
    finally:
        server.shutdown()
        serving.join(timeout=10)
        server.server_close()

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
        assert event["properties"]["$request_method"] == "GET"
        assert event["properties"]["$current_url"] == f"{base}/orders/{user['order']}"


def test_request_events_carry_url_and_method_tags(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    client = make_app(orders).test_client()
    reply = client.get("/orders/o-alice?ref=mail", headers=Orders.headers("alice"))
    assert reply.status_code == 200
    (event,) = captured_events.named("request handled")
    assert event["properties"]["$current_url"] == "http://localhost/orders/o-alice?ref=mail"
    assert event["properties"]["$request_method"] == "GET"
    assert event["distinct_id"] == "user-alice"
    assert event["properties"]["$session_id"] == "session-alice"
    assert event["properties"]["$window_id"] == "window-alice"


def test_window_id_is_cleaned_capped_and_carried_to_the_task(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    client = make_app(orders).test_client()
    headers = Orders.headers("alice") | {"X-POSTHOG-WINDOW-ID": "\x00win\x1b-1\t" + "w" * 5_000}
    assert client.get("/orders/o-alice", headers=headers).status_code == 200
    window_id = ("win-1" + "w" * 5_000)[:200]
    for name in ("request handled", "order placed"):
        (event,) = captured_events.named(name)
        assert event["properties"]["$window_id"] == window_id, name
    # Only a window ID: still carried, the events stay personless.
    captured_events.clear()
    assert client.get("/orders/o-anon", headers={"X-POSTHOG-WINDOW-ID": "w-2"}).status_code == 200
    for name in ("request handled", "order placed"):
        (event,) = captured_events.named(name)
        assert event["properties"]["$window_id"] == "w-2", name
        assert event["properties"]["$process_person_profile"] is False
    # A blank header counts as absent.
    captured_events.clear()
    assert client.get("/orders/o-anon", headers={"X-POSTHOG-WINDOW-ID": " \x00"}).status_code == 200
    for name in ("request handled", "order placed"):
        (event,) = captured_events.named(name)
        assert "$window_id" not in event["properties"], name


def test_control_characters_are_stripped_and_long_values_capped(orders: Orders) -> None:
    client = make_app(orders).test_client()
    reply = client.get(
        "/whoami",
        headers={
            "X-POSTHOG-DISTINCT-ID": "\x00user\x1b-al\x7fice\t",
            "X-POSTHOG-SESSION-ID": "s" * 5_000,
        },
    )
    assert reply.json is not None
    assert reply.json["distinct_id"] == "user-alice"
    assert reply.json["session_id"] == "s" * 200


def test_missing_headers_give_personless_events(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    client = make_app(orders).test_client()
    assert client.get("/orders/o-anon").status_code == 200
    for name in ("request handled", "order placed"):
        (event,) = captured_events.named(name)
        assert event["properties"]["$process_person_profile"] is False
        assert "$session_id" not in event["properties"]
        assert "$window_id" not in event["properties"]
    (request_event,) = captured_events.named("request handled")
    assert request_event["properties"]["$current_url"] == "http://localhost/orders/o-anon"


def test_context_never_leaks_to_the_caller_or_the_next_request(orders: Orders) -> None:
    client = make_app(orders).test_client()
    with task_scopes.new_context():
        task_scopes.identify_context("caller")
        task_scopes.tag("caller_tag", 1)
        first = client.get("/whoami", headers=Orders.headers("alice")).json
        second = client.get("/whoami").json
        # The test client runs the app in this very thread and context.
        assert task_scopes.get_context_distinct_id() == "caller"
        assert task_scopes.get_tags() == {"caller_tag": 1}
    assert first is not None and second is not None
    assert first["distinct_id"] == "user-alice"
    assert "caller_tag" not in first["tags"]
    assert first["window_id"] == "window-alice"
    assert second == {
        "distinct_id": None,
        "session_id": None,
        "window_id": None,
        "tags": {"$current_url": "http://localhost/whoami", "$request_method": "GET"},
    }
    assert task_scopes.get_context_distinct_id() is None


def test_unhandled_exception_is_captured_once_and_reraised_unchanged(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    raised: list[BaseException] = []
    client = make_app(orders, raised=raised).test_client()
    with pytest.raises(Boom) as info:
        client.get("/boom", headers=Orders.headers("alice"))
    assert info.value is raised[0]
    assert str(info.value) == "checkout failed"
    (event,) = captured_events.named("$exception")
    assert event["distinct_id"] == "user-alice"
    props = event["properties"]
    assert props["$session_id"] == "session-alice"
    assert props["$exception_type"] == "Boom"
    assert props["$current_url"] == "http://localhost/boom"
    assert props["$exception_list"][0]["mechanism"]["type"] == "wsgi"
    assert props["$exception_list"][0]["mechanism"]["handled"] is False
    assert task_scopes.get_context_distinct_id() is None


def test_exception_capture_switched_off_still_reraises(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    client = make_app(orders, capture_exceptions=False).test_client()
    with pytest.raises(Boom):
        client.get("/boom", headers=Orders.headers("alice"))
    assert captured_events.named("$exception") == []


def test_streamed_body_is_scoped_while_each_chunk_is_produced(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    client = make_app(orders).test_client()
    reply = client.get("/stream", headers=Orders.headers("alice"), buffered=False)
    body = iter(reply.response)
    assert next(body) == b"0\n"
    # Between chunks the server's thread is back in its own context.
    assert task_scopes.get_context_distinct_id() is None
    assert b"".join(body) == b"1\n2\n"
    reply.close()
    chunks = captured_events.named("chunk")
    assert [e["properties"]["i"] for e in chunks] == [0, 1, 2]
    assert {e["distinct_id"] for e in chunks} == {"user-alice"}
    assert {e["properties"]["$current_url"] for e in chunks} == {"http://localhost/stream"}


def test_exception_in_streamed_body_is_captured_and_reraised(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    raised: list[BaseException] = []
    client = make_app(orders, raised=raised).test_client()
    reply = client.get("/stream?fail=1", headers=Orders.headers("bob"), buffered=False)
    with pytest.raises(Boom) as info:
        b"".join(reply.response)
    reply.close()
    assert info.value is raised[0]
    (event,) = captured_events.named("$exception")
    assert event["distinct_id"] == "user-bob"
    assert event["properties"]["$exception_message"] == "stream broke"


def test_custom_header_names_and_extra_tags(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    client = make_app(
        orders,
        distinct_id_header="X-User-Id",
        session_id_header="X-Session",
        window_id_header="X-Window",
        extra_tags=lambda environ: {"tenant": environ.get("HTTP_X_TENANT")},
    ).test_client()
    reply = client.get(
        "/whoami",
        headers={"X-User-Id": "user-7", "X-Session": "s-7", "X-Window": "w-7", "X-Tenant": "acme"}
        | Orders.headers("alice"),
    )
    assert reply.json is not None
    assert reply.json["distinct_id"] == "user-7"
    assert reply.json["session_id"] == "s-7"
    assert reply.json["window_id"] == "w-7"
    assert reply.json["tags"]["tenant"] == "acme"


def test_failing_extra_tags_callback_is_logged_and_the_request_still_served(
    orders: Orders, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(environ: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("no tenant")

    client = make_app(orders, extra_tags=broken).test_client()
    previous = _internal.set_reraise(False)  # production behaviour of the guard
    try:
        with caplog.at_level(logging.ERROR, logger="task_scopes"):
            reply = client.get("/whoami", headers=Orders.headers("alice"))
    finally:
        _internal.set_reraise(previous)
    assert reply.status_code == 200
    assert reply.json is not None and reply.json["distinct_id"] == "user-alice"
    assert any("extra_tags" in r.getMessage() for r in caplog.records)


def test_invalid_option_raises_naming_it(orders: Orders) -> None:
    with pytest.raises(ValueError, match="session_id_header"):
        make_app(orders, session_id_header="bad header")


def test_flask_handled_500_is_captured_through_got_request_exception(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    # Flask answers a view's exception with a 500 itself (PROPAGATE_EXCEPTIONS off), so
    # the WSGI middleware never sees it; the README's recipe captures it from the signal,
    # which Flask sends inside the request, hence inside its scope.
    app = make_app(orders, propagate=False)

    def capture_flask_exception(sender: Flask, exception: Exception, **extra: Any) -> None:
        task_scopes.capture_exception(exception)

    got_request_exception.connect(capture_flask_exception, app)
    reply = app.test_client().get("/boom", headers=Orders.headers("alice"))
    assert reply.status_code == 500
    (event,) = captured_events.named("$exception")
    assert event["distinct_id"] == "user-alice"
    assert event["properties"]["$exception_type"] == "Boom"


def test_signal_recipe_and_middleware_together_capture_once(
    orders: Orders, captured_events: CapturedEvents
) -> None:
    app = make_app(orders, propagate=True)

    def capture_flask_exception(sender: Flask, exception: Exception, **extra: Any) -> None:
        task_scopes.capture_exception(exception)

    got_request_exception.connect(capture_flask_exception, app)
    with pytest.raises(Boom):
        app.test_client().get("/boom", headers=Orders.headers("alice"))
    assert len(captured_events.named("$exception")) == 1
