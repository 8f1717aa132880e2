"""Operator controls shared by every instance, kept in the database across restarts.

`pause`, `resume` and `force` write one row (`sync_control`, id 1) that every running
instance reads every few seconds; `cleanup` records and frees what crashed instances
left behind. Nothing here needs the daemon to be running, or to be local.

Liveness is judged on the database's clock (`daemon.dbclock`): instances write their
heartbeats with it and `cleanup` compares with it, so a host whose clock is off never
makes another instance's live work look abandoned.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from daemon import __version__, dbclock
from daemon.database import Database, aware
from daemon.models import control, instances, operations, runs, user_state


@dataclass(frozen=True)
class Control:
    paused: bool = False
    paused_at: datetime | None = None
    force_requested_at: datetime | None = None
    updated_by: str | None = None


def read(db: Database) -> Control:
    return db.transaction(read_in, name="read_control")


def read_in(session: Session) -> Control:
    row = session.execute(select(control).where(control.c.id == 1)).first()
    if row is None:
        return Control()
    return Control(
        paused=bool(row.paused),
        paused_at=aware(row.paused_at),
        force_requested_at=aware(row.force_requested_at),
        updated_by=row.updated_by,
    )


def _ensure_row(session: Session) -> None:
    insert_ = (
        postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    )
    session.execute(insert_(control).values(id=1, paused=False).on_conflict_do_nothing())


def set_paused(db: Database, paused: bool, *, by: str, now: datetime) -> None:
    def unit(session: Session) -> None:
        _ensure_row(session)
        session.execute(
            update(control)
            .where(control.c.id == 1)
            .values(paused=paused, paused_at=now if paused else None, updated_by=by)
        )

    db.transaction(unit, name="set_paused")


def request_force(db: Database, *, by: str, now: datetime) -> None:
    def unit(session: Session) -> None:
        _ensure_row(session)
        session.execute(
            update(control).where(control.c.id == 1).values(force_requested_at=now, updated_by=by)
        )

    db.transaction(unit, name="request_force")


def report_instance(
    db: Database,
    *,
    instance: str,
    started_at: datetime,
    now: datetime,
    state: str,
    circuit: str,
    status: str,
) -> Control:
    """Refresh this instance's row and read the control row, in one short transaction.

    The heartbeat is the database's time (`cleanup` compares it with that); `now` is
    not used.
    """
    values: dict[str, Any] = {
        "heartbeat_at": dbclock.now(db.dialect),
        "state": state,
        "circuit": circuit,
        "status": status[:255],
    }

    def unit(session: Session) -> Control:
        updated = session.execute(
            update(instances).where(instances.c.instance == instance).values(values)
        ).rowcount  # type: ignore[attr-defined]
        if not updated:
            session.execute(
                insert(instances).values(
                    instance=instance, started_at=started_at, version=__version__, **values
                )
            )
        return read_in(session)

    return db.transaction(unit, name="report_instance")


@dataclass(frozen=True)
class Cleaned:
    leases: int
    runs: int
    instances: int


def cleanup(db: Database, *, now: datetime, stale_after: timedelta) -> Cleaned:
    """Record expired leases as abandoned operations and free them; close dead runs.

    An expired lease is claimable anyway; cleaning it up makes the abandonment visible
    in `status` and in the operations history, with who held it and since when.
    "Expired" and "silent for `stale_after`" are judged on the database's clock; `now`
    (the caller's clock) only dates the records this writes.
    """
    db_now = dbclock.now(db.dialect)
    silent_since = dbclock.after(db.dialect, -stale_after.total_seconds())

    def unit(session: Session) -> Cleaned:
        s = user_state.c
        expired = session.execute(
            select(s.user_key, s.lease_owner, s.lease_token, s.last_attempt_at, s.lease_expires_at)
            .where(s.lease_owner.is_not(None), s.lease_expires_at < db_now)
            .with_for_update(skip_locked=True)
        ).all()
        if expired:
            session.execute(
                insert(operations),
                [
                    {
                        "id": row.lease_token,
                        "run_id": "cleanup",
                        "user_key": row.user_key,
                        "instance": row.lease_owner,
                        "started_at": row.last_attempt_at or row.lease_expires_at,
                        "heartbeat_at": row.lease_expires_at,
                        "finished_at": now,
                        "outcome": "failed",
                        "error": "abandoned: the lease expired, its holder stopped renewing it",
                    }
                    for row in expired
                ],
            )
            session.execute(
                update(user_state)
                .where(
                    s.user_key.in_([row.user_key for row in expired]),
                    s.lease_expires_at < db_now,
                )
                .values(lease_owner=None, lease_token=None, lease_expires_at=None)
            )
        dead_runs = session.execute(
            update(runs)
            .where(runs.c.outcome == "running", runs.c.heartbeat_at < silent_since)
            .values(outcome="abandoned", finished_at=now, error="run heartbeat stopped")
        ).rowcount  # type: ignore[attr-defined]
        gone = session.execute(
            delete(instances).where(instances.c.heartbeat_at < silent_since)
        ).rowcount  # type: ignore[attr-defined]
        return Cleaned(leases=len(expired), runs=int(dead_runs or 0), instances=int(gone or 0))

    return db.transaction(unit, name="cleanup")
