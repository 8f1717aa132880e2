"""The short form of a log record that people read: who, outcome, status, duration."""

from __future__ import annotations

from daemon import logline

RUN_ID = "0123456789abcdef0123456789abcdef"


def _synced(**extra: object) -> dict[str, object]:
    return {
        "run_id": RUN_ID,
        "user_id": 7,
        "attempt": 1,
        "status": 200,
        "duration_ms": 12,
        "result": {"emails": 3, "folders": 2},
        "event": "user_synced",
        "level": "info",
        "timestamp": "2026-12-01T12:48:18.123456Z",
        **extra,
    }


def test_a_synced_user_reads_as_who_status_and_duration_with_a_short_run_id() -> None:
    assert logline.for_people(_synced()) == {
        "timestamp": "2026-12-01 12:48:18",
        "level": "info",
        "event": "user_synced",
        "user_id": 7,
        "status": 200,
        "duration_ms": 12,
        "run_id": "01234567",
    }


def test_a_user_that_needed_retries_says_how_many_attempts() -> None:
    assert logline.for_people(_synced(attempt=3))["attempts"] == 3


def test_a_failed_user_keeps_its_error_on_one_shortened_line() -> None:
    record = _synced(event="user_sync_failed", status=503, error="HTTP 503\n" + "x" * 500)
    shown = logline.for_people(record)
    assert list(shown) == [
        *("timestamp", "level", "event", "user_id", "status", "duration_ms", "error", "run_id")
    ]
    assert shown["error"].startswith("HTTP 503 xxx")
    assert len(shown["error"]) == logline.ERROR_CHARS
    assert shown["error"].endswith("…")


def test_a_user_skipped_by_an_open_circuit_says_why_and_a_failed_probe_how_long_it_waits() -> None:
    skipped = logline.for_people(
        _synced(
            event="user_sync_skipped",
            attempt=0,
            status=None,
            duration_ms=0,
            reason="circuit open, probe in 60 s",
        )
    )
    assert skipped["user_id"] == 7 and skipped["reason"] == "circuit open, probe in 60 s"
    assert "result" not in skipped
    probe = logline.for_people(
        _synced(event="user_sync_failed", status=500, circuit_probe=True, held_s=120, detail="x")
    )
    assert probe["held_s"] == 120 and "detail" not in probe


def test_other_events_keep_every_field_with_the_run_id_shortened_and_last() -> None:
    record = {
        "run_id": RUN_ID,
        "event": "cycle_finished",
        "level": "info",
        "outcome": "succeeded",
        "succeeded": 10,
        "failed": 0,
    }
    shown = logline.for_people(record)
    assert list(shown) == ["level", "event", "outcome", "succeeded", "failed", "run_id"]
    assert shown["run_id"] == "01234567"


def test_the_record_itself_is_left_as_it_was() -> None:
    record = _synced()
    logline.for_people(record)
    assert record == _synced()


def test_values_it_does_not_recognise_are_shown_as_they_are() -> None:
    assert logline.short_run_id(42) == 42
    assert logline.short_run_id("cleanup") == "cleanup"
    assert logline.short_time("yesterday") == "yesterday"
    assert logline.short_error(None) is None
