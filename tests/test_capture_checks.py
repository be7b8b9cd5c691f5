"""capture() checks and freezes each event in the caller's thread: an event PostHog would
refuse is refused there (None, one log line naming the mistake) instead of costing the
events batched with it; a valid one is sent exactly as it was at capture().

Every test sends to the loopback collector, which refuses a whole request as PostHog's
capture endpoint does (``task_scopes._capture_rules``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any
from unittest.mock import Mock

import pydantic
import pytest

import task_scopes
from task_scopes import Client, _client, _internal
from task_scopes.testing import CaptureServer, Reply, capture_events

MakeClient = Callable[..., Client]


@pytest.fixture
def server() -> Iterator[CaptureServer]:
    with CaptureServer() as srv:
        yield srv


@pytest.fixture
def make_client(server: CaptureServer) -> Iterator[MakeClient]:
    """Clients sending to ``server`` that only send on flush(); shut down after the test."""
    clients: list[Client] = []

    def make(**options: Any) -> Client:
        options.setdefault("flush_interval", 300)
        client = Client(options.pop("api_key", "phc_test"), server.url, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.shutdown(timeout=0.5)


@pytest.fixture
def production_guard() -> Iterator[None]:
    """The guard logs and swallows, as in production (the suite's fixture makes it raise),
    so that a mistake blamed on task_scopes shows as an "internal error" line."""
    previous = _internal.set_reraise(False)
    try:
        yield
    finally:
        _internal.set_reraise(previous)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("task_scopes")]


# -- 1. one bad event never costs another ----------------------------------------------------


def test_invalid_events_are_refused_at_capture_and_every_good_event_of_the_batch_arrives(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    good = [client.capture("good", properties={"n": n}) for n in range(3)]
    refused = [
        client.capture(None),  # type: ignore[arg-type]
        client.capture(""),
        client.capture(123),  # type: ignore[arg-type]
        client.capture("bad uuid", uuid="not-a-uuid"),
    ]
    personless = client.capture("empty id", distinct_id="")
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("")
        context_personless = client.capture("empty context id")
        blank = client.capture("blank id", distinct_id=" \t")
    with task_scopes.new_context(fresh=True):
        task_scopes.identify_context("user-1")
        from_context = client.capture("empty id in a context", distinct_id="")
    not_finite = client.capture(
        "not finite", properties={"nan": float("nan"), "inf": [float("inf"), -float("inf")]}
    )
    good.append(client.capture("good", properties={"n": 3}))
    assert refused == [None, None, None, None]
    assert client.flush(timeout=10) == 0
    sent = [*good, personless, context_personless, blank, from_context, not_finite]
    assert None not in sent
    events = {e["uuid"]: e for e in server.wait_for(len(sent))}
    assert set(events) == set(sent)
    assert [status for _, status, _ in server.requests] == [200]  # one batch, accepted
    for uid in (personless, context_personless, blank):
        assert events[uid]["properties"]["$process_person_profile"] is False
        assert uuid.UUID(events[uid]["distinct_id"])  # a fresh UUID, as for no distinct ID
    assert events[from_context]["distinct_id"] == "user-1"  # as posthog-python
    assert events[not_finite]["properties"]["nan"] is None
    assert events[not_finite]["properties"]["inf"] == [None, None]
    stats = client.stats()
    assert (stats.delivered, stats.dropped, stats.failed) == (len(sent), 4, 0)


def test_a_properties_value_that_is_not_a_mapping_is_refused_as_the_callers_mistake(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture, production_guard: None
) -> None:
    client = make_client()
    with caplog.at_level(logging.WARNING, logger="task_scopes"):
        assert client.capture("cart", properties="abc") is None  # type: ignore[arg-type]
    [line] = _messages(caplog)
    assert "capture() refused event 'cart'" in line
    assert "properties must be a dict (mapping), got str" in line
    assert "internal error" not in line
    assert client.stats().dropped == 1


def test_each_kind_of_refusal_is_logged_once_a_minute_with_what_was_wrong(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()
    with caplog.at_level(logging.WARNING, logger="task_scopes"):
        for _ in range(3):
            client.capture(None)  # type: ignore[arg-type]
            client.capture("x", uuid="abc")
    lines = _messages(caplog)
    assert len(lines) == 2, lines
    assert "the event name must be a non-empty str, got None" in lines[0]
    assert "uuid must be a UUID string, got 'abc'" in lines[1]


# -- 2. a snapshot at capture() ----------------------------------------------------------------


def test_properties_and_tags_changed_after_capture_are_not_what_is_sent(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    cart: dict[str, Any] = {"items": ["mug"]}
    plan = {"name": "pro", "seats": [1]}
    with task_scopes.new_context(fresh=True):
        task_scopes.tag("plan", plan)
        uid = client.capture("cart_viewed", properties={"cart": cart})
        cart["items"].append("tshirt")
        plan["seats"].append(2)
        plan["name"] = "free"
    assert client.flush(timeout=10) == 0
    [event] = server.wait_for(1)
    assert event["uuid"] == uid
    assert event["properties"]["cart"] == {"items": ["mug"]}
    assert event["properties"]["plan"] == {"name": "pro", "seats": [1]}


# -- 3. None for every event that is not sent ----------------------------------------------------


def test_capture_returns_none_for_events_it_cannot_send_and_a_uuid_for_those_it_sends(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    circular: dict[str, Any] = {}
    circular["self"] = circular
    assert client.capture("circular", properties={"loop": circular}) is None
    assert client.capture("huge", properties={"blob": "x" * (901 * 1024)}) is None
    kept = client.capture("fine", properties={"blob": "x" * (800 * 1024)})
    assert kept is not None
    assert client.flush(timeout=10) == 0
    assert [e["uuid"] for e in server.wait_for(1)] == [kept]
    assert client.stats().dropped == 2


def test_an_event_nested_deeper_than_posthog_accepts_is_refused_at_capture(
    server: CaptureServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    def nested(levels: int) -> Any:
        value: Any = "leaf"
        for _ in range(levels):
            value = [value]
        return value

    client = make_client()
    # the event object (1) and its properties (2) hold the value: 123 more levels fit
    fits = client.capture("deep", properties={"v": nested(123)})
    with caplog.at_level(logging.WARNING, logger="task_scopes"):
        assert client.capture("deeper", properties={"v": nested(124)}) is None
    assert fits is not None
    assert client.flush(timeout=10) == 0
    assert [e["uuid"] for e in server.wait_for(1)] == [fits]
    assert any("nested 126 levels deep" in line for line in _messages(caplog))


# -- 4. a tag with a key that is not a string -----------------------------------------------------


def test_a_tag_with_a_key_that_is_not_a_string_is_refused_naming_it_and_events_still_arrive(
    server: CaptureServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()
    with task_scopes.new_context(fresh=True), caplog.at_level(logging.WARNING):
        task_scopes.tag(("tenant", 7), "acme")  # type: ignore[arg-type]
        task_scopes.tag("plan", "pro")
        uid = client.capture("order")
    assert uid is not None
    assert client.flush(timeout=10) == 0
    [event] = server.wait_for(1)
    assert event["properties"]["plan"] == "pro"
    assert "('tenant', 7)" not in json.dumps(event)
    [line] = _messages(caplog)
    assert "tag(('tenant', 7), ...) was not set" in line


def test_a_key_json_cannot_write_set_on_a_scope_is_dropped_alone_from_the_event(
    server: CaptureServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()
    with task_scopes.isolation_scope() as scope, caplog.at_level(logging.WARNING):
        scope.set_tag(("tenant", 7), "acme")  # type: ignore[arg-type]
        scope.set_tag("plan", "pro")
        first = client.capture("first", properties={"n": {1: "one", None: "null", (2,): "x"}})
        second = client.capture("second", properties={"nan": float("nan")})
    assert None not in (first, second)
    assert client.flush(timeout=10) == 0
    events = {e["event"]: e for e in server.wait_for(2)}
    assert events["first"]["properties"]["plan"] == "pro"
    assert events["first"]["properties"]["n"] == {"1": "one", "null": "null"}
    assert events["second"]["properties"]["nan"] is None
    assert [k for k in events["second"]["properties"] if "tenant" in k] == []
    lines = [line for line in _messages(caplog) if "dropped the keys" in line]
    assert lines and "('tenant', 7)" in lines[0]


# -- 5. dataclasses, pydantic models and the rest of the conversion table --------------------------


@dataclasses.dataclass
class Address:
    city: str
    since: date


@dataclasses.dataclass
class Customer:
    name: str
    address: Address
    tags: frozenset[str]


class Plan(pydantic.BaseModel):
    name: str
    seats: int
    renews: datetime


class Tier(enum.Enum):
    GOLD = "gold"


class Duck:
    """Quacks like a pydantic v2 model without being one."""

    def model_dump(self) -> dict[str, Any]:
        return {"quack": Decimal("1.50")}


class Opaque:
    pass


def test_values_are_converted_as_the_readme_table_says(
    server: CaptureServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    when = datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    client = make_client()
    with caplog.at_level(logging.WARNING):
        uid = client.capture(
            "converted",
            properties={
                "customer": Customer("Ada", Address("Paris", date(2020, 1, 2)), frozenset("ba")),
                "plan": Plan(name="pro", seats=3, renews=when),
                "duck": Duck(),
                "tuple": (1, "a"),
                "set": {3, 1, 2},
                "decimal": Decimal("0.10"),
                "uuid": ident,
                "tier": Tier.GOLD,
                "when": when,
                "day": date(2024, 5, 1),
                "path": PurePosixPath("/srv/app.py"),
                "bytes": b"\x00\x01",
                "opaque": Opaque(),
                "mock": Mock(),  # answers model_dump() with another Mock
            },
        )
    assert uid is not None
    assert client.flush(timeout=10) == 0
    [event] = server.wait_for(1)
    props = event["properties"]
    assert props["customer"] == {
        "name": "Ada",
        "address": {"city": "Paris", "since": "2020-01-02"},
        "tags": ["a", "b"],
    }
    assert props["plan"] == {"name": "pro", "seats": 3, "renews": "2024-05-01T12:30:00+00:00"}
    assert props["duck"] == {"quack": "1.50"}
    assert props["tuple"] == [1, "a"]
    assert props["set"] == [1, 2, 3]
    assert props["decimal"] == "0.10"
    assert props["uuid"] == str(ident)
    assert props["tier"] == "gold"
    assert props["when"] == "2024-05-01T12:30:00+00:00"
    assert props["day"] == "2024-05-01"
    assert props["path"] == "/srv/app.py"
    assert props["bytes"] == "AAE="
    assert props["opaque"] is None
    assert props["mock"] is None
    assert any("type Opaque has no JSON form" in line for line in _messages(caplog))


# -- 6. a redirect is a failure -----------------------------------------------------------------


def test_a_redirect_answer_is_a_failure_logged_with_status_and_host_not_a_delivery(
    server: CaptureServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Reply(301, {"Location": server.url + "/moved/batch/"}))
    client = make_client()
    with caplog.at_level(logging.ERROR, logger="task_scopes"):
        client.capture("redirected")
        assert client.flush(timeout=10) == 1
    stats = client.stats()
    assert (stats.delivered, stats.failed) == (0, 1)
    assert [(path, status) for path, status, _ in server.requests] == [("/batch/", 301)]
    [line] = _messages(caplog)
    assert "answered 301" in line
    assert server.url in line  # the collector's origin
    assert "/moved/batch/" in line  # and where it points
    client.capture("after")
    assert client.flush(timeout=10) == 0
    assert [e["event"] for e in server.wait_for(1)] == ["after"]


# -- 7. events that go nowhere are announced -----------------------------------------------------


def test_capture_without_any_client_warns_once_per_process_with_what_to_do(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_client, "_unconfigured_warned", False, raising=False)
    assert task_scopes.get_client().disabled
    with caplog.at_level(logging.DEBUG, logger="task_scopes"):
        assert task_scopes.capture("lost") is None
        assert task_scopes.capture("lost again") is None
        Client(None).capture("also lost")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "task_scopes.init(api_key=" in warnings[0]
    assert "task_scopes_api_key" in warnings[0]


def test_a_client_disabled_on_purpose_does_not_warn(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_client, "_unconfigured_warned", False, raising=False)
    with caplog.at_level(logging.WARNING, logger="task_scopes"):
        assert Client("phc_test", disabled=True).capture("quiet") is None
    assert _messages(caplog) == []


# -- 8. exit says what it could not deliver, and why ---------------------------------------------


def _run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_exit_with_the_collector_down_warns_how_many_events_were_lost_and_why() -> None:
    with CaptureServer() as server:
        url = server.url
    # the port is closed now: connection refused
    result = _run_script(
        f"""
        import task_scopes
        task_scopes.init("phc_test", {url!r}, retry_window=0.5)
        task_scopes.capture("lost at exit")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "1 event not delivered to " + url in result.stderr
    assert "Connection refused" in result.stderr


def test_a_client_made_without_init_is_flushed_at_exit_too() -> None:
    with CaptureServer() as server:
        result = _run_script(
            f"""
            import task_scopes
            client = task_scopes.Client("phc_test", {server.url!r}, flush_interval=300)
            client.capture("sent at exit")
            """
        )
        assert result.returncode == 0, result.stderr
        assert [e["event"] for e in server.wait_for(1)] == ["sent at exit"]


# -- 9. logs blame the right party -----------------------------------------------------------


def test_capture_exception_of_something_not_an_exception_is_logged_as_the_callers_mistake(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture, production_guard: None
) -> None:
    client = make_client()
    with caplog.at_level(logging.WARNING, logger="task_scopes"):
        assert client.capture_exception("str") is None  # type: ignore[arg-type]
    [line] = _messages(caplog)
    assert "capture_exception() refused" in line
    assert "needs an exception, got str" in line


def test_before_send_raising_drops_that_event_logged_as_a_before_send_error(
    server: CaptureServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    def before_send(event: dict[str, Any]) -> dict[str, Any]:
        if event["event"] == "bad":
            raise KeyError("email")
        return event

    client = make_client(before_send=before_send)
    with caplog.at_level(logging.WARNING, logger="task_scopes"):
        assert client.capture("bad") is None
        kept = client.capture("good")
    assert client.flush(timeout=10) == 0
    assert [e["uuid"] for e in server.wait_for(1)] == [kept]
    [record] = [r for r in caplog.records if r.name == "task_scopes"]
    assert "before_send raised KeyError on event 'bad'" in record.getMessage()
    assert record.exc_info is not None  # with the traceback of the user's callback
    assert client.stats().dropped == 1


def test_a_before_send_that_breaks_the_event_gets_it_refused_not_sent(
    server: CaptureServer, make_client: MakeClient
) -> None:
    def before_send(event: dict[str, Any]) -> dict[str, Any]:
        event["distinct_id"] = ""
        return event

    client = make_client(before_send=before_send)
    assert client.capture("x") is None
    assert client.capture("y", properties={"ok": True}) is None
    assert client.flush(timeout=10) == 0
    assert server.requests == []


def test_transport_failures_name_their_cause_and_the_host_each_kind_logged_at_once(
    server: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    from task_scopes import HttpTransport

    transport = HttpTransport("phc_test", server.url, retry_window=0.3, backoff_factor=0.01)
    event = json.dumps(
        {"event": "e", "distinct_id": "u", "uuid": str(uuid.uuid4()), "properties": {}}
    )
    with caplog.at_level(logging.ERROR, logger="task_scopes"):
        server.stop()
        assert transport.send([event]) == 1  # connection refused
        server.start()
        server.script(Reply(200, delay=1.0), Reply(200, delay=1.0), Reply(200, delay=1.0))
        slow = HttpTransport(
            "phc_test", server.url, timeout=0.2, retry_window=0.3, backoff_factor=0.01
        )
        assert slow.send([event]) == 1  # read timeouts
        server.script(400)
        assert transport.send([event]) == 1  # within 30 s of the first failure
    lines = _messages(caplog)
    assert len(lines) == 3, lines
    refused, timed_out, rejected = lines
    assert "Connection refused" in refused and server.url in refused
    assert "Read timed out" in timed_out and server.url in timed_out
    assert "answered 400" in rejected and server.url in rejected
    assert "phc_test" not in " ".join(lines)


def test_a_different_problem_on_the_same_code_path_is_logged_at_once() -> None:
    log = _internal.RateLimitedLog(60.0)
    assert log.warning("task_scopes: failed: %s", "first", key="a")
    assert not log.warning("task_scopes: failed: %s", "first again", key="a")
    assert log.warning("task_scopes: failed: %s", "second", key="b")


def test_the_map_of_rate_limited_messages_is_bounded() -> None:
    log = _internal.RateLimitedLog(60.0, max_keys=3)
    for n in range(10):
        assert log.warning("task_scopes: %s", n, key=n)
    assert len(log._seen) == 3
    assert log.warning("task_scopes: %s", 0, key=0)  # forgotten, so logged again


# -- 10. an exception whose str() raises -------------------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def test_capture_exception_sends_an_exception_whose_str_raises_with_a_placeholder(
    server: CaptureServer, make_client: MakeClient
) -> None:
    client = make_client()
    try:
        raise Unprintable()
    except Unprintable as exc:
        uid = client.capture_exception(exc)
    assert uid is not None
    assert client.flush(timeout=10) == 0
    [event] = server.wait_for(1)
    assert event["properties"]["$exception_type"] == "Unprintable"
    assert event["properties"]["$exception_message"] == "<unprintable exception>"


def test_credentials_in_the_host_never_reach_a_log_line(
    server: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    from task_scopes import HttpTransport

    host = server.url.replace("http://", "http://user:hunter2@")
    transport = HttpTransport("phc_test", host)
    event = json.dumps({"event": "e", "distinct_id": "u", "properties": {}})
    server.script(400)
    with caplog.at_level(logging.ERROR, logger="task_scopes"):
        assert transport.send([event]) == 1
    [line] = _messages(caplog)
    assert server.url in line
    assert "hunter2" not in line and "user:" not in line


def test_groups_of_the_wrong_shape_are_refused_at_capture() -> None:
    with capture_events() as captured:
        assert task_scopes.capture("e", groups="acme") is None  # type: ignore[arg-type]
        assert task_scopes.capture("e", groups={"company": ["a"]}) is None  # type: ignore[dict-item]
        assert task_scopes.capture("e", groups={"company": 7}) is not None
    assert [e["properties"]["$groups"] for e in captured.events] == [{"company": 7}]
