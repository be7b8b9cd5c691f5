"""What posthog-js needs from the loopback collector besides taking events.

posthog-js given the collector as ``api_host`` from a page on another origin needs:

* **CORS** for that origin. Preflights (``OPTIONS``) are answered and
  ``Access-Control-Allow-Origin`` is sent for loopback origins only (``localhost`` and its
  subdomains, ``127.0.0.0/8``, ``[::1]``; any scheme of http/https, any port), so a page
  elsewhere on the web cannot write into a developer's collector through their browser.
* **Remote config and flags**, answered as for a project with nothing configured:
  ``GET /array/<key>/config`` (JSON), ``GET /array/<key>/config.js`` (the script form, which
  sets ``window._POSTHOG_REMOTE_CONFIG[key]``), ``POST /flags/?v=2`` (no flags) and the
  legacy ``/decide/``: no feature flags, no surveys, no session recording, no site apps.
* **Its body encodings** on ``/e/`` and ``/i/v0/e/``: gzip sent as ``text/plain`` (no query
  parameter from posthog-js 1.449; ``?compression=gzip-js`` from older releases), a form
  ``data=<base64 of the JSON>`` with ``?compression=base64`` (its ``sendBeacon`` path on page
  exit), and plain JSON. posthog-js no longer sends ``lz64``; it is refused like any other
  unknown compression.
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
import json
import re
import uuid
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "FLAGS_PATHS",
    "answer_flags",
    "answer_get",
    "cors_headers",
    "decode_body",
    "decompress",
    "is_loopback_origin",
    "preflight_headers",
    "remote_config",
]

GZIP_MAGIC = b"\x1f\x8b"
FLAGS_PATHS = ("/flags", "/flags/", "/decide", "/decide/")
# A project API key as posthog-js puts it in the path (phc_..., or a test key).
_CONFIG_PATH = re.compile(r"^/array/([A-Za-z0-9_-]{1,200})/config(\.js)?/?$")
# RFC 9110: a comma-separated list of header field names.
_HEADER_LIST = re.compile(
    r"^\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+(\s*,\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*\s*$"
)
_FORM = "application/x-www-form-urlencoded"


# -- CORS ---------------------------------------------------------------------------------


def is_loopback_origin(origin: str | None, *, absent: bool = False) -> bool:
    """True for an ``Origin`` header naming a page served from this machine over http(s).

    Args:
        absent: what to answer when there is no ``Origin`` header (not a browser's
            cross-origin request).
    """
    if origin is None:
        return absent
    if not origin:
        return False
    try:
        parts = urlsplit(origin)
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError on a port that is not a number
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or host is None or parts.path or parts.query:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cors_headers(origin: str | None) -> dict[str, str]:
    """Headers that let a loopback page read the answer (none for other origins).

    ``Retry-After`` is exposed: posthog-js reads it to back off after a 429 or 503.
    """
    if not is_loopback_origin(origin):
        return {"Vary": "Origin"} if origin else {}
    assert origin is not None
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": "Retry-After",
        "Vary": "Origin",
    }


def preflight_headers(origin: str | None, requested_headers: str | None) -> dict[str, str] | None:
    """The answer headers of a CORS preflight from ``origin``; None refuses it.

    Args:
        origin: the ``Origin`` header.
        requested_headers: the ``Access-Control-Request-Headers`` header (posthog-js asks
            for ``Content-Type`` when it sends JSON, and for the app's ``request_headers``).
    """
    if not is_loopback_origin(origin):
        return None
    headers = cors_headers(origin)
    headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    if requested_headers and _HEADER_LIST.match(requested_headers):
        headers["Access-Control-Allow-Headers"] = requested_headers
    headers["Access-Control-Max-Age"] = "600"
    return headers


# -- remote config and flags --------------------------------------------------------------


def remote_config(token: str | None) -> dict[str, Any]:
    """The remote config of a project with nothing turned on, in PostHog's shape.

    ``hasFeatureFlags`` is true so that posthog-js asks ``/flags/`` and the app's
    ``onFeatureFlags`` callbacks run (with no flags), as they would against PostHog.
    ``analytics.endpoint`` is PostHog's own answer: posthog-js then sends to ``/i/v0/e/``.
    """
    config: dict[str, Any] = {} if token is None else {"token": token}
    config.update(
        {
            "supportedCompression": ["gzip", "gzip-js"],
            "hasFeatureFlags": True,
            "captureDeadClicks": False,
            "capturePerformance": False,
            "autocapture_opt_out": False,
            "autocaptureExceptions": False,
            "analytics": {"endpoint": "/i/v0/e/"},
            "elementsChainAsString": True,
            "errorTracking": {"autocaptureExceptions": False, "suppressionRules": []},
            "sessionRecording": False,
            "heatmaps": False,
            "surveys": False,
            "productTours": False,
            "conversations": False,
            "defaultIdentifiedOnly": True,
            "siteApps": [],
        }
    )
    return config


def answer_get(path: str) -> tuple[str, bytes] | None:
    """``(content_type, body)`` of a remote config ``GET``, or None for another path."""
    match = _CONFIG_PATH.match(path)
    if match is None:
        return None
    token, script = match.group(1), match.group(2)
    config = json.dumps(remote_config(token))
    if not script:
        return "application/json", config.encode()
    # json.dumps escapes quotes, backslashes and U+2028/9: the key cannot break out.
    key = json.dumps(token)
    text = (
        "(function(){window._POSTHOG_REMOTE_CONFIG=window._POSTHOG_REMOTE_CONFIG||{};"
        f"window._POSTHOG_REMOTE_CONFIG[{key}]={{config:{config},siteApps:[]}};}})();"
    )
    return "application/javascript", text.encode()


def answer_flags(path: str, query: Mapping[str, list[str]]) -> dict[str, Any]:
    """The ``/flags/`` (``v=2``: ``flags``) or legacy (``/decide/``, ``/flags/`` without
    ``v=2``: ``featureFlags``) answer: no flags, nothing failed."""
    answer: dict[str, Any] = {
        "errorsWhileComputingFlags": False,
        "quotaLimited": [],
        "requestId": str(uuid.uuid4()),
    }
    if path.startswith("/flags") and query.get("v", [""])[-1] not in ("", "1"):
        answer["flags"] = {}
        return answer
    answer.update(remote_config(None))
    answer.update(
        {
            "featureFlags": {},
            "featureFlagPayloads": {},
            "config": {"enable_collect_everything": True},
            "editorParams": {},
            "toolbarParams": {},
            "isAuthenticated": False,
        }
    )
    return answer


# -- request bodies -----------------------------------------------------------------------


def decompress(body: bytes, content_encoding: str | None) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate; gzip also when only its magic bytes say so).

    Raises:
        ValueError: another encoding. OSError / EOFError / zlib.error: a broken stream.
    """
    if content_encoding == "gzip" or body[:2] == GZIP_MAGIC:
        return gzip.decompress(body)
    if content_encoding == "deflate":
        return zlib.decompress(body)
    if content_encoding not in (None, "", "identity"):
        raise ValueError(f"unsupported Content-Encoding {content_encoding!r}")
    return body


def decode_body(
    body: bytes,
    *,
    content_encoding: str | None = None,
    content_type: str | None = None,
    compression: str | None = None,
) -> bytes:
    """The JSON text of a capture request body, whichever way a PostHog SDK encoded it.

    Args:
        body: the request body as received.
        content_encoding: the ``Content-Encoding`` header.
        content_type: the ``Content-Type`` header (a form is read for its ``data`` field).
        compression: the ``compression`` query parameter (``gzip-js``, ``gzip``,
            ``base64``), or None.

    Raises:
        ValueError: an unknown compression or encoding, a body that is not what its
            compression says, a form without exactly one ``data`` field.
        OSError / EOFError / zlib.error: a broken gzip or deflate stream.
    """
    if compression in ("gzip-js", "gzip"):
        if body[:2] != GZIP_MAGIC:
            raise ValueError(f"compression={compression} but the body is not gzip")
        return gzip.decompress(body)
    if compression == "base64":
        return base64.b64decode(_form_data(body), validate=True)
    if compression:
        raise ValueError(f"unsupported compression {compression!r}")
    data = decompress(body, content_encoding)
    if (content_type or "").split(";", 1)[0].strip().lower() == _FORM:
        return _form_data(data).encode()
    return data


def _form_data(body: bytes) -> str:
    fields = parse_qs(body.decode("ascii"), strict_parsing=True, errors="strict", max_num_fields=16)
    values = fields.get("data", [])
    if len(values) != 1:
        raise ValueError("form body without exactly one 'data' field")
    return values[0]
