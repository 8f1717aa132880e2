"""The sync queries: find due users, claim them under a lease, record what happened.

Leases make "one sync in flight per user" hold across instances. A claim writes a fresh
token into the user's state row; every later write for that claim carries the token in
its WHERE clause, so an instance whose lease expired and was taken over writes nothing.

Every time that decides who may call a user (lease expiry, per-user backoff, the run
heartbeat `cleanup` judges) is the database's clock, computed and compared inside the
statements (`daemon.dbclock`): instances whose clocks disagree still agree on leases.
The `now` arguments are the instance's own clock; they only date what the instance
observed (claimed_at, started_at, finished_at) and the cycle's staleness threshold.

Work is done in batches (one claim statement per page, one transaction per batch of
results) because per-user transactions would cost more CPU than the HTTP calls they
record.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from daemon import dbclock, freshness, schema, statements
from daemon.database import Database
from daemon.models import operations, runs, user_state
from daemon.schema import UsersTable, wire_id
from daemon.statements import UserColumns
from daemon.values import Claim, Finished, Outcome, Result

ERROR_TEXT_LIMIT = 500
_NO_LEASE: tuple[str | None, int] = (None, 0)


@dataclass(frozen=True, slots=True)
class RunCounts:
    """A running cycle's counters, as the run heartbeat writes them into its row."""

    due: int | None
    claimed: int
    succeeded: int
    failed: int
    skipped: int

    def values(self) -> dict[str, int | None]:
        found: dict[str, int | None] = {
            "claimed": self.claimed,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "skipped": self.skipped,
        }
        return found if self.due is None else {**found, "due": self.due}


@dataclass(slots=True)
class Cursor:
    """Keyset position in one cycle's scan: never-synced users by id, then stale by age.

    Rows only ever move forward in this order (a sync makes last_sync newer), so the
    scan visits each user at most once per cycle and never re-reads earlier pages.
    """

    phase: str = "never"
    last_id: Any = None
    last_sync: Any = None

    @property
    def done(self) -> bool:
        return self.phase == "done"


