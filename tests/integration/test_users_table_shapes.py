"""The application's users table in the shapes real applications give it.

Every test builds the table with the application's own DDL (not the demo's), runs real
cycles against a real aiohttp backend on 127.0.0.1, and reads the rows back with plain SQL,
so what is checked is what the application would find.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import Engine, text

from daemon import schema
from daemon.backend import BackendClient
from daemon.cycle import Cycle, DbRunner
from daemon.database import Database, make_engine, migrate
from daemon.errors import ConfigError
from daemon.settings import Settings
from daemon.store import Store
from daemon.values import Report
from tests.conftest import SettingsFactory


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Capture:
    """A backend that answers 200 and keeps every request body it was sent."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def user_ids(self) -> list[Any]:
        return [body["user_id"] for body in self.bodies]


@pytest.fixture
async def capture() -> AsyncIterator[Capture]:
    seen = Capture()

    async def sync(request: web.Request) -> web.Response:
        seen.bodies.append(json.loads(await request.read()))
        return web.json_response({"synced_items": 1})

    app = web.Application()
    app.router.add_post("/sync", sync)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    seen.url = f"http://127.0.0.1:{port}/sync"
    yield seen
    await runner.cleanup()


@pytest.fixture
def engine(make_settings: SettingsFactory) -> Iterator[Engine]:
    """The test's database with the daemon's tables and no users table yet."""
    made = make_engine(make_settings().database_url)
    migrate(made)
    yield made
    made.dispose()


def dialect(engine: Engine) -> str:
    return engine.dialect.name


def execute(engine: Engine, *statements: str, **params: Any) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement), params)


def rows(engine: Engine, query: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(query))]


async def run_cycle(settings: Settings, engine: Engine) -> Report:
    db = Database(engine, base_delay=0.01)
    runner = DbRunner()
    session = BackendClient.open_session(settings)
    try:
        users = schema.inspect_users(engine, settings)
        store = Store(db, users, instance="shape-test", lease_seconds=settings.lease_seconds)
        client = BackendClient(settings, session)
        return await Cycle(settings, store, client, runner, stop=asyncio.Event()).run()
    finally:
        await session.close()
        runner.close()


# -- ids ------------------------------------------------------------------------------------

ID_TYPES = {
    # name: (PostgreSQL DDL type, SQLite DDL type or None, three ids, how they are sent)
    "integer": ("integer", "INTEGER", [1, 2, 3], [1, 2, 3]),
    "bigint": ("bigint", "BIGINT", [2**40, 2**40 + 1, 2**62], [2**40, 2**40 + 1, 2**62]),
    "numeric": (
        "numeric(20,0)",
        None,
        [Decimal("12345678901234567890"), Decimal("12345678901234567891"), Decimal(7)],
        ["12345678901234567890", "12345678901234567891", "7"],
    ),
    "uuid": (
        "uuid",
        None,
        [uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)],
        [str(uuid.UUID(int=n)) for n in (1, 2, 3)],
    ),
    "text": ("text", "TEXT", ["alice", "bob", "42"], ["alice", "bob", "42"]),
    "varchar": ("varchar(64)", "VARCHAR(64)", ["u-1", "u-2", "u-3"], ["u-1", "u-2", "u-3"]),
}


@pytest.mark.parametrize("kind", list(ID_TYPES))
async def test_every_id_type_syncs_and_is_sent_by_one_rule(
    kind: str, engine: Engine, make_settings: SettingsFactory, capture: Capture
) -> None:
    """Integer ids travel as JSON numbers; numeric, uuid and text ids as their text."""
    pg_type, sqlite_type, ids, sent = ID_TYPES[kind]
    ddl_type = pg_type if dialect(engine) == "postgresql" else sqlite_type
    if ddl_type is None:
        pytest.skip(f"SQLite has no {kind} type")  # the PostgreSQL run covers it
    execute(
        engine,
        f"CREATE TABLE users (id {ddl_type} PRIMARY KEY, email text NOT NULL, "
        "last_sync timestamp NULL)",
    )
    with engine.begin() as conn:
        for n, user_id in enumerate(ids):
            value = str(user_id) if isinstance(user_id, uuid.UUID | Decimal) else user_id
            if dialect(engine) == "sqlite" and isinstance(user_id, Decimal):
                value = int(user_id)
            conn.execute(
                text("INSERT INTO users (id, email) VALUES (:id, :email)"),
                {"id": value, "email": f"user{n}@example.com"},
            )
    settings = make_settings(SYNC_BACKEND_URL=capture.url)
    report = await run_cycle(settings, engine)
    assert (report.outcome, report.succeeded) == ("succeeded", 3), report
    assert sorted(capture.user_ids(), key=str) == sorted(sent, key=str)
    assert all(
        type(got) is type(want)
        for got, want in zip(
            sorted(capture.user_ids(), key=str), sorted(sent, key=str), strict=True
        )
    )
    assert rows(engine, "SELECT count(*) FROM users WHERE last_sync IS NULL") == [(0,)]


