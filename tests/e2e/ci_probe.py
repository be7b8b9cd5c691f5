"""Run only by test_ci.py, in a pytest subprocess pointed at unreachable brokers.

Not collected on its own (the name does not match ``test_*.py``).
"""

from __future__ import annotations


def test_needs_redis(redis_url: str) -> None:
    assert redis_url


def test_needs_rabbitmq(amqp_url: str) -> None:
    assert amqp_url
