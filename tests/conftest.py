"""Fixtures shared by every level: settings, a real SQLite file, the reference backend."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import MetaData, Table, create_engine, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from daemon import demo, schema
from daemon import settings as settings_module
from daemon.database import Database, make_engine, migrate
from daemon.models import user_state
from daemon.reference_backend import Faults, start_server
from daemon.settings import Settings
from daemon.store import Store
from tests.waiting import wait_until

SettingsFactory = Callable[..., Settings]


POSTGRES_ADMIN_URL = os.environ.get(
    "SYNC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of this test run's own on the machine's PostgreSQL, dropped afterwards.

    Unreachable PostgreSQL is an error, never a skip: these tests are part of the suite.
    """
    name = f"bsync_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is required: {exc}", pytrace=False)
    try:
        yield str(make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False))
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_database: str) -> Iterator[str]:
    """A fresh schema per test, first on the search path of every connection."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    # No pool: a test may terminate every connection to the database on purpose.
    engine = create_engine(postgres_database, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    yield f"{postgres_database}?options=-csearch_path%3D{schema}"
    _drop_schema(engine, schema)
    engine.dispose()


def _drop_schema(engine: Engine, schema: str) -> None:
    """Drop a test's schema; the session of a process killed with -9 may still hold a
    lock for a moment (a deadlock or lock timeout then), so try again a few times."""
    for attempt in range(5):
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SET lock_timeout = '10s'")
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            return
        except OperationalError:
            if attempt == 4:
                raise
            time.sleep(0.5)


@dataclass
class PgBouncer:
    """pgbouncer in transaction pooling mode in front of the test PostgreSQL."""

    port: int
    log: Path

    def url(self, database: str) -> str:
        """A URL for `database` through pgbouncer (which forwards any database name)."""
        admin = make_url(POSTGRES_ADMIN_URL)
        url = admin.set(host="127.0.0.1", port=self.port, database=database)
        return str(url.render_as_string(False))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unprivileged_user() -> str:
    """pgbouncer refuses to run as root; `-u` names the user it switches to."""
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    pytest.fail("running as root, but neither user postgres nor nobody exists", pytrace=False)


@pytest.fixture(scope="session")
def pgbouncer(postgres_database: str) -> Iterator[PgBouncer]:
    """pgbouncer (pool_mode=transaction, 2 server connections per database) on a free port.

    As deployed in front of PostgreSQL: server connections are shared between clients
    transaction by transaction. A missing pgbouncer is an error, never a skip.
    """
    binary = shutil.which("pgbouncer") or shutil.which("/usr/sbin/pgbouncer")
    if binary is None:
        pytest.fail("pgbouncer is required (apt-get install pgbouncer)", pytrace=False)
    admin = make_url(POSTGRES_ADMIN_URL)
    # Readable by the user pgbouncer switches to: not under pytest's private tmp dir.
    directory = Path(tempfile.mkdtemp(prefix="bs-pgbouncer-"))
    directory.chmod(0o755)
    port = _free_port()
    config = directory / "pgbouncer.ini"
    users = directory / "userlist.txt"
    users.write_text(f'"{admin.username}" ""\n')
    config.write_text(
        "[databases]\n"
        f"* = host={admin.host or '127.0.0.1'} port={admin.port or 5432}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {users}\n"
        "pool_mode = transaction\n"
        "default_pool_size = 2\n"
        "max_client_conn = 200\n"
        # pgbouncer cannot forward these per client; see docs/operations.md
        "ignore_startup_parameters = extra_float_digits,options\n"
    )
    for path in (config, users):
        path.chmod(0o644)
    log = directory / "pgbouncer.log"
    command = [binary, str(config)]
    if os.geteuid() == 0:
        command[1:1] = ["-u", _unprivileged_user()]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    bouncer = PgBouncer(port, log)

    def accepts() -> bool:
        if process.poll() is not None:
            pytest.fail(f"pgbouncer exited with {process.returncode}:\n{log.read_text()}")
        probe = create_engine(
            bouncer.url(str(make_url(postgres_database).database)), poolclass=NullPool
        )
        try:
            with probe.connect() as conn:
                return conn.exec_driver_sql("SELECT 1").scalar() == 1
        except OperationalError:
            return False
        finally:
            probe.dispose()

    try:
        wait_until(accepts, what="pgbouncer to accept connections", describe=log.read_text)
        yield bouncer
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class BouncedDatabase:
    """A fresh database of its own, reachable directly and through pgbouncer."""

    direct_url: str
    bouncer_url: str


@pytest.fixture
def pgbouncer_database(pgbouncer: PgBouncer) -> Iterator[BouncedDatabase]:
    """A database per test: pgbouncer does not pass `options`, so no per-test schema."""
    name = f"bsync_pgb_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    direct = str(make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False))
    try:
        yield BouncedDatabase(direct, pgbouncer.url(name))
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sync.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def make_settings(database_url: str) -> SettingsFactory:
    """Settings from a SYNC_* mapping, with test-friendly defaults."""

    def make(**env: str) -> Settings:
        base = {
            "SYNC_DATABASE_URL": database_url,
            "SYNC_STATUS_ADDRESS": "",
            "SYNC_RETRY_DELAY_SECONDS": "0.01",
            "SYNC_REQUEST_TIMEOUT_SECONDS": "5",
            "SYNC_LOG_FORMAT": "json",
            "SYNC_JITTER_SECONDS": "0",
        }
        return settings_module.load(base | env)

    return make


@dataclass
class AppDatabase:
    """The application's database as a test sees it: a users table and the daemon's."""

    settings: Settings
    db: Database
    users: Table

    def seed(self, count: int, *, last_sync: datetime | None = None) -> None:
        demo.seed(self.db.engine, self.settings, count, last_sync=last_sync)

    def last_syncs(self) -> dict[int, datetime | None]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(self.users.c.id, self.users.c.last_sync)).all()
        return {row[0]: _utc(row[1]) for row in rows}

    def set_last_sync(self, user_id: int, value: datetime | None) -> None:
        naive = value.astimezone(UTC).replace(tzinfo=None) if value else None
        with self.db.engine.begin() as conn:
            conn.execute(
                update(self.users).where(self.users.c.id == user_id).values(last_sync=naive)
            )

    def let_time_pass(self, seconds: float) -> None:
        """As if `seconds` passed on the database's clock, which leases and backoff run on:
        every lease expiry and backoff moves back by that much."""
        s = user_state.c
        shift = timedelta(seconds=seconds)
        with self.db.engine.begin() as conn:
            rows = conn.execute(select(s.user_key, s.lease_expires_at, s.next_attempt_at)).all()
            for key, expires, backoff in rows:
                conn.execute(
                    update(user_state)
                    .where(s.user_key == key)
                    .values(
                        lease_expires_at=expires - shift if expires else None,
                        next_attempt_at=backoff - shift if backoff else None,
                    )
                )

    def store(self, *, instance: str = "test-instance", lease_seconds: float = 60) -> Store:
        users = schema.inspect_users(self.db.engine, self.settings)
        return Store(self.db, users, instance=instance, lease_seconds=lease_seconds)


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@pytest.fixture
def app_db(make_settings: SettingsFactory) -> Iterator[AppDatabase]:
    """A fresh SQLite file with the daemon's tables and an empty users table."""
    settings = make_settings()
    engine = make_engine(settings.database_url)
    migrate(engine)
    demo.users_table(settings).metadata.create_all(engine)
    db = Database(engine, base_delay=0.01)
    yield AppDatabase(settings, db, Table("users", MetaData(), autoload_with=engine))
    db.dispose()


