"""Operator controls shared by every instance, kept in the database across restarts.

`pause`, `resume` and `force` write one row (`sync_control`, id 1) that every running
instance reads every few seconds; `cleanup` records and frees what crashed instances
left behind. Nothing here needs the daemon to be running, or to be local.

Liveness is judged on the database's clock (`daemon.dbclock`): instances write their
heartbeats with it and `cleanup` compares with it, so a host whose clock is off never
makes another instance's live work look abandoned.

An instance's row says what it was doing when it last reported. A clean stop writes
`stopped` (with the stop time as its heartbeat) so that `status` never shows a gone
daemon as idle or syncing; a row silent for LOST_AFTER_SECONDS without saying so is a
daemon that died (kill -9, a host gone): `status` calls it lost.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    String,
    Update,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from daemon import __version__, dbclock, thresholds
from daemon.database import Database, aware, dialect_insert, short_error
from daemon.errors import StoreError
from daemon.models import control, instances, operations, runs, user_state
from daemon.pollconn import PollConnection
from daemon.progress import Progress
from daemon.settings import Settings

# How often a running instance refreshes its row and reads the switches.
POLL_SECONDS = 2.0
# An instance silent this long (three missed polls, and never under 30 s, so that a busy
# database or a slow poll is not mistaken for death) is shown as lost unless it stopped.
LOST_AFTER_SECONDS = max(30.0, 3 * POLL_SECONDS)
# How often the poll also counts every instance by state (the background_sync_instances
# gauge): at the first poll, then at most this often. "Lost" is judged at 30 s anyway.
CENSUS_SECONDS = 30.0
STOPPED = "stopped"


@dataclass(frozen=True)
class Control:
    paused: bool = False
    paused_at: datetime | None = None
    force_requested_at: datetime | None = None
    updated_by: str | None = None


class Switches:
    """This instance's view of the operator switches, fed every control row it reads.

    It keeps the last row (who paused, since when) and decides what changed: a pause or
    resume is logged once, and a force newer than the last one seen is a request, except
    at the first look, where it is history from before this process started.
    """

    def __init__(self, log: Any) -> None:
        self.row = Control()
        self._seen_force: datetime | None = None
        self._looked = False
        self._log = log

    @property
    def paused(self) -> bool:
        return self.row.paused

    def apply(self, row: Control) -> str | None:
        """Take a freshly read row; return the reason of a new force request, if any."""
        if row.paused != self.row.paused:
            self._log.warning("sync_paused" if row.paused else "sync_resumed", by=row.updated_by)
        forced = row.force_requested_at
        reason = None
        if forced is not None and (self._seen_force is None or forced > self._seen_force):
            first_look = self._seen_force is None and not self._looked
            self._seen_force = forced
            if not first_look:
                reason = f"force by {row.updated_by or 'an operator'}"
        self._looked = True
        self.row = row
        return reason


def read(db: Database) -> Control:
    return db.transaction(read_in, name="read_control")


# Built once: building a statement costs more CPU than running it on SQLite.
_READ_CONTROL = select(control).where(control.c.id == 1)


def read_in(session: Session | Connection) -> Control:
    return _control_of(session.execute(_READ_CONTROL).first())


def _control_of(row: Any) -> Control:
    """The switches from a row with the control columns (None: no control row yet)."""
    if row is None or row.paused is None:
        return Control()
    return Control(
        paused=bool(row.paused),
        paused_at=aware(row.paused_at),
        force_requested_at=aware(row.force_requested_at),
        updated_by=row.updated_by,
    )


def _ensure_row(session: Session) -> None:
    insert_ = dialect_insert(session.get_bind().dialect.name)
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
    settings: thresholds.Record | None = None,
    health: str | None = None,
    census: bool = True,
    connection: PollConnection | None = None,
) -> Reported:
    """Refresh this instance's row, read the control row and, with `census`, count every
    instance by state: on the kept connection one UPDATE that returns the switches (and
    the census after it), otherwise one short transaction.

    The heartbeat is the database's time (`cleanup` compares it with that); `now` is
    not used. `settings` (JSON, see daemon.thresholds) and `health` are what `status`
    judges by; the settings text is written when it changed (`settings.changed`), with
    the statement's own time as its `live.as_of`. With `connection` (the poll's kept
    one) the usual case, a row to refresh, runs there as Core statements; a missing row
    or any error falls back to the ordinary transaction below, with its retries, which
    writes every column.
    """
    written: dict[str, Any] = {"state": state, "circuit": circuit, "status": status[:255]}
    if health is not None:
        written["health"] = health[:16]

    def kept(conn: Connection) -> Reported | None:
        text = settings.parts() if settings is not None and settings.changed else None
        statement = _refresh_statement(db.dialect, tuple(written), text is not None)
        params = {"row_instance": instance, **written}
        if text is not None:
            params |= {"settings_head": text.head, "settings_tail": text.tail}
        switches = conn.execute(statement, params).first()  # None: no row to refresh
        if switches is None:
            return None
        found = count_instances_in(conn, db.dialect) if census else None
        return Reported(_control_of(switches), found, settings_written=text is not None)

    if connection is not None:
        seen = connection.run(kept)
        if seen is not None:
            return seen
        failed = connection.last_error
        if failed is not None and db.closing.is_set():
            # Stopping: one failed try is the answer, as Database.transaction would give
            # (a locked SQLite file must not hold the exit up for a second busy timeout).
            raise StoreError(f"report_instance: {short_error(failed)}") from failed

    values: dict[str, Any] = {"heartbeat_at": dbclock.now(db.dialect), **written}
    params: dict[str, Any] = {}
    if settings is not None:
        text = settings.parts()
        values["settings"] = _settings_text(db.dialect)
        params = {"settings_head": text.head, "settings_tail": text.tail}

    def unit(session: Session) -> Reported:
        updated = session.execute(
            update(instances).where(instances.c.instance == instance).values(values), params
        ).rowcount  # type: ignore[attr-defined]
        if not updated:
            session.execute(
                insert(instances).values(
                    instance=instance, started_at=started_at, version=__version__, **values
                ),
                params,
            )
        found = count_instances_in(session, db.dialect) if census else None
        return Reported(read_in(session), found, settings_written=settings is not None)

    return db.transaction(unit, name="report_instance")


def _settings_text(dialect: str) -> ColumnElement[str]:
    """The settings JSON with the statement's database time inserted as `live.as_of`."""
    head = bindparam("settings_head", type_=String)
    tail = bindparam("settings_tail", type_=String)
    return head.concat(dbclock.now_text(dialect)).concat(tail)


