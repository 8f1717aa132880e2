"""Logs are JSON lines with stable event names, and a secret never reaches a line."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from daemon import logs


def test_json_lines_carry_event_level_timestamp_and_context() -> None:
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out)
    logs.get_logger(run_id="r1").info("user_synced", user_id=7, duration_ms=12)
    line = json.loads(out.getvalue())
    assert line["event"] == "user_synced"
    assert line["level"] == "info"
    assert line["run_id"] == "r1"
    assert line["user_id"] == 7
    assert line["timestamp"].endswith("Z")


def test_a_secret_inside_any_field_is_redacted() -> None:
    out = io.StringIO()
    logs.configure("INFO", "json", secrets=["tok-123-secret"], stream=out)
    logs.get_logger().warning("backend_echo", error="Bearer tok-123-secret was refused")
    assert "tok-123-secret" not in out.getvalue()
    assert "<redacted>" in out.getvalue()


def test_level_filter_drops_debug_lines() -> None:
    out = io.StringIO()
    logs.configure("WARNING", "json", stream=out)
    logs.get_logger().info("quiet")
    logs.get_logger().warning("loud")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["loud"]


def teardown_function() -> None:
    structlog.reset_defaults()


def test_a_library_warning_is_a_log_line_on_stdout_not_text_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """psycopg's "error ignored terminating <Pipeline>" once broke the one-line stderr."""
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out)
    logging.getLogger("psycopg").warning("error ignored terminating %s", "<Pipeline>")
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert (line["event"], line["component"], line["message"], line["level"]) == (
        "library_warning",
        "psycopg",
        "error ignored terminating <Pipeline>",
        "warning",
    )
    assert capsys.readouterr().err == ""
