"""The statements a Store runs for every batch, built once per store and never changed.

The claim's lease upsert, the fenced writes of `finish` and the reads by key are built
here from the users table's real shape and the dialect, and compiled once
(`daemon.bulk.BulkStatement`), so that a batch only binds rows. Keeping them apart from
`daemon.store` leaves the Store with the queries' logic and two counters, and makes the
SQL the daemon promises (a write under a live lease token only) readable in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Float,
    Insert,
    Integer,
    Join,
    Select,
    String,
    Table,
    bindparam,
    cast,
    exists,
    func,
    or_,
    select,
    update,
)

from daemon import dbclock
from daemon.bulk import BulkStatement
from daemon.database import Database, dialect_insert
from daemon.models import operations, user_state
from daemon.schema import IdKind, UsersTable

# The columns each claim's upsert and each operation row give; the rest keep defaults.
LEASE_COLUMNS = (
    *("user_key", "lease_owner", "lease_token", "last_run_id", "consecutive_failures"),
    *("lease_expires_at", "last_attempt_at"),
)
OPERATION_COLUMNS = (
    *("id", "run_id", "user_key", "instance", "started_at", "heartbeat_at", "finished_at"),
    *("outcome", "http_status", "attempts", "error", "duration_ms"),
)
OUTCOME_FIELDS = (
    "finished_at",
    "heartbeat_at",
    "outcome",
    "http_status",
    "attempts",
    "error",
    "duration_ms",
)


@dataclass(frozen=True)
class UserColumns:
    """The users table's columns as the queries use them.

    `key` is the id as text, the form the daemon's own tables store (they must not
    depend on the application's id type); `with_state` is the users table joined to
    each user's state row, if any; `naive_last_sync` says the column holds UTC without
    a zone, so instants are compared and written without one.
    """

    table: Table
    id: ColumnElement[Any]
    email: ColumnElement[Any]
    last_sync: ColumnElement[Any]
    key: ColumnElement[Any]
    with_state: Join
    id_kind: IdKind
    naive_last_sync: bool

    @classmethod
    def of(cls, users: UsersTable) -> UserColumns:
        c = users.table.c
        last_sync = c[users.last_sync_column]
        key = cast(c[users.id_column], String)
        return cls(
            table=users.table,
            id=c[users.id_column],
            email=c[users.email_column],
            last_sync=last_sync,
            key=key,
            with_state=users.table.outerjoin(user_state, user_state.c.user_key == key),
            id_kind=users.id_kind,
            naive_last_sync=not getattr(last_sync.type, "timezone", False),
        )


@dataclass(frozen=True)
class Statements:
    """What `Store.claim` and `Store.finish` execute, in the order they do."""

    take_lease: BulkStatement
    leases_of: Select[Any]
    still_due: Select[Any]
    held_of: Select[Any]
    mark_synced: BulkStatement
    decide: BulkStatement
    leave_undecided: BulkStatement
    record: BulkStatement


def build(db: Database, users: UsersTable, cols: UserColumns, lease_seconds: float) -> Statements:
    dialect = db.engine.dialect
    db_now = dbclock.now(db.dialect)
    s = user_state.c
    by_keys = s.user_key.in_(bindparam("b_keys", expanding=True))
    fence = (s.user_key == bindparam("b_key"), s.lease_token == bindparam("b_token"))

    def ending_lease(**values: Any) -> BulkStatement:
        """The state row's write at a claim's end: under the claim's own token only, the
        lease cleared, and these columns set."""
        unlease = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}
        return BulkStatement(update(user_state).where(*fence).values(**unlease, **values), dialect)

    return Statements(
        take_lease=BulkStatement(
            _take_lease(
                dialect_insert(db.dialect), db_now, dbclock.after(db.dialect, lease_seconds)
            ),
            dialect,
            column_keys=LEASE_COLUMNS,
        ),
        leases_of=select(s.user_key, s.lease_token).where(by_keys),
        still_due=select(cols.key).where(
            cols.id.in_(bindparam("b_ids", expanding=True)),
            or_(
                cols.last_sync.is_(None),
                cols.last_sync < bindparam("b_stale", type_=cols.last_sync.type),
            ),
        ),
        # PostgreSQL: hold the rows, so no takeover lands between this read and the
        # fenced writes of `finish` (SQLite's BEGIN IMMEDIATE already does).
        held_of=select(s.user_key, s.lease_token, s.consecutive_failures)
        .where(by_keys)
        .with_for_update(),
        mark_synced=BulkStatement(
            update(cols.table)
            .where(cols.id == bindparam("b_id"))
            .where(exists().where(*fence))
            .values({users.last_sync_column: bindparam("b_synced_at", type_=cols.last_sync.type)}),
            dialect,
        ),
        decide=ending_lease(
            last_success_at=func.coalesce(
                bindparam("last_success_at", type_=s.last_success_at.type), s.last_success_at
            ),
            consecutive_failures=bindparam("consecutive_failures", type_=Integer),
            # NULL (a success) clears the backoff; a failure's runs from db time.
            next_attempt_at=dbclock.after(db.dialect, bindparam("b_backoff", type_=Float)),
            last_status=bindparam("last_status", type_=s.last_status.type),
            last_error=bindparam("last_error", type_=s.last_error.type),
        ),
        # CONFLICT and RELEASED decide nothing: the failure history stays as it was.
        leave_undecided=ending_lease(
            last_status=func.coalesce(
                bindparam("last_status", type_=s.last_status.type), s.last_status
            ),
        ),
        record=BulkStatement(_record(dialect_insert(db.dialect)), dialect),
    )


def _take_lease(insert: Any, db_now: ColumnElement[Any], lease_end: ColumnElement[Any]) -> Insert:
    """Executed with many rows at once: the times are SQL, the same for every row; the
    other columns come from the parameter list. A live lease is left alone."""
    take = insert(user_state).values(lease_expires_at=lease_end, last_attempt_at=db_now)
    lease = user_state.c.lease_expires_at
    updated: Insert = take.on_conflict_do_update(
        index_elements=[user_state.c.user_key],
        set_={
            "lease_owner": take.excluded.lease_owner,
            "lease_token": take.excluded.lease_token,
            "lease_expires_at": take.excluded.lease_expires_at,
            "last_attempt_at": take.excluded.last_attempt_at,
            "last_run_id": take.excluded.last_run_id,
        },
        where=or_(lease.is_(None), lease < db_now),
    )
    return updated


def _record(insert: Any) -> Insert:
    """One operation row per finished claim; heartbeat_at is finished_at (one parameter,
    converted once per row). `cleanup` may have recorded the claim as abandoned already:
    the real outcome wins."""
    o = operations.c
    record = insert(operations).values(
        {name: bindparam(name, type_=o[name].type) for name in OPERATION_COLUMNS}
        | {"heartbeat_at": bindparam("finished_at", type_=o.finished_at.type)}
    )
    updated: Insert = record.on_conflict_do_update(
        index_elements=[operations.c.id],
        set_={name: record.excluded[name] for name in OUTCOME_FIELDS},
    )
    return updated
