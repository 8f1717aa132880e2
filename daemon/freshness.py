"""How fresh the users are: the number the daemon exists to keep high.

Schedulers report jobs ("the task ran"); this reports data ("99.7 % of users were synced
within the target"). A user is fresh when its last_sync is within the freshness target
of now (SYNC_FRESHNESS_TARGET_SECONDS; by default SYNC_STALE_AFTER_SECONDS +
SYNC_INTERVAL_SECONDS, the longest a healthy daemon lets a user wait). Never-synced
users are overdue. Quarantined users are counted on their own as well, never hidden.

One aggregate statement measures everything, with no join and no sort: on PostgreSQL a
single scan; on SQLite with an index led by last_sync, range counts the index answers
alone. Measured with 1,000,000 rows on this project's 2-core machine: about 0.25-0.35 s
on PostgreSQL and 0.37-0.39 s on SQLite (a single scan there took 2.4-4.4 s). It runs
once per cycle and at start-up, never per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from daemon import ages
from daemon.models import user_state

# Upper bounds (seconds) of the staleness histogram; +Inf is every user.
BUCKETS_S: tuple[float, ...] = (300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200, 604800)


@dataclass(frozen=True)
class Freshness:
    """One measurement of the users table, taken at `measured_at` (UTC)."""

    measured_at: datetime
    target_s: float
    objective: float
    users: int
    fresh: int
    never_synced: int
    quarantined: int
    oldest_overdue_s: float | None
    # Cumulative: users with a last_sync whose age is at most each bound of BUCKETS_S.
    staleness: tuple[int, ...]

    @property
    def overdue(self) -> int:
        """Users not fresh, never-synced ones included."""
        return self.users - self.fresh

    @property
    def fresh_ratio(self) -> float:
        """The share of users fresh; an empty table is entirely fresh."""
        return self.fresh / self.users if self.users else 1.0

    @property
    def meets_objective(self) -> bool:
        return self.fresh_ratio >= self.objective

    def as_dict(self) -> dict[str, Any]:
        return {
            "measured_at": self.measured_at.isoformat(),
            "target_s": self.target_s,
            "objective": self.objective,
            "users": self.users,
            "fresh": self.fresh,
            "fresh_ratio": round(self.fresh_ratio, 6),
            "overdue": self.overdue,
            "never_synced": self.never_synced,
            "quarantined": self.quarantined,
            "oldest_overdue_s": None
            if self.oldest_overdue_s is None
            else round(self.oldest_overdue_s, 1),
            "staleness_buckets": [
                {"le": bound, "users": count}
                for bound, count in zip(BUCKETS_S, self.staleness, strict=True)
            ]
            + [{"le": "+Inf", "users": self.users}],
        }


def percent(ratio: float) -> str:
    """A share as an operator reads it, never rounded up to 100 % while a user is overdue."""
    floored = math.floor(ratio * 1000) / 10
    return f"{floored:g} %"


def headline(freshness: Freshness) -> str:
    """ "99.7 % fresh, oldest overdue 3 min": the words of STATUS= and `status`."""
    line = f"{percent(freshness.fresh_ratio)} fresh"
    if freshness.never_synced:
        line += f", {freshness.never_synced} never synced"
    if freshness.oldest_overdue_s is not None:
        line += f", oldest overdue {ages.span(freshness.oldest_overdue_s)}"
    if freshness.quarantined:
        line += f", {freshness.quarantined} quarantined"
    return line


def measure(
    session: Session,
    last_sync: ColumnElement[Any],
    *,
    range_counts: bool,
    in_column_form: Callable[[datetime], Any],
    as_instant: Callable[[Any], datetime | None],
    target_s: float,
    objective: float,
    quarantine_after: int,
    now: datetime,
    hint: Freshness | None = None,
) -> Freshness:
    """Measure with one aggregate statement, plus a count of the quarantined.

    With `range_counts` (an index led by last_sync, on SQLite), each bound is a range
    count the index answers without reading a row, counted from whichever end held
    fewer users last time (`hint`, the previous measurement): about one pass over the
    index in all. Otherwise a single scan evaluates every bound per row.
    `in_column_form` turns an instant into the value the column compares with;
    `as_instant` turns a stored value back into one.
    """
    bounds = sorted({*BUCKETS_S, target_s})
    since = [in_column_form(now - timedelta(seconds=b)) for b in bounds]
    table = last_sync.table

    def count(*where: ColumnElement[bool]) -> Any:
        return select(func.count()).select_from(table).where(*where).scalar_subquery()

    newer_side = _newer_is_smaller(bounds, hint)
    if range_counts:
        columns = [
            count(),
            count(last_sync.is_(None)),
            select(func.min(last_sync)).scalar_subquery(),
        ]
        columns += [
            count(last_sync >= at) if newer else count(last_sync < at)
            for at, newer in zip(since, newer_side, strict=True)
        ]
    else:
        columns = [func.count(), func.count() - func.count(last_sync), func.min(last_sync)]
        columns += [func.coalesce(func.sum(case((last_sync >= at, 1), else_=0)), 0) for at in since]
        newer_side = [True] * len(bounds)
    row = session.execute(
        select(*columns).select_from(table) if not range_counts else select(*columns)
    ).one()
    users, never = int(row[0]), int(row[1])
    oldest = as_instant(row[2])
    synced = users - never
    within = {
        bound: int(value) if newer else synced - int(value)
        for bound, value, newer in zip(bounds, row[3:], newer_side, strict=True)
    }
    quarantined = session.execute(
        select(func.count()).where(user_state.c.consecutive_failures >= quarantine_after)
    ).scalar_one()
    oldest_overdue: float | None = None
    if oldest is not None:
        age = (now - oldest).total_seconds()
        oldest_overdue = age if age > target_s else None
    return Freshness(
        measured_at=now.astimezone(UTC),
        target_s=target_s,
        objective=objective,
        users=users,
        fresh=within[target_s],
        never_synced=never,
        quarantined=int(quarantined),
        oldest_overdue_s=oldest_overdue,
        staleness=tuple(within[b] for b in BUCKETS_S),
    )


def _newer_is_smaller(bounds: list[float], hint: Freshness | None) -> list[bool]:
    """Per bound: were the users synced within it fewer than those older, last time?

    With no earlier measurement, count the older side: in a table kept fresh the
    overdue are few.
    """
    if hint is None or not hint.users:
        return [False] * len(bounds)
    known = dict(zip(BUCKETS_S, hint.staleness, strict=True)) | {hint.target_s: hint.fresh}
    half = hint.users / 2
    return [known.get(bound, hint.users) <= half for bound in bounds]
