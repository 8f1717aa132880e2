"""Opening the database: paths that cannot work, driver options, refusals, a lost file."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from daemon import dberrors
from daemon.database import Database, make_engine, sqlite_file
from daemon.errors import ConfigError, StoreError


@pytest.mark.parametrize(
    "path",
    [
        "/etc/hostname/sync.db",  # under a regular file: fails even for root
        "/proc/background-sync/sync.db",  # a directory that cannot be created
        "/proc/sync.db",  # a directory where no file can be created
    ],
)
def test_an_unusable_sqlite_path_is_a_config_error_naming_the_url(path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_engine(f"sqlite:///{path}")
    message = str(caught.value)
    assert message.startswith("SYNC_DATABASE_URL: ")
    assert "\n" not in message


def test_a_missing_sqlite_directory_is_created(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'state' / 'sync.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
    assert (tmp_path / "state" / "sync.db").is_file()


@pytest.mark.parametrize("removal", ["file", "directory"])
def test_a_write_to_a_deleted_sqlite_file_is_refused(tmp_path: Path, removal: str) -> None:
    """SQLite would go on committing to the deleted inode; every such sync would be lost."""
    path = tmp_path / "state" / "sync.db"
    db = Database(make_engine(f"sqlite:///{path}"), attempts=1)
    try:
        db.transaction(lambda s: s.execute(text("CREATE TABLE t (x INTEGER)")), name="create")
        assert sqlite_file(db.engine) is not None
        if removal == "file":
            path.unlink()
        else:
            for leftover in path.parent.iterdir():
                leftover.unlink()
            path.parent.rmdir()

        with pytest.raises(StoreError, match="is gone"):
            db.transaction(lambda s: s.execute(text("INSERT INTO t VALUES (1)")), name="write")
        file = sqlite_file(db.engine)
        assert file is not None
        assert file.problem() is not None
    finally:
        db.dispose()


def test_a_replaced_sqlite_file_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "sync.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        file = sqlite_file(engine)
        assert file is not None and file.problem() is None
        replacement = tmp_path / "restored.db"
        replacement.write_bytes(path.read_bytes())
        os.replace(replacement, path)
        assert "replaced" in (file.problem() or "")
    finally:
        engine.dispose()


def test_prepared_statements_off_reaches_psycopg(postgres_url: str) -> None:
    engine = make_engine(postgres_url, prepared_statements=False)
    try:
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            assert driver.prepare_threshold is None
    finally:
        engine.dispose()
    default = make_engine(postgres_url)
    try:
        with default.connect() as conn:
            assert conn.connection.driver_connection.prepare_threshold == 5
    finally:
        default.dispose()


def test_an_option_in_the_url_wins_over_the_engines_defaults(postgres_url: str) -> None:
    engine = make_engine(f"{postgres_url}&application_name=sync-eu-1")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW application_name")).scalar() == "sync-eu-1"
    finally:
        engine.dispose()


def _connect_error(url: str) -> OperationalError:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with pytest.raises(OperationalError) as caught, engine.connect():
            pass
        return caught.value
    finally:
        engine.dispose()


def test_a_missing_database_or_role_is_a_configuration_problem(postgres_database: str) -> None:
    url = make_url(postgres_database)
    missing_db = _connect_error(url.set(database="no_such_db_here").render_as_string(False))
    assert dberrors.configuration_problem(StoreError("ping")) is None
    wrapped = StoreError("ping: ...")
    wrapped.__cause__ = missing_db
    assert dberrors.configuration_problem(wrapped) == 'database "no_such_db_here" does not exist'
    missing_role = _connect_error(url.set(username="no_such_role").render_as_string(False))
    assert dberrors.configuration_problem(missing_role) == 'role "no_such_role" does not exist'


def test_an_unreachable_server_is_not_a_configuration_problem() -> None:
    refused = _connect_error("postgresql+psycopg://postgres@127.0.0.1:1/app")
    assert dberrors.configuration_problem(refused) is None


def test_a_rejected_password_is_a_configuration_problem() -> None:
    """28P01 as libpq reports it (the test server trusts every local login)."""
    message = (
        'connection failed: connection to server at "10.0.0.5", port 5432 failed: '
        'FATAL:  password authentication failed for user "app"'
    )
    exc = OperationalError("SELECT 1", {}, psycopg.OperationalError(message))
    assert dberrors.configuration_problem(exc) == 'password authentication failed for user "app"'
