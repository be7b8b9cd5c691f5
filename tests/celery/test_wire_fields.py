"""Tier 1: the header fields added after the first release (``g`` groups, ``p`` publish
time), the version rule that lets them be added, and which routing names a queue."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery
from celery.app.task import Context
from kombu import Exchange, Queue, binding

from task_scopes.celery._header import (
    Limits,
    WireContext,
    WireError,
    clean_groups,
    decode,
    encode,
    sign,
)
from task_scopes.celery._request import task_tags

# -- groups and publish time --------------------------------------------------------------


def test_groups_and_publish_time_round_trip() -> None:
    header, dropped = encode(
        "u", "s", {"plan": "pro"}, groups={"company": "acme", "team": 7}, published_ms=1_700
    )
    assert dropped == []
    assert json.loads(header) == {
        "v": 1,
        "d": "u",
        "s": "s",
        "t": {"plan": "pro"},
        "g": {"company": "acme", "team": 7},
        "p": 1_700,
    }
    assert decode(header) == WireContext(
        "u", "s", {"plan": "pro"}, groups={"company": "acme", "team": 7}, published_ms=1_700
    )


def test_the_signature_covers_groups_and_publish_time() -> None:
    header, _ = encode("u", None, {}, groups={"company": "acme"}, published_ms=5)
    forged = header.replace("acme", "evil")
    with pytest.raises(WireError, match="signature"):
        decode(forged, sign(header, "k"), "k")
    assert decode(header, sign(header, "k"), "k").groups == {"company": "acme"}


def test_groups_over_a_cap_or_of_a_wrong_type_are_dropped_and_named_never_cut() -> None:
    limits = Limits(max_key_chars=10, max_value_chars=5)
    kept, dropped = clean_groups(
        {
            "company": "acme",
            "long_group_type": "x",
            "team": "toolong",
            "flag": True,
            "empty": "",
            "ctl\x00": "a\x01b",
            3: "three",
        },
        limits,
    )
    assert kept == {"company": "acme", "ctl": "ab"}
    assert sorted(dropped) == sorted(
        ["$groups.long_group_type", "$groups.team", "$groups.flag", "$groups.empty", "$groups.3"]
    )


def test_over_the_byte_cap_tags_go_first_then_groups_then_the_ids() -> None:
    groups = {"company": "c" * 900}
    header, dropped = encode(
        "u" * 40, None, {"t": "x" * 900}, Limits(max_bytes=1000), groups=groups
    )
    assert dropped == ["t"]
    assert json.loads(header)["g"] == groups
    header, dropped = encode("u" * 40, None, {"t": "x" * 900}, Limits(max_bytes=400), groups=groups)
    assert dropped == ["t", "$groups"]
    assert json.loads(header) == {"v": 1, "d": "u" * 40}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("g", ["acme"], "groups are not an object"),
        ("p", "1700", "publish time is not a number"),
        ("p", True, "publish time is not a number"),
        ("p", 1e400, "publish time is not a number"),
    ],
)
def test_a_new_field_of_the_wrong_type_refuses_the_header(
    field: str, value: Any, message: str
) -> None:
    header = json.dumps({"v": 1, "d": "u", field: value})
    with pytest.raises(WireError, match=message):
        decode(header)


def test_invalid_groups_in_a_valid_object_are_dropped_on_receive() -> None:
    header = json.dumps({"v": 1, "g": {"company": "acme", "team": {"nested": 1}}})
    assert decode(header).groups == {"company": "acme"}


# -- the version rule ----------------------------------------------------------------------


def test_a_worker_ignores_fields_it_does_not_know() -> None:
    header = json.dumps({"v": 1, "d": "u", "future": {"x": 1}, "x2": "later-field"})
    assert decode(header) == WireContext("u", None, {})


def test_a_worker_accepts_a_header_of_an_older_producer_without_the_new_fields() -> None:
    context = decode('{"d":"u","s":"s","t":{"plan":"pro"},"v":1}')
    assert context == WireContext("u", "s", {"plan": "pro"})
    assert (context.groups, context.published_ms) == (None, None)


# -- celery_queue: only when the routing names the queue -----------------------------------


@pytest.fixture
def routed_app() -> Celery:
    app = Celery("routes", broker="memory://", set_as_current=False)
    direct, topic = Exchange("orders_x", "direct"), Exchange("events_x", "topic")
    app.conf.task_queues = [
        Queue("orders", direct, routing_key="orders.new"),
        Queue("events", topic, routing_key="events.#"),
        Queue("audit_a", Exchange("audit_x"), routing_key="audit"),
        Queue("audit_b", Exchange("audit_x"), routing_key="audit"),
        Queue("bound", bindings=[binding(Exchange("bound_x"), routing_key="bound.rk")]),
    ]

    @app.task(name="routes.work", shared=False)
    def work() -> None:
        """Never run: only its request is read."""

    return app


@pytest.mark.parametrize(
    ("delivery_info", "queue"),
    [
        ({"exchange": "", "routing_key": "emails"}, "emails"),  # default exchange
        ({"exchange": "orders_x", "routing_key": "orders.new"}, "orders"),  # declared binding
        ({"exchange": "events_x", "routing_key": "events.created"}, None),  # topic pattern
        ({"exchange": "bound_x", "routing_key": "bound.rk"}, "bound"),  # one of its bindings
        ({"exchange": "audit_x", "routing_key": "audit"}, None),  # two queues: ambiguous
        ({"exchange": "other_x", "routing_key": "orders"}, None),  # a routing key, not a queue
        ({"exchange": None, "routing_key": "orders"}, None),  # eager, exchange not given
        ({"exchange": "", "routing_key": None}, None),
    ],
)
def test_celery_queue_is_set_only_when_the_routing_names_the_queue(
    routed_app: Celery, delivery_info: dict[str, Any], queue: str | None
) -> None:
    request = Context(id="id-1", delivery_info=delivery_info)
    tags = task_tags(routed_app.tasks["routes.work"], request, {})
    assert tags.get("celery_queue") == queue
