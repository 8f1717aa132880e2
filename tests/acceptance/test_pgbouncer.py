"""Two daemons sharing one PostgreSQL database through pgbouncer in transaction mode.

pgbouncer (started by the `pgbouncer` fixture, pool_mode=transaction, two server
connections) hands each transaction to whichever server connection is free. psycopg
prepares a statement on the server after its fifth use and names it `_pg3_N`; the
next transaction may run where another client prepared a different `_pg3_N`, or none.
SYNC_DATABASE_PREPARED_STATEMENTS=false is what makes the daemon safe there.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.acceptance.conftest import Harness, Proc
from tests.conftest import BouncedDatabase

USERS = 240


def _prepare(harness: Harness, database: BouncedDatabase) -> None:
    """The daemon's tables and the users table, made through pgbouncer by the CLI."""
    env = harness.env(
        SYNC_DATABASE_URL=database.bouncer_url, SYNC_DATABASE_PREPARED_STATEMENTS="false"
    )
    for command in (["migrate"], ["seed-demo", "--users", str(USERS)]):
        done = harness.cli(*command, env=env)
        assert done.returncode == 0, done.stdout + done.stderr


def _two_instances(harness: Harness, database: BouncedDatabase, **settings: Any) -> list[Proc]:
    """Two `once` processes at the same time, with small batches so statements repeat."""
    backend = harness.start_backend(latency_ms=5)
    env = harness.env(
        backend,
        SYNC_DATABASE_URL=database.bouncer_url,
        SYNC_STATUS_ADDRESS="",
        SYNC_CONCURRENCY="4",
        SYNC_CLAIM_BATCH_SIZE="4",
        **settings,
    )
    procs = [
        Proc(name, [sys.executable, "-m", "daemon", "once"], env=env, cwd=harness.tmp)
        for name in ("instance-a", "instance-b")
    ]
    harness.procs.extend(procs)
    for proc in procs:
        proc.wait_exit(timeout=120)
    return procs


def _last_syncs(database: BouncedDatabase) -> list[Any]:
    engine = create_engine(database.direct_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT last_sync FROM users")).scalars())
    finally:
        engine.dispose()


def test_two_instances_behind_pgbouncer_sync_every_user_exactly_once(
    harness: Harness, pgbouncer_database: BouncedDatabase
) -> None:
    """With prepared statements off, transaction pooling is invisible to the daemon."""
    _prepare(harness, pgbouncer_database)
    a, b = _two_instances(harness, pgbouncer_database, SYNC_DATABASE_PREPARED_STATEMENTS="false")

    describe = a.tail() + "\n" + b.tail()
    assert a.popen.returncode == 0, describe
    assert b.popen.returncode == 0, describe
    calls = Counter(harness.backends[0].stats()["per_user_calls"])
    assert len(calls) == USERS
    assert set(calls.values()) == {1}, [user for user, n in calls.items() if n > 1]
    synced = Counter(e["user_id"] for p in (a, b) for e in p.events("user_synced"))
    assert len(synced) == USERS and set(synced.values()) == {1}
    assert all(e.get("level") != "error" for p in (a, b) for e in p.events()), describe
    assert "prepared statement" not in a.all_text() + b.all_text()
    assert None not in _last_syncs(pgbouncer_database)


def test_behind_pgbouncer_prepared_statements_break_the_daemon(
    harness: Harness, pgbouncer_database: BouncedDatabase
) -> None:
    """Why the setting exists: psycopg's default prepares collide across clients."""
    _prepare(harness, pgbouncer_database)
    a, b = _two_instances(harness, pgbouncer_database)

    output = a.all_text() + b.all_text()
    assert "prepared statement" in output, a.tail() + "\n" + b.tail()
    assert (a.popen.returncode, b.popen.returncode) != (0, 0)
