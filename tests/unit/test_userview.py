"""One user's state, decided from facts, and how `status --user` and `retry` word it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from daemon import retry, userview
from daemon.userview import State, state_of

NOW = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def _facts(**changed: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "in_users_table": True,
        "lease_live": False,
        "failures": 0,
        "quarantine_after": 10,
        "backing_off": False,
        "stale": True,
    }
    return facts | changed


def test_a_stale_user_without_history_is_due_and_a_recent_one_fresh() -> None:
    assert state_of(**_facts()) is State.DUE
    assert state_of(**_facts(stale=False)) is State.FRESH


def test_a_live_lease_wins_over_quarantine_and_backoff() -> None:
    assert state_of(**_facts(lease_live=True, failures=12, backing_off=True)) is State.LEASED


def test_quarantine_starts_at_the_threshold_and_wins_over_backoff() -> None:
    assert state_of(**_facts(failures=9, backing_off=True)) is State.BACKOFF
    assert state_of(**_facts(failures=10, backing_off=True)) is State.QUARANTINED
    assert state_of(**_facts(failures=10, backing_off=False)) is State.QUARANTINED


def test_a_failing_user_whose_backoff_is_over_is_due_again() -> None:
    assert state_of(**_facts(failures=3, backing_off=False)) is State.DUE


def test_an_id_missing_from_the_users_table_is_unknown_whatever_its_state_row_says() -> None:
    assert state_of(**_facts(in_users_table=False, lease_live=True)) is State.UNKNOWN


def _quarantined() -> dict[str, Any]:
    at = NOW - timedelta(minutes=14)
    return {
        "user_id": "42",
        "in_users_table": True,
        "state": "quarantined",
        "last_sync": (NOW - timedelta(days=2)).isoformat(),
        "due_at": None,
        "lease": None,
        "consecutive_failures": 11,
        "quarantined": True,
        "quarantined_since": at.isoformat(),
        "next_attempt_in_s": 40.0,
        "next_attempt_at": (NOW + timedelta(seconds=40)).isoformat(),
        "last_status": 500,
        "last_error": "HTTP 500",
        "retry_requested_by": None,
        "retry_requested_at": None,
        "attempts": [
            {
                "started_at": at.isoformat(),
                "finished_at": at.isoformat(),
                "outcome": "failed",
                "http_status": 500,
                "attempts": 4,
                "error": "HTTP 500",
                "duration_ms": 812,
                "run_id": "0123456789abcdef",
                "instance": "host:1:abc",
            }
        ],
        "thresholds": {"stale_after_seconds": 3600.0, "quarantine_after": 10, "source": "x"},
        "database": "sqlite:///sync.db",
    }


def test_the_screen_says_since_when_quarantined_and_the_next_attempt_relatively() -> None:
    text = userview.render(_quarantined(), now=NOW)
    assert text.splitlines()[0] == (
        "user 42: QUARANTINED since 2026-12-01 02:46:00 UTC (14 min ago): "
        "11 failures in a row (from 10 on)"
    )
    assert "  next attempt: in 40 s" in text
    assert "  last sync: 2026-11-29 03:00:00 UTC (2 d ago)" in text
    assert "2026-12-01 02:46:00  failed       500      4    812 ms  01234567  host:1:abc" in text


def test_the_screen_of_an_id_nothing_is_known_of_is_two_lines() -> None:
    data = _quarantined() | {"in_users_table": False, "state": "unknown", "attempts": []}
    assert userview.render(data, now=NOW).splitlines()[0] == "user 42: NOT IN THE USERS TABLE"
    assert len(userview.render(data, now=NOW).splitlines()) == 2


def test_retry_says_who_was_left_alone_and_why() -> None:
    done = retry.Retried(released=("1",), leased=("2",), unknown=("x",), quarantine_after=10)
    lines = retry.report(done, quarantined=False, now=False, forced=False)
    assert lines[0] == "released 1 user(s): 1"
    assert any(
        line.startswith("left alone, being synced right now (live lease): 2") for line in lines
    )
    assert "not in the users table: x" in lines
