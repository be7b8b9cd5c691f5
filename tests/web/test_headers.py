"""Pure functions of the shared web layer: header cleaning and option validation."""

from __future__ import annotations

import pytest

from task_scopes._web import MAX_ID_CHARS, WebOptions, clean_header_value


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("user-1", "user-1"),
        (b"user-1", "user-1"),
        ("  user-1\t", "user-1"),
        ("us\x00er\x1b[31m-1\x7f", "user[31m-1"),
        ("user\x85-1\x9f", "user-1"),  # C1 controls as a WSGI latin-1 str
        ("user\r\n-1", "user-1"),
        ("user\ud800-1", "user-1"),  # a lone surrogate cannot be sent on as UTF-8
        ("jürgen-例", "jürgen-例"),  # a str that is already text, not latin-1 bytes
        ("\x00\x01 \x02", None),
        ("", None),
        (None, None),
    ],
)
def test_clean_header_value_strips_control_characters(
    raw: str | bytes | None, expected: str | None
) -> None:
    assert clean_header_value(raw) == expected


def test_clean_header_value_caps_length() -> None:
    assert clean_header_value("x" * 10_000) == "x" * MAX_ID_CHARS
    assert clean_header_value("y" * 50, max_chars=10) == "y" * 10


def test_clean_header_value_decodes_utf8_from_bytes_and_from_latin1_str() -> None:
    encoded = "jürgen@例え.jp".encode()
    assert clean_header_value(encoded) == "jürgen@例え.jp"
    # PEP 3333: WSGI servers hand header bytes over as a latin-1 str.
    assert clean_header_value(encoded.decode("latin-1")) == "jürgen@例え.jp"
    # Not UTF-8: read as latin-1 rather than dropped.
    assert clean_header_value(b"caf\xe9") == "café"


def test_options_reject_invalid_header_name_naming_the_option() -> None:
    with pytest.raises(ValueError, match="distinct_id_header"):
        WebOptions.build(distinct_id_header="X Bad Header")
    with pytest.raises(ValueError, match="TASK_SCOPES_SESSION_ID_HEADER"):
        WebOptions.build(
            session_id_header="", names={"session_id_header": "TASK_SCOPES_SESSION_ID_HEADER"}
        )


def test_options_reject_invalid_window_id_header_naming_the_option() -> None:
    with pytest.raises(ValueError, match="TASK_SCOPES_WINDOW_ID_HEADER"):
        WebOptions.build(
            window_id_header="X:Window", names={"window_id_header": "TASK_SCOPES_WINDOW_ID_HEADER"}
        )


def test_options_reject_non_bool_switch_and_non_callable_tags() -> None:
    with pytest.raises(TypeError, match="capture_exceptions"):
        WebOptions.build(capture_exceptions="yes")
    with pytest.raises(TypeError, match="extra_tags"):
        WebOptions.build(extra_tags={"tenant": "a"})


def test_options_defaults_are_posthogs_tracing_headers() -> None:
    options = WebOptions.build()
    assert options.distinct_id_header == "X-POSTHOG-DISTINCT-ID"
    assert options.session_id_header == "X-POSTHOG-SESSION-ID"
    assert options.window_id_header == "X-POSTHOG-WINDOW-ID"
    assert options.capture_exceptions is True
    assert options.extra_tags is None
