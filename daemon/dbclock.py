"""The database's clock, as SQL: what leases, backoff and liveness are measured with.

Instances on different hosts never agree exactly on the time, and one whose clock is
ahead would see every other instance's leases as expired. So every time that decides
who may call a user (lease expiry, per-user backoff, heartbeats that `cleanup` judges)
is computed inside the statement, on the database server's clock, and compared there.

PostgreSQL: `statement_timestamp()`, the start of the current statement. Not `now()`,
which is the start of the transaction (a claim scans pages before it writes, so its
leases would start early), and not `clock_timestamp()`, which changes from row to row
within one statement, so a batch would not share one instant.

SQLite: `strftime('%Y-%m-%d %H:%M:%f', 'now')` with `000` appended: the text SQLAlchemy
stores for a DateTime (microseconds, six digits), so it compares as text exactly like
the stored values. SQLite computes it in the daemon's own process, from the host's
clock; SQLite is one instance on one host, so there is only one clock anyway.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Float,
    String,
    case,
    func,
    literal,
    literal_column,
    null,
)
from sqlalchemy.sql.expression import type_coerce

_SQLITE_FORMAT = "%Y-%m-%d %H:%M:%f"
_TIME = DateTime(timezone=True)


def now(dialect: str) -> ColumnElement[datetime]:
    """The database's current time."""
    if dialect == "postgresql":
        return func.statement_timestamp(type_=_TIME)
    return type_coerce(func.strftime(_SQLITE_FORMAT, "now").concat("000"), _TIME)


def now_text(dialect: str) -> ColumnElement[str]:
    """The database's current time as ISO 8601 text in UTC without an offset, the same
    instant as `now()` in the same statement (SQLite: the very text `now()` stores)."""
    if dialect == "postgresql":
        utc = func.timezone("UTC", func.statement_timestamp())
        return func.to_char(utc, "YYYY-MM-DD HH24:MI:SS.US", type_=String)
    return func.strftime(_SQLITE_FORMAT, "now", type_=String).concat("000")


def after(dialect: str, seconds: float | ColumnElement[float]) -> ColumnElement[datetime]:
    """The database's current time plus `seconds` (negative: before); NULL stays NULL.

    `seconds` is a number or an SQL expression, such as a bindparam that differs from
    row to row in an executemany.
    """
    amount = seconds if isinstance(seconds, ColumnElement) else literal(seconds, Float)
    if dialect == "postgresql":
        return type_coerce(now(dialect) + amount * literal_column("INTERVAL '1 second'"), _TIME)
    shifted = func.strftime(_SQLITE_FORMAT, "now", func.printf("%+.6f seconds", amount))
    if not isinstance(seconds, ColumnElement):
        return type_coerce(shifted.concat("000"), _TIME)
    # printf turns NULL into "+0.000000", so a NULL amount is caught before it.
    return type_coerce(case((amount.is_(None), null()), else_=shifted.concat("000")), _TIME)
