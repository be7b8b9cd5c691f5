"""kombu's ``filesystem://`` transport, with each message written atomically.

kombu 5.7's filesystem channel creates a message file under its final name and writes it
afterwards. A consumer polling the folder can move the file away in between and read it
empty: the message is lost and the consumer fails with ``JSONDecodeError: Expecting value:
line 1 column 1 (char 0)`` (the symptom of kombu#1551). Two producers and one consumer on
one folder lose several messages per thousand here. Writing under a name the consumer
skips and renaming it into place (atomic within one folder on POSIX) closes that window.

Only the demo's default broker uses this (``broker_transport`` in :mod:`example_worker.app`);
a real deployment uses Redis or RabbitMQ.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

__all__ = ["Channel", "Transport"]


class Channel(filesystem.Channel):
    """The filesystem channel whose ``_put`` renames a complete file into place."""

    # kombu names this argument "payload" here and "message" in AbstractChannel.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # Same name as kombu's, so its consumers (and ours) read it unchanged.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".part"  # "<queue>.msg.part": kombu's _get skips it
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))  # type: ignore[no-untyped-call]
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """``filesystem://`` with :class:`Channel`."""

    Channel = Channel