# -- last_sync on SQLite: the storage found in the rows ---------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path / 'app.db'}")
    migrate(made)
    yield made
    made.dispose()


@pytest.fixture
def sqlite_settings(sqlite_engine: Engine, make_settings: SettingsFactory) -> Any:
    def make(**env: str) -> Settings:
        return make_settings(SYNC_DATABASE_URL=str(sqlite_engine.url), **env)

    return make


def sqlite_rows(engine: Engine, query: str) -> list[tuple[Any, ...]]:
    path = engine.url.database
    assert path
    with sqlite3.connect(path) as conn:
        return list(conn.execute(query))


def epoch(delta: timedelta) -> int:
    return int((now() - delta).timestamp())


async def test_unix_epoch_last_sync_stays_unix_epoch_and_recent_users_are_not_called(
    sqlite_engine: Engine, sqlite_settings: Any, capture: Capture
) -> None:
    """A column of unix seconds keeps unix seconds; a user synced 10 min ago is left alone."""
    recent = epoch(timedelta(minutes=10))
    execute(
        sqlite_engine,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, last_sync INTEGER)",
        f"INSERT INTO users VALUES (1, 'a@x', {recent}), "
        f"(2, 'b@x', {epoch(timedelta(hours=2))}), (3, 'c@x', NULL)",
    )
    report = await run_cycle(sqlite_settings(SYNC_BACKEND_URL=capture.url), sqlite_engine)
    assert (report.outcome, report.succeeded) == ("succeeded", 2)
    assert sorted(capture.user_ids()) == [2, 3]
    stored = sqlite_rows(sqlite_engine, "SELECT id, typeof(last_sync), last_sync FROM users")
    assert [kind for _, kind, _ in stored] == ["integer"] * 3
    assert all(abs(value - now().timestamp()) < 3600 for _, _, value in stored)
    assert stored[0][2] == recent  # untouched


async def test_unix_milliseconds_stay_milliseconds(
    sqlite_engine: Engine, sqlite_settings: Any, capture: Capture
) -> None:
    execute(
        sqlite_engine,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, last_sync INTEGER)",
        f"INSERT INTO users VALUES (1, 'a@x', {epoch(timedelta(minutes=10)) * 1000}), "
        f"(2, 'b@x', {epoch(timedelta(hours=2)) * 1000})",
    )
    await run_cycle(sqlite_settings(SYNC_BACKEND_URL=capture.url), sqlite_engine)
    assert capture.user_ids() == [2]
    (value,) = sqlite_rows(sqlite_engine, "SELECT last_sync FROM users WHERE id = 2")[0]
    assert isinstance(value, int) and abs(value / 1000 - now().timestamp()) < 60


@pytest.mark.parametrize("suffix", ["+00:00", "Z", ""])
async def test_iso_8601_text_is_found_due_and_written_back_in_its_own_form(
    suffix: str, sqlite_engine: Engine, sqlite_settings: Any, capture: Capture
) -> None:
    """'2026-12-01T05:38:05+00:00' is compared as a time, not as a string, and kept ISO."""

    def iso(delta: timedelta) -> str:
        return (now() - delta).strftime("%Y-%m-%dT%H:%M:%S") + suffix

    execute(
        sqlite_engine,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, last_sync TEXT)",
        f"INSERT INTO users VALUES (1, 'a@x', '{iso(timedelta(minutes=10))}'), "
        f"(2, 'b@x', '{iso(timedelta(hours=2))}'), (3, 'c@x', '{iso(timedelta(hours=3))}')",
    )
    report = await run_cycle(sqlite_settings(SYNC_BACKEND_URL=capture.url), sqlite_engine)
    assert (report.succeeded, sorted(capture.user_ids())) == (2, [2, 3])
    for (value,) in sqlite_rows(sqlite_engine, "SELECT last_sync FROM users"):
        assert value[10] == "T" and value.endswith(suffix), value
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        assert abs((parsed.replace(tzinfo=UTC) - now()).total_seconds()) < 3600