class ReferenceBackend:
    """The bundled backend on a free 127.0.0.1 port, with its fault switches."""

    def __init__(self, port: int, session: aiohttp.ClientSession) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/api/v1/sync/start"
        self._session = session

    async def faults(self, **faults: Any) -> None:
        async with self._session.put(f"{self.base}/_control/faults", json=faults) as response:
            assert response.status == 200, await response.text()

    async def stats(self) -> dict[str, Any]:
        async with self._session.get(f"{self.base}/_control/stats") as response:
            return dict(await response.json())


@pytest.fixture
async def backend() -> AsyncIterator[ReferenceBackend]:
    runner, port = await start_server("127.0.0.1", 0, faults=Faults())
    async with aiohttp.ClientSession() as session:
        yield ReferenceBackend(port, session)
    await runner.cleanup()


@pytest.fixture
async def token_backend(tmp_path: Path) -> AsyncIterator[tuple[ReferenceBackend, Path]]:
    token = "s3cr3t-token-7f2c9e"
    path = tmp_path / "backend-token"
    path.write_text(token + "\n")
    runner, port = await start_server("127.0.0.1", 0, faults=Faults(), token=token)
    async with aiohttp.ClientSession() as session:
        yield ReferenceBackend(port, session), path
    await runner.cleanup()


@pytest.fixture(scope="session")
def httpbin_url() -> Iterator[str]:
    """httpbin (a real third-party HTTP server) on a free 127.0.0.1 port, in a thread.

    A backend the project did not write: its redirects, gzip and status answers are
    what the world's servers send, not what our reference backend thinks they send.
    """
    from httpbin import app  # imported here: only the tests that use it pay for Flask
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="httpbin", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def app_settings(tmp_path: Path, backend: ReferenceBackend, users: int = 5, **env: str) -> Settings:
    """Settings of an in-process App on a migrated SQLite file with `users` demo users."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    settings = settings_module.load(
        {
            "SYNC_DATABASE_URL": url,
            "SYNC_BACKEND_URL": backend.url,
            "SYNC_STATUS_ADDRESS": "127.0.0.1:0",
            "SYNC_JITTER_SECONDS": "0",
            "SYNC_RETRY_DELAY_SECONDS": "0.01",
            "SYNC_INTERVAL_SECONDS": "3600",
            "SYNC_LOG_FORMAT": "json",
        }
        | env
    )
    engine = make_engine(url)
    migrate(engine)
    demo.seed(engine, settings, users)
    engine.dispose()
    return settings