@functools.cache
def _refresh_statement(dialect: str, keys: tuple[str, ...], settings: bool) -> Update:
    """The poll's UPDATE of an instance row, built once per set of columns it writes.

    It returns the control row's switches too (as scalar subqueries; NULL without a
    control row), so that the poll's usual case is one statement, not two.
    """
    values: dict[str, Any] = {
        "heartbeat_at": dbclock.now(dialect),
        **{key: bindparam(key) for key in keys},
    }
    if settings:
        values["settings"] = _settings_text(dialect)
    switches = (
        select(column).where(control.c.id == 1).scalar_subquery().label(column.name)
        for column in (
            control.c.paused,
            control.c.paused_at,
            control.c.force_requested_at,
            control.c.updated_by,
        )
    )
    return (
        update(instances)
        .where(instances.c.instance == bindparam("row_instance"))
        .values(values)
        .returning(*switches)
    )


def mark_stopped(db: Database, *, instance: str) -> bool:
    """Say that this instance stopped cleanly, at the database's time; True if written.

    The row stays, so `status` can say "stopped 3 min ago"; `cleanup` forgets it later.
    An instance that never reported (an early stop, `once`) has no row and gets none.
    """
    values = {"heartbeat_at": dbclock.now(db.dialect), "state": STOPPED, "status": STOPPED}

    def unit(session: Session) -> bool:
        return bool(
            session.execute(
                update(instances).where(instances.c.instance == instance).values(values)
            ).rowcount  # type: ignore[attr-defined]
        )

    return db.transaction(unit, name="mark_stopped")


@dataclass(frozen=True)
class Reported:
    """What the control poll reads back: the switches, every instance by state (None when
    not counted this time), and whether the settings text was written."""

    control: Control
    instances: dict[str, int] | None
    settings_written: bool = False


def count_instances(db: Database) -> dict[str, int]:
    return db.transaction(
        lambda session: count_instances_in(session, db.dialect), name="count_instances"
    )


def count_instances_in(session: Session | Connection, dialect: str) -> dict[str, int]:
    """Instances by state, as `status` shows them: an instance silent past
    LOST_AFTER_SECONDS (on the database's clock) that did not say it stopped is lost."""
    return {str(name): int(count) for name, count in session.execute(_census(dialect))}


