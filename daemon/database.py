"""Engine, sessions and migrations: how the daemon talks to SQLite and PostgreSQL.

Every unit of work is one short transaction in its own session. A failing statement rolls
the whole transaction back, the connection goes back to the pool (or is discarded if the
database dropped it), and the unit is retried with backoff, so the next unit starts from a
clean, usable session whatever happened to the last one.
"""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from daemon import dberrors
from daemon.errors import ConfigError, SchemaError, StoreError
from daemon.logs import get_logger
from daemon.settings import Settings

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 10_000
# Its own name, so it never collides with an application that uses Alembic itself.
VERSION_TABLE = "background_sync_alembic_version"
# The schema revision this code needs (a test keeps it equal to Alembic's head).
SCHEMA_REVISION = "0003"


def make_engine(
    url: str,
    *,
    prepared_statements: bool = True,
    sqlite_busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
) -> Engine:
    """An engine tuned for its dialect: WAL and write-intent transactions for SQLite.

    `prepared_statements=False` stops psycopg from preparing statements on the server
    (it does after five uses of one): behind pgbouncer in transaction pooling mode the
    next transaction may run on another server connection, where that statement is
    unknown, or known under the same name with other parameters.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        file = None
        if database and database != ":memory:" and not database.startswith("file:"):
            file = SqliteFile(Path(database))
            file.open()
        engine = create_engine(
            url,
            connect_args={"timeout": sqlite_busy_timeout_ms / 1000, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_on_connect(sqlite_busy_timeout_ms, file))
        event.listen(engine, "begin", _sqlite_on_begin(file))
        if file is not None:
            _SQLITE_FILES[engine] = file
        return engine
    connect_args: dict[str, Any] = {"connect_timeout": 5, "application_name": "background-sync"}
    # An option given in the URL wins over these defaults.
    connect_args = {key: value for key, value in connect_args.items() if key not in parsed.query}
    if not prepared_statements:
        connect_args["prepare_threshold"] = None
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=4,
        pool_timeout=10,
        connect_args=connect_args,
    )


def engine_for(settings: Settings) -> Engine:
    """The engine for the configured database, with the configured driver options."""
    return make_engine(
        settings.database_url, prepared_statements=settings.database_prepared_statements
    )


class SqliteFile:
    """The SQLite file the daemon works on, known by its identity (device and inode).

    SQLite keeps writing to a file it has open even after the file, or its directory, was
    deleted or replaced: commits succeed, and every sync recorded from then on is lost
    with the deleted inode. Comparing the path's identity with the one seen at start,
    before every transaction and in the daemon's main loop, turns that into an error.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None

    def open(self) -> None:
        """Create the directory and the file if missing; an unusable path is a ConfigError."""
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"SYNC_DATABASE_URL: {parent} is not a directory") from None
        except OSError as exc:
            raise ConfigError(
                f"SYNC_DATABASE_URL: cannot create the directory {parent}: {exc.strerror}"
            ) from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"SYNC_DATABASE_URL: cannot open {self.path} for writing: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"SYNC_DATABASE_URL: the directory {parent} is not writable "
                "(SQLite keeps its -wal and -shm files beside the database)"
            )
        self._identity = (info.st_dev, info.st_ino)

    def problem(self) -> str | None:
        """Why the file at the path is no longer the one opened at start, if it is not."""
        try:
            info = os.stat(self.path)
        except OSError as exc:
            return f"the database file {self.path} is gone ({exc.strerror})"
        if (info.st_dev, info.st_ino) != self._identity:
            return f"the database file {self.path} was replaced by another file"
        return None

    def check(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise StoreError(problem)


_SQLITE_FILES: weakref.WeakKeyDictionary[Engine, SqliteFile] = weakref.WeakKeyDictionary()


def sqlite_file(engine: Engine) -> SqliteFile | None:
    """The file an SQLite engine from make_engine() watches; None for other databases."""
    return _SQLITE_FILES.get(engine)


def _sqlite_on_connect(busy_timeout_ms: int, file: SqliteFile | None) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        if file is not None:
            file.check()  # never open a new, empty file where the old one was
        # Take transaction control away from pysqlite so that BEGIN IMMEDIATE below is
        # ours: a write transaction then holds the write lock from its first statement,
        # and a concurrent writer waits on busy_timeout instead of failing at commit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return on_connect


def _sqlite_on_begin(file: SqliteFile | None) -> Callable[[Any], None]:
    def on_begin(connection: Any) -> None:
        if file is not None:
            file.check()  # a write to a deleted file would be lost: refuse it
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return on_begin


def dialect_insert(dialect: str) -> Any:
    """The dialect's INSERT, which has ON CONFLICT; PostgreSQL's imported only when used
    (its dialect package costs a noticeable part of every start)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything the daemon stores is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


_SQLITE_SCHEMA_ERRORS = ("no such table", "no such column", "has no column named")


def is_schema_error(exc: BaseException) -> bool:
    """A statement the database refuses for the tables' shape or rights, not for an outage.

    PostgreSQL's SQLSTATE class 42 (undefined column, table or operator, a type mismatch,
    insufficient privilege); SQLite's "no such table/column". Retrying cannot help: the
    configuration or the schema has to change.
    """
    if not isinstance(exc, DBAPIError) or exc.connection_invalidated:
        return False
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("42")
    message = str(orig).lower()
    return any(marker in message for marker in _SQLITE_SCHEMA_ERRORS)


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: a lost connection, a locked or unreachable database."""
    if is_schema_error(exc) or dberrors.configuration_problem(exc) is not None:
        return False  # the same answer on every try: a setting or the schema must change
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class Database:
    """Owns the engine and runs units of work with rollback and bounded retry."""

    def __init__(
        self,
        engine: Engine,
        *,
        attempts: int = 5,
        base_delay: float = 0.2,
        max_delay: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._sleep = sleep
        self._log = get_logger(component="database")
        # Set at shutdown: a unit in progress gets no further retries.
        self.closing = threading.Event()

    def transaction(self, unit: Callable[[Session], T], *, name: str) -> T:
        """Run `unit` in one transaction; retry transient errors with backoff."""
        for attempt in range(1, self._attempts + 1):
            try:
                with self._sessions.begin() as session:
                    return unit(session)
            except DBAPIError as exc:
                if is_schema_error(exc):
                    raise SchemaError(f"{name}: {short_error(exc)}") from exc
                if not is_transient(exc) or attempt == self._attempts or self.closing.is_set():
                    raise StoreError(f"{name}: {short_error(exc)}") from exc
                delay = random.uniform(0, min(self._max_delay, self._base_delay * 2**attempt))
                self._log.warning(
                    "database_retry",
                    unit=name,
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    error=short_error(exc),
                )
                self._sleep(delay)
        raise AssertionError("unreachable")

    def ping(self) -> None:
        """Raise StoreError unless the database answers a trivial query."""
        self.transaction(lambda s: s.execute(text("SELECT 1")).scalar_one(), name="ping")

    def dispose(self) -> None:
        self.engine.dispose()


def migrate(engine: Engine) -> str | None:
    """Bring the daemon's tables to the newest revision; return that revision."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("daemon") / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (read directly: importing Alembic is slow)."""
    if not inspect(engine).has_table(VERSION_TABLE):
        return None
    with engine.connect() as connection:
        return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def head_revision() -> str | None:
    """The newest revision this version of the daemon ships."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(resources.files("daemon") / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head()


def has_daemon_tables(engine: Engine) -> bool:
    return inspect(engine).has_table("sync_user_state")


def short_error(exc: BaseException) -> str:
    """One line of a database error, without SQLAlchemy's long background links."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
