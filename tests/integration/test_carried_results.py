"""Results the database refused at the end of a cycle are recorded by the next one, and
still filed under the run that made the calls.

The fault is real: another connection holds the SQLite file with BEGIN EXCLUSIVE for
longer than the store's busy timeout and retries, as a backup tool or a long migration
would, exactly while the backend answers.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from sqlalchemy import select

from daemon import schema
from daemon.backend import BackendClient
from daemon.cycle import Cycle, DbRunner
from daemon.database import Database, make_engine
from daemon.models import operations, runs, user_state
from daemon.store import Store
from tests.conftest import AppDatabase, ReferenceBackend, SettingsFactory
from tests.waiting import wait_until

USERS = 4


def _leases_held(app_db: AppDatabase) -> bool:
    with app_db.db.engine.connect() as conn:
        held = conn.execute(
            select(user_state.c.user_key).where(user_state.c.lease_owner.is_not(None))
        )
        return len(held.all()) == USERS


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_results_recorded_by_a_later_cycle_keep_the_run_that_made_the_calls(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(USERS)
    await backend.faults(latency_ms=1500)
    settings = make_settings(
        SYNC_BACKEND_URL=backend.url,
        SYNC_CONCURRENCY=str(USERS),
        SYNC_SHUTDOWN_GRACE_SECONDS="1",
    )
    # Gives up on a lock quickly, so the cycle ends with its results still unrecorded.
    engine = make_engine(settings.database_url, sqlite_busy_timeout_ms=50)
    store = Store(
        Database(engine, attempts=2, base_delay=0.01),
        schema.inspect_users(engine, settings),
        instance="test-instance",
        lease_seconds=settings.lease_seconds,
    )
    path = settings.database_url.removeprefix("sqlite:///")
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    runner = DbRunner()
    session = BackendClient.open_session(settings)
    try:
        client = BackendClient(settings, session)
        first = Cycle(settings, store, client, runner, stop=asyncio.Event())
        running = asyncio.create_task(first.run())
        # Every user is claimed and being called: now the database stops taking writes.
        await asyncio.to_thread(wait_until, lambda: _leases_held(app_db), what="all claimed")
        locker.execute("BEGIN EXCLUSIVE")
        try:
            report = await running
        finally:
            locker.rollback()
        assert len(report.unrecorded) == USERS, report
        second = Cycle(
            settings, store, client, runner, stop=asyncio.Event(), carry=report.unrecorded
        )
        later = await second.run()
    finally:
        locker.close()
        await session.close()
        runner.close()
        engine.dispose()

    assert later.claimed == 0 and later.unrecorded == ()
    with app_db.db.engine.connect() as conn:
        filed = conn.execute(select(operations.c.run_id, operations.c.outcome)).all()
        claimed = dict(conn.execute(select(runs.c.id, runs.c.claimed)).all())
    assert filed == [(first.run_id, "success")] * USERS
    assert claimed[second.run_id] == 0
    assert set(app_db.last_syncs()) == set(range(1, USERS + 1))
    assert all(app_db.last_syncs().values())
