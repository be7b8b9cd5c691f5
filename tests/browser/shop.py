"""The web app the browser tests drive: a Flask app behind task_scopes.wsgi.ContextMiddleware.

It serves, from one loopback port, the page that loads posthog-js (the full bundle, from
``node_modules``) and the endpoints the page calls. posthog-js's ``api_host`` is the test's
collector, on another port: another origin.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, request, send_file
from werkzeug.serving import make_server

import task_scopes
from task_scopes.wsgi import ContextMiddleware

API_KEY = "phc_test"
VIEW_EVENT = "browser.checkout"

PAGE = """<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>shop</title>
<script src="/posthog.js"></script>
<script>
  window.flagsLoaded = null;
  posthog.init(%(key)s, Object.assign(%(config)s, {
    loaded: function (ph) {
      ph.onFeatureFlags(function (flags, variants, context) {
        window.flagsLoaded = context || {errorsLoading: false};
      });
    }
  }));
</script>
</head>
<body><h1>shop</h1></body>
</html>
"""


@dataclass(frozen=True)
class Shop:
    """A running shop: its base URL (also the page's origin)."""

    url: str


def make_app(
    *,
    posthog_js: Path,
    config: dict[str, Any] | Callable[[str], dict[str, Any]],
    report: Any = None,
) -> Flask:
    """The shop.

    Args:
        posthog_js: the posthog-js bundle to serve at ``/posthog.js``.
        config: posthog-js's ``init`` options (JSON-able), or a function of the page's
            ``host:port`` returning them.
        report: the Celery task ``POST /checkout`` delays with the request's label; None
            answers 404 there.
    """
    app = Flask(__name__)

    @app.get("/")
    def page() -> Response:
        options = config(request.host) if callable(config) else config
        # "</" escaped: the JSON sits inside a <script> element.
        text = PAGE % {
            "key": json.dumps(API_KEY),
            "config": json.dumps(options).replace("</", "<\\/"),
        }
        return Response(text, mimetype="text/html")

    @app.get("/posthog.js")
    def bundle() -> Response:
        return send_file(posthog_js, mimetype="application/javascript")

    @app.post("/checkout")
    def checkout() -> tuple[dict[str, Any], int]:
        if report is None:
            return {"error": "no task"}, 404
        label = request.get_json()["label"]
        task_scopes.capture(VIEW_EVENT, properties={"label": label})
        return {"task_id": report.delay(label).id}, 202

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        return {
            "distinct_id": task_scopes.get_context_distinct_id(),
            "session_id": task_scopes.get_context_session_id(),
            "window_id": task_scopes.get_isolation_scope().window_id,
        }

    app.wsgi_app = ContextMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app


@contextmanager
def serve(app: Flask) -> Iterator[Shop]:
    """Serve ``app`` on a free port of 127.0.0.1 (threaded) until the block ends."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Shop(f"http://127.0.0.1:{server.port}")
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