@functools.cache
def _census(dialect: str) -> Select[Any]:
    """Built once per dialect: the control poll runs it every few seconds."""
    i = instances.c
    silent = or_(
        i.heartbeat_at.is_(None), i.heartbeat_at < dbclock.after(dialect, -LOST_AFTER_SECONDS)
    )
    state = case(((i.state != STOPPED) & silent, "lost"), else_=i.state)
    return select(state, func.count()).group_by(state)


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

    Live work is never touched, whatever `stale_after` says: a lease that has not
    expired stays; a run or an instance that still holds a live lease is not closed or
    forgotten (a lease is only renewed by a living instance); an instance is forgotten
    only once `status` would call it lost (or it stopped) and it has been silent for
    `stale_after`. The command line refuses a `stale_after` shorter than the lease.
    """
    if stale_after <= timedelta(0):
        raise ValueError(f"stale_after must be positive, not {stale_after}")
    db_now = dbclock.now(db.dialect)
    silent_since = dbclock.after(db.dialect, -stale_after.total_seconds())
    gone_since = dbclock.after(db.dialect, -max(stale_after.total_seconds(), LOST_AFTER_SECONDS))

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
            .where(
                runs.c.outcome == "running",
                runs.c.heartbeat_at < silent_since,
                ~_holds_live_lease(runs.c.instance, db_now),
            )
            .values(outcome="abandoned", finished_at=now, error="run heartbeat stopped")
        ).rowcount  # type: ignore[attr-defined]
        gone = session.execute(
            delete(instances).where(
                instances.c.heartbeat_at < silent_since,
                (instances.c.state == STOPPED) | (instances.c.heartbeat_at < gone_since),
                ~_holds_live_lease(instances.c.instance, db_now),
            )
        ).rowcount  # type: ignore[attr-defined]
        return Cleaned(leases=len(expired), runs=int(dead_runs or 0), instances=int(gone or 0))

    return db.transaction(unit, name="cleanup")


def _holds_live_lease(
    owner: ColumnElement[str], db_now: ColumnElement[datetime]
) -> ColumnElement[bool]:
    """Whether `owner` (a column naming an instance) holds a lease that has not expired."""
    s = user_state.c
    return exists().where(s.lease_owner == owner, s.lease_expires_at >= db_now)


class Poll:
    """The control poll's own state: the switches as last read, when this instance
    started (its row says so), the bounded wait the watchdog checks, when the settings
    text was last written and when the instances were last counted.

    The app runs `report` every CONTROL_POLL_SECONDS in a supervised side task: it
    publishes the instance's row and reads the switches in one statement, on a
    connection kept for it (daemon.pollconn); every CENSUS_SECONDS a second statement
    counts every instance by state too, for the metrics.
    """

    def __init__(
        self,
        log: Any,
        *,
        started_at: datetime,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.switches = Switches(log)
        self.watch = Progress()  # a database wait the watchdog can see overrun
        self.started_at = started_at
        self.instances: dict[str, int] = {}  # every instance's state, as last counted
        self.recorder = thresholds.Recorder(monotonic=monotonic)
        self._monotonic = monotonic
        self._counted_at: float | None = None
        self._connection: PollConnection | None = None

    def close(self) -> None:
        """Give back the kept connection; call once the database thread has ended."""
        if self._connection is not None:
            self._connection.close()

    def _census_due(self) -> bool:
        if self._counted_at is None:
            return True
        since = self._monotonic() - self._counted_at
        return not 0 <= since < CENSUS_SECONDS  # or the clock went back

    async def report(
        self,
        run: Callable[..., Awaitable[Any]],
        db: Database,
        *,
        instance: str,
        now: datetime,
        state: str,
        circuit: str,
        status: str,
        bound_s: float,
        settings: Settings | None = None,
        live: thresholds.Live | None = None,
        health: str | None = None,
    ) -> Control:
        """Publish this instance's row and read the control row (StoreError if it fails),
        and, when due, every instance's state (kept in `instances`, for the metrics)."""
        if self._connection is None:
            self._connection = PollConnection(db.engine)
        record = (
            None
            if settings is None
            else self.recorder.record(settings, live if live is not None else thresholds.Live())
        )
        census = self._census_due()
        try:
            with self.watch.bounded(bound_s, "database control poll"):
                reported: Reported = await run(
                    report_instance,
                    db,
                    instance=instance,
                    started_at=self.started_at,
                    now=now,
                    state=state,
                    circuit=circuit,
                    status=status,
                    settings=record,
                    health=health,
                    census=census,
                    connection=self._connection,
                )
        except BaseException:
            self.recorder.forget()  # whether the row holds the text is unknown
            raise
        if record is not None and reported.settings_written:
            self.recorder.written(record)
        if reported.instances is not None:
            self.instances = reported.instances
            self._counted_at = self._monotonic()
        return reported.control
