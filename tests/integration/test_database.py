"""Database units of work: a failure rolls back, transient ones are retried, and after
either the next unit runs on a clean, usable session."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from daemon.database import (
    Database,
    current_revision,
    has_daemon_tables,
    head_revision,
    make_engine,
    migrate,
)
from daemon.errors import StoreError
from daemon.models import runs
from tests.conftest import AppDatabase


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Most tests here are about SQLite itself; PostgreSQL has its own below."""
    return f"sqlite:///{tmp_path / 'sync.db'}"


def sqlite_path(app_db: AppDatabase) -> str:
    return app_db.settings.database_url.removeprefix("sqlite:///")


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(app_db: AppDatabase) -> None:
    with app_db.db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000


def test_migrate_is_idempotent_and_leaves_the_users_table_alone(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        conn.exec_driver_sql("INSERT INTO users (email) VALUES ('a@example.com')")
    assert not has_daemon_tables(engine)
    assert migrate(engine) == head_revision() == "0003"
    assert migrate(engine) == "0003"
    assert current_revision(engine) == "0003"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT email FROM users").scalars().all() == ["a@example.com"]
    engine.dispose()


def test_a_failed_unit_rolls_back_everything_it_wrote(app_db: AppDatabase) -> None:
    def unit(session: Session) -> None:
        session.execute(
            runs.insert().values(
                id="r1",
                instance="i",
                started_at=text("CURRENT_TIMESTAMP"),
                heartbeat_at=text("CURRENT_TIMESTAMP"),
                outcome="running",
            )
        )
        session.execute(text("INSERT INTO sync_runs (id) VALUES ('r1')"))  # duplicate key

    with pytest.raises(StoreError, match=r"broken: (UNIQUE|NOT NULL) constraint failed") as caught:
        app_db.db.transaction(unit, name="broken")
    assert isinstance(caught.value.__cause__, IntegrityError)
    rows = app_db.db.transaction(lambda s: s.execute(select(runs.c.id)).all(), name="read")
    assert rows == []


def test_a_locked_database_is_retried_with_backoff_until_it_frees(app_db: AppDatabase) -> None:
    engine = make_engine(app_db.settings.database_url, sqlite_busy_timeout_ms=50)
    db = Database(engine, attempts=8, base_delay=0.05)
    locker = sqlite3.connect(sqlite_path(app_db), isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.4, locker.rollback).start()
    try:
        with capture_logs() as logs:
            db.transaction(lambda s: s.execute(text("SELECT 1")).scalar_one(), name="probe")
    finally:
        locker.close()
        db.dispose()
    retries = [entry for entry in logs if entry["event"] == "database_retry"]
    assert retries, "the lock should have caused at least one retry"
    assert all("locked" in entry["error"] for entry in retries)


def test_retries_run_out_into_a_store_error_and_the_next_unit_still_works(
    app_db: AppDatabase,
) -> None:
    engine = make_engine(app_db.settings.database_url, sqlite_busy_timeout_ms=20)
    db = Database(engine, attempts=2, base_delay=0.01)
    locker = sqlite3.connect(sqlite_path(app_db), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="probe: database is locked"):
            db.transaction(lambda s: s.execute(text("SELECT 1")).scalar_one(), name="probe")
    finally:
        locker.rollback()
        locker.close()
    assert db.transaction(lambda s: s.execute(text("SELECT 2")).scalar_one(), name="p") == 2
    db.dispose()


def test_the_code_expects_the_newest_migration() -> None:
    from daemon.database import SCHEMA_REVISION

    assert head_revision() == SCHEMA_REVISION


def test_a_killed_postgresql_connection_is_replaced_and_the_unit_retried(
    postgres_url: str,
) -> None:
    db = Database(make_engine(postgres_url), attempts=5, base_delay=0.05)
    pid = db.transaction(
        lambda s: s.execute(text("SELECT pg_backend_pid()")).scalar_one(), name="pid"
    )
    admin = make_engine(postgres_url)
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()
    admin.dispose()
    # the pooled connection is dead; pre-ping or the retry must replace it transparently
    new_pid = db.transaction(
        lambda s: s.execute(text("SELECT pg_backend_pid()")).scalar_one(), name="pid"
    )
    assert new_pid != pid
    db.dispose()


def test_a_connection_killed_mid_transaction_rolls_back_and_retries(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    migrate(engine)
    db = Database(engine, attempts=5, base_delay=0.05)
    calls = []

    def unit(session: Session) -> int:
        calls.append(1)
        session.execute(
            runs.insert().values(
                id=f"r{len(calls)}",
                instance="i",
                started_at=text("now()"),
                heartbeat_at=text("now()"),
                outcome="running",
            )
        )
        if len(calls) == 1:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            killer = make_engine(postgres_url)
            with killer.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                conn.commit()
            killer.dispose()
            session.execute(text("SELECT 1"))  # fails: the backend is gone
        return len(calls)

    with capture_logs() as logs:
        assert db.transaction(unit, name="write") == 2
    assert any(e["event"] == "database_retry" for e in logs)
    ids = db.transaction(lambda s: s.execute(select(runs.c.id)).scalars().all(), name="read")
    assert ids == ["r2"]  # the first attempt's insert was rolled back with its connection
    db.dispose()
