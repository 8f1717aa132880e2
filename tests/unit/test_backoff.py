"""Backoff arithmetic: bounds hold for every draw, Retry-After is understood and capped."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from daemon import backoff

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_ceiling_doubles_per_attempt_up_to_the_cap() -> None:
    assert [backoff.ceiling(5, n, 60) for n in range(1, 6)] == [5, 10, 20, 40, 60]
    assert backoff.ceiling(5, 0, 60) == 0
    assert backoff.ceiling(5, 10_000, 60) == 60


def test_full_jitter_stays_between_zero_and_the_ceiling() -> None:
    rng = random.Random(7)
    draws = [backoff.full_jitter(1.0, 3, 60, rng) for _ in range(1000)]
    assert min(draws) >= 0
    assert max(draws) <= 4.0
    assert max(draws) - min(draws) > 3.0  # spread out, not lock-step


def test_user_backoff_is_never_shorter_than_half_its_ceiling() -> None:
    rng = random.Random(1)
    for failures in range(1, 12):
        top = backoff.ceiling(60, failures, 3600)
        value = backoff.user_backoff(failures, 60, 3600, rng)
        assert top / 2 <= value <= top


def test_retry_after_in_seconds_and_as_http_date() -> None:
    assert backoff.retry_after("7", NOW, 300) == 7
    later = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    assert backoff.retry_after(later, NOW, 300) == 30


def test_retry_after_is_capped_and_garbage_is_ignored() -> None:
    assert backoff.retry_after("86400", NOW, 300) == 300
    assert backoff.retry_after("-5", NOW, 300) == 0
    assert backoff.retry_after("soon", NOW, 300) is None
    assert backoff.retry_after("nan", NOW, 300) is None
    assert backoff.retry_after(None, NOW, 300) is None
