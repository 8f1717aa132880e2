"""Logs are JSON lines with stable event names, and a secret never reaches a line."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime

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


RUN_ID = "0123456789abcdef0123456789abcdef"


def _one_user_synced(fmt: str) -> str:
    out = io.StringIO()
    logs.configure("INFO", fmt, stream=out)
    logs.get_logger(run_id=RUN_ID).info(
        "user_synced", user_id=7, attempt=1, status=200, duration_ms=12, result={"emails": 3}
    )
    return out.getvalue()


def test_the_console_line_shows_a_short_run_id_and_the_users_result_in_brief() -> None:
    line = _one_user_synced("console")
    assert RUN_ID not in line
    assert "run_id=01234567" in line
    assert "user_synced" in line
    assert "user_id=7 status=200 duration_ms=12" in line
    assert "emails" not in line and "attempt" not in line
    assert "\x1b[" not in line  # no colours: not a terminal


def test_the_json_line_keeps_every_field_under_its_own_name() -> None:
    line = json.loads(_one_user_synced("json"))
    assert {k: v for k, v in line.items() if k != "timestamp"} == {
        "run_id": RUN_ID,
        "user_id": 7,
        "attempt": 1,
        "status": 200,
        "duration_ms": 12,
        "result": {"emails": 3},
        "event": "user_synced",
        "level": "info",
    }


def test_the_console_still_prints_a_traceback() -> None:
    out = io.StringIO()
    logs.configure("INFO", "console", stream=out)
    try:
        raise ValueError("boom")
    except ValueError as exc:
        logs.get_logger(run_id=RUN_ID).error("cycle_crashed", error=repr(exc), exc_info=exc)
    assert "ValueError: boom" in out.getvalue()
    assert "Traceback" in out.getvalue()


def test_a_json_line_is_what_structlogs_own_processor_chain_renders() -> None:
    """Same keys in the same order, tracebacks as dicts, bound contextvars merged."""
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out)
    chain = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.dict_tracebacks,
        structlog.processors.JSONRenderer(),
    ]
    structlog.contextvars.bind_contextvars(instance="host-1")
    try:
        logs.get_logger(run_id="r1").info("user_synced", user_id=7, result={"n": 1})
        try:
            raise ValueError("boom")
        except ValueError:
            logs.get_logger(run_id="r1").warn("user_sync_failed", user_id=8, exc_info=True)
            expected_failure = _render(chain, "warn", "user_sync_failed", user_id=8, exc_info=True)
        expected_success = _render(chain, "info", "user_synced", user_id=7, result={"n": 1})
    finally:
        structlog.contextvars.clear_contextvars()
    got = [json.loads(x) for x in out.getvalue().splitlines()]
    want = [json.loads(expected_success), json.loads(expected_failure)]
    for line, expected in zip(got, want, strict=True):
        assert list(line) == list(expected)
        line.pop("timestamp"), expected.pop("timestamp")
        assert line == expected


def _render(chain: list, method: str, event: str, **fields: object) -> str:
    event_dict: dict = {"run_id": "r1", **fields, "event": event}
    for processor in chain:
        event_dict = processor(None, method, event_dict)
    return str(event_dict)


def _json_lines(**fields: object) -> list[dict[str, object]]:
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out)
    logs.get_logger(run_id=RUN_ID).warning("user_sync_failed", **fields)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_json_line_is_plain_ascii_whatever_text_it_carries() -> None:
    """A stdout whose encoding is not UTF-8 must never fail on a backend's message."""
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out)
    logs.get_logger(run_id=RUN_ID).warning("user_sync_failed", error="déjà vu \u2603 \ud800")
    text = out.getvalue()
    assert text.isascii()
    assert json.loads(text)["error"] == "déjà vu \u2603 \ud800"


def test_values_json_cannot_encode_natively_are_logged_as_before() -> None:
    """Integers past 64 bits, non-string keys, datetimes: the same as the json module's."""
    when = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    (line,) = _json_lines(user_id=2**70, result={1: 2}, at=when)
    assert line["user_id"] == 2**70
    assert line["result"] == {"1": 2}
    assert line["at"] == repr(when)


def test_a_secret_in_a_json_line_is_redacted() -> None:
    out = io.StringIO()
    logs.configure("INFO", "json", secrets=["s3cret-token"], stream=out)
    logs.get_logger(run_id=RUN_ID).warning("user_sync_failed", error="echo: s3cret-token")
    assert "s3cret-token" not in out.getvalue()
    assert json.loads(out.getvalue())["error"] == "echo: <redacted>"
