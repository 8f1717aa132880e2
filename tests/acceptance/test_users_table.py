"""The daemon as a process against users tables shaped as applications shape them.

Each table is made with plain SQL, as the application's own migrations would make it; the
daemon is `python -m daemon` (once, run, check-config) with the reference backend.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from tests.acceptance.conftest import Harness
from tests.waiting import wait_until


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Engine]:
    engine = create_engine(postgres_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def sql(engine: Engine, *statements: str) -> list[Any]:
    with engine.begin() as conn:
        result = [conn.execute(text(s)) for s in statements]
        return result[-1].all() if result[-1].returns_rows else []


def prepared(harness: Harness, engine: Engine, url: str, ddl: str, *inserts: str) -> None:
    """The application's table, then the daemon's own tables beside it."""
    sql(engine, ddl, *inserts)
    migrated = harness.cli("migrate", env=harness.env(SYNC_DATABASE_URL=url))
    assert migrated.returncode == 0, migrated.stderr


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("id_type", "ids"),
    [
        ("uuid", ["'00000000-0000-0000-0000-00000000000a'", "gen_random_uuid()"]),
        ("numeric(20,0)", ["12345678901234567890", "7"]),
    ],
)
def test_once_syncs_a_table_keyed_by_a_non_integer_id_on_postgresql(
    id_type: str, ids: list[str], harness: Harness, pg: Engine, postgres_url: str
) -> None:
    """A uuid or numeric(20,0) key: every user synced, ids sent as text, no run left open."""
    rows = ", ".join(f"({value}, 'u{n}@example.com', NULL)" for n, value in enumerate(ids))
    prepared(
        harness,
        pg,
        postgres_url,
        f"CREATE TABLE users (id {id_type} PRIMARY KEY, email text, last_sync timestamptz)",
        f"INSERT INTO users VALUES {rows}",
    )
    backend = harness.start_backend()
    done = harness.cli("once", env=harness.env(backend, SYNC_DATABASE_URL=postgres_url))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert sql(pg, "SELECT count(*) FROM users WHERE last_sync IS NULL") == [(0,)]
    assert sql(pg, "SELECT outcome FROM sync_runs") == [("succeeded",)]
    keys = sorted(backend.stats()["per_user_calls"])
    assert keys == sorted(str(r[0]) for r in sql(pg, "SELECT id FROM users"))


def test_once_keeps_a_unix_epoch_last_sync_as_unix_epoch(harness: Harness) -> None:
    """Integers stay integers, and a user synced ten minutes ago is not called again."""
    path = harness.tmp / "app.db"
    now = int(time.time())
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, last_sync INTEGER)")
        conn.execute(
            "INSERT INTO users VALUES (1, 'a@x', ?), (2, 'b@x', ?), (3, 'c@x', NULL)",
            (now - 600, now - 7200),
        )
    url = f"sqlite:///{path}"
    assert harness.cli("migrate", env=harness.env(SYNC_DATABASE_URL=url)).returncode == 0
    backend = harness.start_backend()
    done = harness.cli("once", env=harness.env(backend, SYNC_DATABASE_URL=url))
    assert done.returncode == 0, done.stderr
    assert sorted(backend.stats()["per_user_calls"]) == ["2", "3"]
    with sqlite3.connect(path) as conn:
        stored = conn.execute("SELECT id, typeof(last_sync), last_sync FROM users").fetchall()
    assert [kind for _, kind, _ in stored] == ["integer"] * 3
    assert stored[0][2] == now - 600
    assert all(value >= now for _, _, value in stored[1:])


def test_check_config_names_the_missing_index_with_the_statement_to_run(
    harness: Harness,
) -> None:
    path = harness.tmp / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, last_sync DATETIME)")
    env = harness.env(SYNC_DATABASE_URL=f"sqlite:///{path}")
    checked = harness.cli("check-config", env=env)
    assert checked.returncode == 0, checked.stderr
    statement = "CREATE INDEX ix_users_last_sync_id ON users (last_sync, id);"
    assert statement in checked.stderr
    assert len(checked.stderr.splitlines()) == 1
    with sqlite3.connect(path) as conn:
        conn.execute(statement)
    checked = harness.cli("check-config", env=env)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_check_config_never_creates_a_missing_sqlite_database(harness: Harness) -> None:
    path = harness.tmp / "nowhere" / "app.db"
    checked = harness.cli("check-config", env=harness.env(SYNC_DATABASE_URL=f"sqlite:///{path}"))
    assert checked.returncode == 0, checked.stderr
    assert not path.parent.exists()


@pytest.mark.postgres
def test_a_text_last_sync_on_postgresql_stops_run_with_78_naming_the_setting(
    harness: Harness, pg: Engine, postgres_url: str
) -> None:
    prepared(
        harness,
        pg,
        postgres_url,
        "CREATE TABLE users (id integer PRIMARY KEY, email text, last_sync text)",
        "INSERT INTO users VALUES (1, 'a@x', NULL)",
    )
    daemon = harness.start_daemon(
        harness.env(harness.start_backend(), SYNC_DATABASE_URL=postgres_url)
    )
    assert daemon.wait_exit() == 78
    errors = [line.text for line in daemon.lines("stderr")]
    assert errors == [
        "background-sync: SYNC_LAST_SYNC_COLUMN: users.last_sync is of type TEXT; the daemon "
        "needs a timestamp column (timestamp with time zone, or timestamp in UTC)"
    ]


@pytest.mark.postgres
def test_an_id_type_changed_under_a_running_daemon_ends_it_with_78_not_an_outage(
    harness: Harness, pg: Engine, postgres_url: str
) -> None:
    """`operator does not exist` is a configuration problem: unhealthy, then exit 78."""
    prepared(
        harness,
        pg,
        postgres_url,
        "CREATE TABLE users (id integer PRIMARY KEY, email text, last_sync timestamptz)",
        "INSERT INTO users SELECT n, 'u' || n || '@x', NULL FROM generate_series(1, 40) n",
    )
    backend = harness.start_backend(latency_ms=300)
    env = harness.env(backend, SYNC_DATABASE_URL=postgres_url, SYNC_CONCURRENCY=4)
    daemon = harness.start_daemon(env)
    daemon.wait_for_event("user_synced")
    # The application changes its key's type while users are claimed and in flight.
    sql(pg, "ALTER TABLE users ALTER COLUMN id TYPE text USING id::text")
    assert daemon.wait_exit() == 78, daemon.tail()
    assert daemon.events("schema_error")
    assert not daemon.events("database_degraded")
    assert not daemon.events("cycle_crashed")
    stderr = [line.text for line in daemon.lines("stderr")]
    assert len(stderr) == 1 and stderr[0].startswith("background-sync: SYNC_USERS_TABLE: ")
    assert "operator does not exist" in stderr[0]
    # Leases stay only for calls whose success could not be written; they expire by themselves.
    (unrecorded,) = daemon.events("results_not_recorded") or [{"count": 0}]
    held = sql(pg, "SELECT count(*) FROM sync_user_state WHERE lease_owner IS NOT NULL")
    assert held == [(unrecorded["count"],)]


@pytest.mark.postgres
def test_run_syncs_a_schema_qualified_users_table(
    harness: Harness, pg: Engine, postgres_url: str
) -> None:
    space = f"app_{harness.tmp.name[-8:].lower().replace('-', '_')}"
    sql(pg, f'CREATE SCHEMA "{space}"')
    try:
        prepared(
            harness,
            pg,
            postgres_url,
            f'CREATE TABLE "{space}".users (id bigint PRIMARY KEY, email text, '
            "last_sync timestamp)",
            f"""INSERT INTO "{space}".users VALUES (1, 'a@x', NULL), (2, 'b@x', NULL)""",
        )
        backend = harness.start_backend()
        env = harness.env(
            backend, SYNC_DATABASE_URL=postgres_url, SYNC_USERS_TABLE=f"{space}.users"
        )
        daemon = harness.start_daemon(env)
        finished = daemon.wait_for_event("cycle_finished")
        assert (finished["outcome"], finished["succeeded"]) == ("succeeded", 2)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
        wait_until(
            lambda: (
                sql(pg, f'SELECT count(*) FROM "{space}".users WHERE last_sync IS NULL') == [(0,)]
            ),
            what="both users synced",
        )
    finally:
        sql(pg, f'DROP SCHEMA "{space}" CASCADE')