async def test_sqlalchemy_text_without_fraction_is_not_skipped_at_a_page_boundary(
    sqlite_engine: Engine, sqlite_settings: Any, capture: Capture
) -> None:
    """Ties on last_sync across a page boundary are all visited, whatever the stored form."""
    stamp = (now() - timedelta(hours=2)).strftime("%Y-%m-%d %H:%M:%S")
    execute(
        sqlite_engine,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, last_sync DATETIME)",
        *(f"INSERT INTO users VALUES ({n}, 'u{n}@x', '{stamp}')" for n in range(1, 8)),
    )
    settings = sqlite_settings(SYNC_BACKEND_URL=capture.url, SYNC_CLAIM_BATCH_SIZE="3")
    report = await run_cycle(settings, sqlite_engine)
    assert (report.succeeded, sorted(capture.user_ids())) == (7, list(range(1, 8)))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["1764570000", "'2026-12-01 07:38:14'"], "mixes storage classes"),
        (["'2026-12-01 07:38:14'", "'2026-12-01T07:38:14+00:00'"], "cannot order as times"),
        (["'2026-12-01T07:38:14+02:00'", "'2026-12-01T07:38:14+00:00'"], "other than UTC"),
        (["'yesterday'"], "cannot order as times"),
        (["x'00ff'"], "holds blob values"),
    ],
)
def test_last_sync_storage_the_daemon_cannot_order_is_refused_naming_the_setting(
    values: list[str], message: str, sqlite_engine: Engine, sqlite_settings: Any
) -> None:
    execute(
        sqlite_engine,
        # No declared type: SQLite keeps every value in the storage class it came in.
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, last_sync)",
        *(f"INSERT INTO users VALUES ({n}, 'u{n}@x', {v})" for n, v in enumerate(values)),
    )
    with pytest.raises(ConfigError, match=message) as refused:
        schema.inspect_users(sqlite_engine, sqlite_settings())
    assert str(refused.value).startswith("SYNC_LAST_SYNC_COLUMN: users.last_sync")


# -- last_sync on PostgreSQL ------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("pg_type", ["text", "varchar(40)", "date", "bigint"])
def test_a_last_sync_column_that_is_not_a_timestamp_is_a_configuration_error_on_postgresql(
    pg_type: str, postgres_url: str, make_settings: SettingsFactory
) -> None:
    engine = make_engine(postgres_url)
    try:
        execute(
            engine, f"CREATE TABLE users (id integer PRIMARY KEY, email text, last_sync {pg_type})"
        )
        with pytest.raises(ConfigError, match="needs a timestamp column") as refused:
            schema.inspect_users(engine, make_settings(SYNC_DATABASE_URL=postgres_url))
        assert str(refused.value).startswith("SYNC_LAST_SYNC_COLUMN: users.last_sync is")
    finally:
        engine.dispose()


# -- where the table is --------------------------------------------------------------------


async def test_a_schema_qualified_users_table_is_synced(
    engine: Engine, make_settings: SettingsFactory, capture: Capture
) -> None:
    """SYNC_USERS_TABLE=app.users: PostgreSQL's schema, SQLite's attached database name."""
    if dialect(engine) == "postgresql":
        space = f"app_{uuid.uuid4().hex[:8]}"
        execute(engine, f'CREATE SCHEMA "{space}"')
    else:
        space = "main"
    try:
        execute(
            engine,
            f"CREATE TABLE {space}.accounts (id integer PRIMARY KEY, email text, "
            "seen timestamp NULL)",
            f"INSERT INTO {space}.accounts VALUES (1, 'a@x', NULL), (2, 'b@x', NULL)",
        )
        settings = make_settings(
            SYNC_BACKEND_URL=capture.url,
            SYNC_USERS_TABLE=f"{space}.accounts",
            SYNC_LAST_SYNC_COLUMN="seen",
        )
        report = await run_cycle(settings, engine)
        assert (report.succeeded, sorted(capture.user_ids())) == (2, [1, 2])
        assert rows(engine, f"SELECT count(*) FROM {space}.accounts WHERE seen IS NULL") == [(0,)]
    finally:
        if dialect(engine) == "postgresql":
            execute(engine, f'DROP SCHEMA "{space}" CASCADE')


# -- the due scan's index -------------------------------------------------------------------


def advice(engine: Engine, settings: Settings) -> str | None:
    users = schema.inspect_users(engine, settings)
    store = Store(Database(engine), users, instance="advice", lease_seconds=60)
    return store.index_advice(stale_before=now() - timedelta(hours=1), limit=256)


def test_the_due_scan_without_an_index_is_reported_with_the_statement_to_run(
    engine: Engine, make_settings: SettingsFactory
) -> None:
    execute(engine, "CREATE TABLE users (id integer PRIMARY KEY, email text, last_sync timestamp)")
    settings = make_settings()
    statement = advice(engine, settings)
    if dialect(engine) == "postgresql":
        assert statement == (
            "CREATE INDEX CONCURRENTLY ix_users_last_sync_id ON users (last_sync, id);"
        )
    else:
        assert statement == "CREATE INDEX ix_users_last_sync_id ON users (last_sync, id);"
    execute(engine, statement.replace(" CONCURRENTLY", ""))
    assert advice(engine, settings) is None


def test_an_index_on_last_sync_alone_is_enough_only_where_it_orders_ties_by_id(
    engine: Engine, make_settings: SettingsFactory
) -> None:
    """On SQLite an index on last_sync orders ties by rowid; PostgreSQL must still sort."""
    execute(
        engine,
        "CREATE TABLE users (id integer PRIMARY KEY, email text, last_sync timestamp)",
        "CREATE INDEX users_by_last_sync ON users (last_sync)",
    )
    statement = advice(engine, make_settings())
    if dialect(engine) == "postgresql":
        assert statement is not None and "(last_sync, id)" in statement
    else:
        assert statement is None