class Store:
    """Queries over the users table and the daemon's tables, one transaction each."""

    def __init__(
        self,
        db: Database,
        users: UsersTable,
        *,
        instance: str,
        lease_seconds: float,
    ) -> None:
        self.db = db
        self.instance = instance
        self.users = users
        self._cols = UserColumns.of(users)
        self._sql = statements.build(db, users, self._cols, lease_seconds)
        self._postgres = db.dialect == "postgresql"
        self._db_now = dbclock.now(db.dialect)
        self._lease_end = dbclock.after(db.dialect, lease_seconds)
        # Counted for the cycle's log line (how much instances got in each other's way):
        # claim transactions, and due rows a claim found but did not lease because another
        # instance was claiming them (locked), leased them first, or synced them meanwhile.
        self.claim_transactions = 0
        self.claims_contended = 0

    # -- reading ---------------------------------------------------------------------

    def _app_time(self, value: datetime) -> datetime:
        """A UTC instant in the form the application's last_sync column stores."""
        return value.replace(tzinfo=None) if self._cols.naive_last_sync else value

    def _eligible(self, run_id: str | None) -> ColumnElement[bool]:
        """Not leased, not backing off, and not already claimed by this same run.

        Both times are compared with the database's clock, never the instance's.
        """
        s = user_state.c
        conditions = [
            or_(s.lease_expires_at.is_(None), s.lease_expires_at < self._db_now),
            or_(s.next_attempt_at.is_(None), s.next_attempt_at <= self._db_now),
        ]
        if run_id is not None:
            conditions.append(or_(s.last_run_id.is_(None), s.last_run_id != run_id))
        return or_(s.user_key.is_(None), and_(*conditions))

    def _due_rows(
        self,
        session: Session,
        cursor: Cursor,
        limit: int,
        *,
        run_id: str | None,
        stale_before: datetime,
        orphans: bool = False,
    ) -> list[Any]:
        base = (
            select(self._cols.id, self._cols.email, self._cols.key)
            .select_from(self._cols.with_state)
            .where(self._eligible(run_id))
        )
        if orphans:
            # Only users whose lease another holder let expire: a crashed instance's work.
            base = base.where(
                user_state.c.lease_owner.is_not(None), user_state.c.lease_owner != self.instance
            )
        rows: list[Any] = []
        while len(rows) < limit and not cursor.done:
            want = limit - len(rows)
            query = self._page_query(base, cursor, stale_before)
            page = session.execute(query.limit(want)).all()
            rows.extend(page)
            if len(page) < want:
                cursor.phase = "stale" if cursor.phase == "never" else "done"
                cursor.last_id = cursor.last_sync = None
            else:
                cursor.last_id, cursor.last_sync = page[-1][0], page[-1][3]
        return rows

    def _page_query(self, base: Select[Any], cursor: Cursor, stale_before: datetime) -> Select[Any]:
        """The next page of one phase, in keyset order (never synced by id, stale by age)."""
        if cursor.phase == "never":
            query = base.add_columns(self._cols.last_sync).where(self._cols.last_sync.is_(None))
            if cursor.last_id is not None:
                query = query.where(self._cols.id > cursor.last_id)
            return query.order_by(self._cols.id)
        query = base.add_columns(self._cols.last_sync).where(
            self._cols.last_sync < self._app_time(stale_before)
        )
        if cursor.last_id is not None:
            query = query.where(
                tuple_(self._cols.last_sync, self._cols.id)
                > tuple_(literal(cursor.last_sync, self._cols.last_sync.type), cursor.last_id)
            )
        return query.order_by(self._cols.last_sync, self._cols.id)

    def index_advice(self, *, stale_before: datetime, limit: int) -> str | None:
        """The CREATE INDEX statement the due scan needs, or None (see schema.index_advice)."""
        query = self._due_scan_query(stale_before=stale_before, limit=limit)
        return schema.index_advice(self.db.engine, self.users, query)

    def _due_scan_query(self, *, stale_before: datetime, limit: int) -> Select[Any]:
        """One page of the stale phase as a cycle reads it: what the index advice checks."""
        base = (
            select(self._cols.id, self._cols.email, self._cols.key)
            .select_from(self._cols.with_state)
            .where(self._eligible(None))
        )
        cursor = Cursor(phase="stale")
        return self._page_query(base, cursor, stale_before).limit(limit)

    def due_page(
        self, cursor: Cursor, limit: int, *, now: datetime, stale_before: datetime
    ) -> list[Claim]:
        """Due users without claiming them (dry runs): no token, nothing written.

        `now` is not used: eligibility is decided on the database's clock.
        """

        def unit(session: Session) -> list[Claim]:
            rows = self._due_rows(session, cursor, limit, run_id=None, stale_before=stale_before)
            return [self._claim_of(r, "") for r in rows]

        return self.db.transaction(unit, name="due_page")

    def count_due(self, *, now: datetime, stale_before: datetime) -> int:
        """How many users are due; `now` is not used (eligibility is the database's clock)."""
        query = (
            select(func.count())
            .select_from(self._cols.with_state)
            .where(
                or_(
                    self._cols.last_sync.is_(None),
                    self._cols.last_sync < self._app_time(stale_before),
                ),
                self._eligible(None),
            )
        )
        return self.db.transaction(lambda s: int(s.execute(query).scalar_one()), name="count_due")

    def freshness(
        self,
        *,
        target_s: float,
        objective: float,
        quarantine_after: int,
        now: datetime,
        hint: freshness.Freshness | None = None,
    ) -> freshness.Freshness:
        """How fresh the users are now (daemon.freshness); `hint`: the last measurement."""

        def unit(session: Session) -> freshness.Freshness:
            return freshness.measure(
                session,
                self._cols.last_sync,
                # PostgreSQL's index-only scans fetch heap pages the visibility map does not
                # cover, and last_sync rows change hourly: one sequential pass is cheaper.
                range_counts=self.users.last_sync_indexed and not self._postgres,
                hint=hint,
                in_column_form=self._app_time,
                as_instant=lambda value: schema.as_instant(value, self.users.storage),
                target_s=target_s,
                objective=objective,
                quarantine_after=quarantine_after,
                now=now,
            )

        return self.db.transaction(unit, name="freshness")

    # -- claiming --------------------------------------------------------------------

    def claim(
        self,
        cursor: Cursor,
        limit: int,
        *,
        run_id: str,
        now: datetime,
        stale_before: datetime,
        orphans: bool = False,
    ) -> list[Claim]:
        """Lease up to `limit` due users for this instance, in one short transaction.

        With `orphans`, only users whose lease expired under another instance are taken.
        The lease runs SYNC_LEASE_SECONDS from the database's clock; `now` (this
        instance's clock) only dates the claim in the operations history.
        """

        def unit(session: Session) -> list[Claim]:
            saved = (cursor.phase, cursor.last_id, cursor.last_sync)
            try:
                rows = self._due_rows(
                    session,
                    cursor,
                    limit,
                    run_id=run_id,
                    stale_before=stale_before,
                    orphans=orphans,
                )
                return self._lease(session, rows, run_id=run_id, now=now, stale_before=stale_before)
            except BaseException:
                # A retried transaction must scan the same page again.
                cursor.phase, cursor.last_id, cursor.last_sync = saved
                raise

        return self.db.transaction(unit, name="claim")

    def _lease(
        self,
        session: Session,
        rows: Sequence[Any],
        *,
        run_id: str,
        now: datetime,
        stale_before: datetime,
    ) -> list[Claim]:
        self.claim_transactions += 1
        if not rows:
            return []
        if self._postgres:
            found = len(rows)
            rows = self._skip_locked(session, rows)
            self.claims_contended += found - len(rows)
            if not rows:
                return []
        tokens = {row[2]: uuid.uuid4().hex for row in rows}
        self._sql.take_lease.execute(
            session,
            [
                {
                    "user_key": key,
                    "lease_owner": self.instance,
                    "lease_token": token,
                    "last_run_id": run_id,
                    "consecutive_failures": 0,
                }
                for key, token in tokens.items()
            ],
        )
        # A conditional upsert cannot say per row whether it won; the tokens can.
        won = {
            key
            for key, token in session.execute(self._sql.leases_of, {"b_keys": list(tokens)})
            if token == tokens[key]
        }
        won -= self._synced_meanwhile(session, rows, won, tokens, stale_before)
        self.claims_contended += len(tokens) - len(won)
        return [self._claim_of(r, tokens[r[2]], now) for r in rows if r[2] in won]

    def _synced_meanwhile(
        self,
        session: Session,
        rows: Sequence[Any],
        won: set[str],
        tokens: dict[str, str],
        stale_before: datetime,
    ) -> set[str]:
        """Leases just won on users that are no longer due: given back at once.

        The page was read before the leases were taken. In between, another instance
        may have synced a user and released it, and its lease is free again: without
        this second look (a new statement, so it sees that commit; by the primary key,
        so it is cheap) the user would be called twice.
        """
        ids = {r[2]: r[0] for r in rows if r[2] in won}
        if not ids:
            return set()
        due = set(
            session.scalars(
                self._sql.still_due,
                {"b_ids": list(ids.values()), "b_stale": self._app_time(stale_before)},
            )
        )
        gone = set(ids) - due
        if gone:
            s = user_state.c
            session.execute(
                update(user_state)
                .where(s.user_key.in_(list(gone)), s.lease_token.in_([tokens[k] for k in gone]))
                .values(lease_owner=None, lease_token=None, lease_expires_at=None)
            )
        return gone

    def _claim_of(self, row: Any, token: str, claimed_at: datetime | None = None) -> Claim:
        row_id, email, key = row[0], row[1], row[2]
        return Claim(
            wire_id(self._cols.id_kind, row_id, key), key, email, token, claimed_at, row_id
        )

    def _skip_locked(self, session: Session, rows: Sequence[Any]) -> list[Any]:
        """Drop users whose state row another instance is claiming right now."""
        keys = [row[2] for row in rows]
        s = user_state.c
        existing = set(session.scalars(select(s.user_key).where(s.user_key.in_(keys))))
        locked = set(
            session.scalars(
                select(s.user_key).where(s.user_key.in_(keys)).with_for_update(skip_locked=True)
            )
        )
        return [row for row in rows if row[2] not in existing or row[2] in locked]

    # -- recording -------------------------------------------------------------------

    def finish(
        self,
        results: Sequence[Result],
        *,
        now: datetime,
        backoff: Callable[[int], float],
        quarantine_after: int = 0,
    ) -> Finished:
        """Record a batch of results; last_sync moves only for successes still leased.

        Each operation is filed under its own result's run: a batch may hold results
        carried over from an earlier run. A failure's backoff runs from the database's
        clock; `now` is not used.
        """
        if not results:
            return Finished()

        def unit(session: Session) -> Finished:
            current = {
                key: (token, failures)
                for key, token, failures in session.execute(
                    self._sql.held_of, {"b_keys": [r.claim.key for r in results]}
                )
            }
            held: list[Result] = []
            lost: list[Result] = []
            for r in results:
                (held if current.get(r.claim.key, _NO_LEASE)[0] == r.claim.token else lost).append(
                    r
                )
            successes = [r for r in held if r.outcome is Outcome.SUCCESS]
            if successes:
                self._sql.mark_synced.execute(
                    session,
                    [
                        {
                            "b_id": r.claim.row_id,
                            "b_key": r.claim.key,
                            "b_token": r.claim.token,
                            "b_synced_at": self._app_time(r.finished_at),
                        }
                        for r in successes
                    ],
                )
            self._update_states(session, held, current, backoff=backoff)
            self._close_operations(session, results, lost)
            quarantined = [
                r
                for r in held
                if quarantine_after
                and r.outcome is Outcome.FAILED
                and current[r.claim.key][1] + 1 == quarantine_after
            ]
            return Finished(lease_lost=lost, quarantined=quarantined)

        return self.db.transaction(unit, name="finish")

    def _update_states(
        self,
        session: Session,
        held: Iterable[Result],
        current: dict[str, tuple[str | None, int]],
        *,
        backoff: Callable[[int], float],
    ) -> None:
        decided: list[dict[str, Any]] = []
        undecided: list[dict[str, Any]] = []
        for r in held:
            if r.outcome is Outcome.SUCCESS:
                decided.append(
                    {
                        "b_key": r.claim.key,
                        "b_token": r.claim.token,
                        "last_success_at": r.finished_at,
                        "consecutive_failures": 0,
                        "b_backoff": None,
                        "last_status": r.http_status,
                        "last_error": None,
                    }
                )
            elif r.outcome is Outcome.FAILED:
                failures = current[r.claim.key][1] + 1
                decided.append(
                    {
                        "b_key": r.claim.key,
                        "b_token": r.claim.token,
                        "last_success_at": None,
                        "consecutive_failures": failures,
                        "b_backoff": max(backoff(failures), r.backoff_at_least),
                        "last_status": r.http_status,
                        "last_error": _clip(r.error),
                    }
                )
            else:
                # CONFLICT and RELEASED decide nothing: the failure history stays as it was.
                undecided.append(
                    {"b_key": r.claim.key, "b_token": r.claim.token, "last_status": r.http_status}
                )
        self._sql.decide.execute(session, decided)
        self._sql.leave_undecided.execute(session, undecided)

    def _close_operations(
        self, session: Session, results: Sequence[Result], lost: Sequence[Result]
    ) -> None:
        """One row per finished attempt; in-flight work is the lease row itself."""
        lost_tokens = {r.claim.token for r in lost}
        self._sql.record.execute(
            session,
            [
                {
                    "id": r.claim.token,
                    "run_id": r.run_id,
                    "user_key": r.claim.key,
                    "instance": self.instance,
                    "started_at": r.claim.claimed_at or r.finished_at,
                    "finished_at": r.finished_at,
                    "outcome": "lease_lost" if r.claim.token in lost_tokens else r.outcome.value,
                    "http_status": r.http_status,
                    "attempts": r.attempts,
                    "error": _clip(r.error),
                    "duration_ms": r.duration_ms,
                }
                for r in results
            ],
        )

    # -- leases and runs -------------------------------------------------------------

    def heartbeat(self, run_id: str, *, now: datetime, counts: RunCounts | None = None) -> int:
        """Extend every live lease this instance holds; return how many were renewed.

        "Live" and the new expiry are the database's clock, as is the run's heartbeat
        that `cleanup` judges; `now` is not used. `counts`, the run's progress so far,
        goes into the run row in the same statement, so `status` reads "190 of 295"
        during a cycle rather than zeros until its end.
        """
        progress = counts.values() if counts is not None else {}

        def unit(session: Session) -> int:
            s = user_state.c
            renewed = session.execute(
                update(user_state)
                .where(s.lease_owner == self.instance, s.lease_expires_at >= self._db_now)
                .values(lease_expires_at=self._lease_end)
            ).rowcount  # type: ignore[attr-defined]
            session.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(heartbeat_at=self._db_now, **progress)
            )
            return int(renewed or 0)

        return self.db.transaction(unit, name="heartbeat")

    def release_all(self, *, keep: Iterable[str] = ()) -> int:
        """Give back every lease this instance holds, so others can take them now.

        `keep` names tokens whose results are not recorded yet: their leases stay, so
        that the late write can still land if nobody else needed the user meanwhile.
        """
        kept = list(keep)

        def unit(session: Session) -> int:
            s = user_state.c
            query = update(user_state).where(s.lease_owner == self.instance)
            if kept:
                query = query.where(s.lease_token.not_in(kept))
            released = session.execute(
                query.values(lease_owner=None, lease_token=None, lease_expires_at=None)
            ).rowcount  # type: ignore[attr-defined]
            return int(released or 0)

        return self.db.transaction(unit, name="release_all")

    def start_run(self, run_id: str, *, now: datetime, due: int | None = None) -> None:
        """Open the run's row: started at `now` (ours), heartbeat on the database's clock,
        and `due`, the users found due (None when it could not be counted)."""
        self.db.transaction(
            lambda s: s.execute(
                insert(runs).values(
                    id=run_id,
                    instance=self.instance,
                    started_at=now,
                    heartbeat_at=self._db_now,
                    outcome="running",
                    due=due,
                )
            ),
            name="start_run",
        )

    def finish_run(
        self,
        run_id: str,
        *,
        now: datetime,
        outcome: str,
        claimed: int,
        succeeded: int,
        failed: int,
        skipped: int,
        error: str | None = None,
    ) -> None:
        self.db.transaction(
            lambda s: s.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(
                    finished_at=now,
                    heartbeat_at=self._db_now,
                    outcome=outcome,
                    claimed=claimed,
                    succeeded=succeeded,
                    failed=failed,
                    skipped=skipped,
                    error=_clip(error),
                )
            ),
            name="finish_run",
        )

    def prune_history(self, *, before: datetime) -> int:
        """Delete finished runs and operations older than the retention window."""

        def unit(session: Session) -> int:
            gone = session.execute(
                delete(operations).where(operations.c.finished_at < before)
            ).rowcount  # type: ignore[attr-defined]
            session.execute(delete(runs).where(runs.c.finished_at < before))
            return int(gone or 0)

        return self.db.transaction(unit, name="prune_history")


def _clip(text: str | None) -> str | None:
    if text is None:
        return None
    return text if len(text) <= ERROR_TEXT_LIMIT else text[: ERROR_TEXT_LIMIT - 1] + "…"


def new_run_id() -> str:
    return uuid.uuid4().hex
