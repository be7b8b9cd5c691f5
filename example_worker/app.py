"""The shop's Celery app, configured the way we recommend: settings in ``app.conf``, then
``task_scopes.celery.install(app)`` in the module that defines the app, so the web process
(producer) and the worker both run it.

Run a worker yourself with ``celery -A example_worker.app worker``. Its configuration comes
from the environment (``python -m example_worker`` sets these for the worker it starts):

=========================  ==========================  ========================================
variable                   default                     meaning
=========================  ==========================  ========================================
``SHOP_BROKER_URL``        ``redis://127.0.0.1:6379/0``  Celery broker
``SHOP_BROKER_FOLDER``     unset                       for ``filesystem://``: an absolute
                                                       folder holding ``data/`` and ``control/``
``SHOP_RESULT_BACKEND``    unset (no backend)          needed by the chord, e.g. ``redis://...``
                                                       or ``file:///abs/folder``
``SHOP_QUEUE``             ``shop``                    queue every task is sent to
``SHOP_POSTHOG_API_KEY``   unset (client disabled)     ``task_scopes_api_key``
``SHOP_POSTHOG_HOST``      PostHog US cloud            ``task_scopes_host``
=========================  ==========================  ========================================
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

import task_scopes
import task_scopes.celery

app = Celery("shop", include=["example_worker.tasks"])


def _filesystem_options(folder: str) -> dict[str, object]:
    """kombu's ``filesystem://`` transport between processes: producer and worker must use
    the same absolute folders, created beforehand (kombu does not create ``data``)."""
    root = Path(folder)
    data, control = root / "data", root / "control"
    data.mkdir(parents=True, exist_ok=True)
    control.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(data),
        "data_folder_out": str(data),
        "control_folder": str(control),
        # The virtual transports poll; kombu's default is once a second per queue.
        "polling_interval": 0.1,
    }


broker_url = os.environ.get("SHOP_BROKER_URL", "redis://127.0.0.1:6379/0")
queue = os.environ.get("SHOP_QUEUE", "shop")
app.conf.update(
    broker_url=broker_url,
    broker_connection_retry_on_startup=True,
    result_backend=os.environ.get("SHOP_RESULT_BACKEND") or None,
    result_expires=3600,
    task_default_queue=queue,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)
if broker_url.startswith("filesystem://") and os.environ.get("SHOP_BROKER_FOLDER"):
    app.conf.broker_transport_options = _filesystem_options(os.environ["SHOP_BROKER_FOLDER"])
    # kombu's own filesystem transport can lose a message to a consumer polling the
    # folder while it is being written: see example_worker/_filesystem.py.
    app.conf.broker_transport = "example_worker._filesystem:Transport"

# task_scopes: init() makes the process's client (the web views' events go to it);
# install() reads every task_scopes_* key once and binds the app's client to each task
# run: with the same key and host it is init()'s client. See `task_scopes.celery`.
api_key = os.environ.get("SHOP_POSTHOG_API_KEY") or None
host = os.environ.get("SHOP_POSTHOG_HOST", "https://us.i.posthog.com")
task_scopes.init(api_key, host)
app.conf.task_scopes_api_key = api_key
app.conf.task_scopes_host = host
task_scopes.celery.install(app)
