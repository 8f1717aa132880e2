"""Instances whose clocks disagree still agree on leases, backoff and liveness.

Each test gives one instance a `now` that is off by more than a lease, as a host with a
wrong clock would pass, and checks that the database's clock decided instead. Runs on a
SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import String, select, text, type_coerce

from daemon import control, dbclock
from daemon.database import utcnow
from daemon.models import instances, operations, runs, user_state
from daemon.store import Cursor, Store
from daemon.values import Outcome, Result
from tests.conftest import AppDatabase

LEASE = 40.0
AHEAD = timedelta(seconds=LEASE + 30)  # far enough that every lease looks expired
BEHIND = -timedelta(hours=1)


def claim_all(store: Store, *, skew: timedelta = timedelta(0)) -> list:
    now = utcnow() + skew
    cursor, claims, run = Cursor(), [], uuid.uuid4().hex
    while not cursor.done:
        claims += store.claim(
            cursor, 100, run_id=run, now=now, stale_before=now - timedelta(hours=1)
        )
    return claims


def owners(app_db: AppDatabase) -> set[str | None]:
    with app_db.db.engine.connect() as conn:
        return set(conn.execute(select(user_state.c.lease_owner)).scalars())


def test_an_instance_whose_clock_is_ahead_cannot_take_a_live_lease(app_db: AppDatabase) -> None:
    app_db.seed(3)
    assert len(claim_all(app_db.store(instance="right", lease_seconds=LEASE))) == 3
    ahead = app_db.store(instance="ahead", lease_seconds=LEASE)
    assert claim_all(ahead, skew=AHEAD) == []
    assert (
        app_db.store(instance="ahead").count_due(now=utcnow() + AHEAD, stale_before=utcnow()) == 0
    )
    assert owners(app_db) == {"right"}


def test_an_instance_whose_clock_is_behind_still_holds_its_leases(app_db: AppDatabase) -> None:
    app_db.seed(3)
    behind = app_db.store(instance="behind", lease_seconds=LEASE)
    assert len(claim_all(behind, skew=BEHIND)) == 3
    assert claim_all(app_db.store(instance="right", lease_seconds=LEASE)) == []
    assert owners(app_db) == {"behind"}


def test_a_heartbeat_from_a_clock_that_is_behind_renews_for_a_whole_lease(
    app_db: AppDatabase,
) -> None:
    app_db.seed(2)
    behind = app_db.store(instance="behind", lease_seconds=LEASE)
    behind.start_run("run1", now=utcnow() + BEHIND)
    claim_all(behind, skew=BEHIND)
    assert behind.heartbeat("run1", now=utcnow() + BEHIND) == 2
    assert claim_all(app_db.store(instance="right", lease_seconds=LEASE)) == []
    with app_db.db.engine.connect() as conn:
        expiries = conn.execute(select(user_state.c.lease_expires_at)).scalars().all()
    # a whole lease from the database's now, not from the instance's hour-old now
    assert all(_utc(e) > utcnow() + timedelta(seconds=LEASE / 2) for e in expiries)


def test_a_failed_users_backoff_runs_on_the_database_clock(app_db: AppDatabase) -> None:
    app_db.seed(1)
    behind = app_db.store(instance="behind", lease_seconds=LEASE)
    (claim,) = claim_all(behind, skew=BEHIND)
    behind.finish(
        [
            Result(
                claim,
                Outcome.FAILED,
                utcnow() + BEHIND,
                http_status=503,
                error="HTTP 503",
                run_id="run1",
            )
        ],
        now=utcnow() + BEHIND,
        backoff=lambda failures: 600.0,
    )
    # backing off for 10 minutes from now, though the instance's clock said an hour ago
    assert claim_all(app_db.store(instance="right", lease_seconds=LEASE)) == []


def test_cleanup_on_a_host_whose_clock_is_ahead_leaves_live_work_alone(
    app_db: AppDatabase,
) -> None:
    app_db.seed(3)
    worker = app_db.store(instance="worker", lease_seconds=LEASE)
    worker.start_run("run1", now=utcnow())
    claim_all(worker)
    control.report_instance(
        app_db.db,
        instance="worker",
        started_at=utcnow(),
        now=utcnow(),
        state="syncing",
        circuit="closed",
        status="syncing 0 of 3",
    )
    far_ahead = utcnow() + timedelta(hours=1)
    cleaned = control.cleanup(app_db.db, now=far_ahead, stale_after=timedelta(minutes=10))
    assert cleaned == control.Cleaned(leases=0, runs=0, instances=0)
    assert owners(app_db) == {"worker"}
    with app_db.db.engine.connect() as conn:
        assert conn.execute(select(operations)).all() == []
        assert conn.execute(select(runs.c.outcome)).scalar_one() == "running"
        assert conn.execute(select(instances.c.instance)).scalar_one() == "worker"


def test_cleanup_still_frees_leases_that_expired_on_the_database_clock(
    app_db: AppDatabase,
) -> None:
    app_db.seed(2)
    claim_all(app_db.store(instance="crashed", lease_seconds=LEASE))
    with app_db.db.engine.begin() as conn:
        conn.execute(user_state.update().values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    cleaned = control.cleanup(app_db.db, now=utcnow(), stale_after=timedelta(minutes=10))
    assert cleaned.leases == 2
    assert owners(app_db) == {None}


def test_the_database_clock_orders_correctly_against_stored_times(app_db: AppDatabase) -> None:
    """SQLite keeps DateTime as text: the database's time must be that very format."""
    dialect = app_db.db.dialect
    past, future = utcnow() - timedelta(seconds=1), utcnow() + timedelta(seconds=1)
    with app_db.db.engine.begin() as conn:
        conn.execute(
            user_state.insert(),
            [
                {"user_key": "past", "lease_expires_at": past},
                {"user_key": "future", "lease_expires_at": future},
            ],
        )
        expired = conn.execute(
            select(user_state.c.user_key).where(
                user_state.c.lease_expires_at < dbclock.now(dialect)
            )
        ).scalars()
        assert set(expired) == {"past"}
        later = conn.execute(
            select(user_state.c.user_key).where(
                user_state.c.lease_expires_at < dbclock.after(dialect, 2.0)
            )
        ).scalars()
        assert set(later) == {"past", "future"}
        if dialect == "sqlite":
            stored = conn.execute(text("SELECT lease_expires_at FROM sync_user_state")).scalar()
            raw = conn.execute(select(type_coerce(dbclock.now(dialect), String))).scalar()
            shape = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}"
            assert re.fullmatch(shape, stored) and re.fullmatch(shape, raw)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
