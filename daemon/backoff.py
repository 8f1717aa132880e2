"""Backoff arithmetic, kept pure so that it is tested without sleeping.

Full jitter (a uniform draw between zero and the exponential ceiling) spreads retries of
many users and many instances apart, where a fixed exponential schedule would make them
retry in lock-step against a backend that is already struggling.
"""

from __future__ import annotations

import random
from datetime import datetime
from email.utils import parsedate_to_datetime


def ceiling(base: float, attempt: int, cap: float) -> float:
    """The exponential ceiling for the n-th retry (attempt counts from 1)."""
    if attempt < 1 or base <= 0:
        return 0.0
    return min(cap, base * 2 ** min(attempt - 1, 62))


def full_jitter(base: float, attempt: int, cap: float, rng: random.Random) -> float:
    return rng.uniform(0.0, ceiling(base, attempt, cap))


def user_backoff(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before a user who failed `failures` times in a row is due again.

    Half fixed, half jittered: a failing user is never retried sooner than half the
    ceiling, so one broken account cannot be attempted every cycle.
    """
    top = ceiling(base, failures, cap)
    return top / 2 + rng.uniform(0.0, top / 2)


def retry_after(value: str | None, now: datetime, limit: float) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or HTTP-date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - now).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(seconds, limit))
