"""Every default in one place: the client, the transport, the Celery plugin and the README
tables read these names; nothing re-types a number.

Units: seconds (float) for times, events for counts, bytes and characters for caps.
"""

from __future__ import annotations

__all__ = [
    "FLUSH_AT",
    "FLUSH_INTERVAL",
    "HOST",
    "MAX_BATCH_BYTES",
    "MAX_EVENT_BYTES",
    "MAX_EVENT_NESTING",
    "MAX_HEADER_BYTES",
    "MAX_KEY_CHARS",
    "MAX_QUEUE_SIZE",
    "MAX_TAGS",
    "MAX_VALUE_CHARS",
    "RETRY_BACKOFF_MAX",
    "RETRY_WINDOW",
    "SHUTDOWN_TIMEOUT",
    "TIMEOUT",
]

# -- client and transport ------------------------------------------------------------------
HOST = "https://us.i.posthog.com"
FLUSH_AT = 100  # events that wake the consumer
FLUSH_INTERVAL = 0.5  # seconds a partial batch may wait
MAX_QUEUE_SIZE = 10_000  # events held in memory per client and process
TIMEOUT = 10.0  # seconds per HTTP attempt (connect, and each read)
RETRY_WINDOW = 30.0  # seconds a failing batch is retried before it is given up
RETRY_BACKOFF_MAX = 4.0  # seconds: the longest wait between two attempts
SHUTDOWN_TIMEOUT = 10.0  # seconds: bound of every exit flush
MAX_EVENT_BYTES = 900 * 1024  # one serialized event
# arrays/objects nested in one event's JSON, the event object included: PostHog's JSON
# parser refuses a request nested deeper than 127, and a /batch/ body adds two levels
MAX_EVENT_NESTING = 125
MAX_BATCH_BYTES = 5 * 1024 * 1024  # one request body before gzip

# -- the Celery context header ---------------------------------------------------------------
MAX_HEADER_BYTES = 8192  # the encoded context
MAX_TAGS = 64  # propagated tags
MAX_KEY_CHARS = 200  # a longer tag key is not propagated
MAX_VALUE_CHARS = 1000  # a longer string tag is not propagated; nested strings are cut
