"""The control poll's kept connection: cheap when all is well, the ordinary path otherwise.

Between cycles the poll is nearly all an idle daemon does, so it runs on one connection
kept for it. Whatever goes wrong there (no row yet, a connection the server killed, an
SQLite file that was deleted) the poll answers as the ordinary transaction would: the
row gets written, or a StoreError says why not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event, select, text, update

from daemon import control, dbclock
from daemon.database import Database, make_engine, utcnow
from daemon.errors import StoreError
from daemon.models import instances
from daemon.pollconn import PollConnection
from tests.conftest import AppDatabase


def poll(app_db: AppDatabase, connection: PollConnection, state: str = "idle") -> control.Control:
    reported = control.report_instance(
        app_db.db,
        instance="web1",
        started_at=utcnow(),
        now=utcnow(),
        state=state,
        circuit="closed",
        status=f"{state}, next cycle in 5 s",
        connection=connection,
    )
    assert reported.instances == {state: 1}  # the census comes back on the kept connection too
    return reported.control


def row(app_db: AppDatabase) -> tuple[str, str]:
    with app_db.db.engine.connect() as conn:
        found = conn.execute(
            select(instances.c.state, instances.c.status).where(instances.c.instance == "web1")
        ).one()
    return found.state, found.status


def test_polls_after_the_first_take_no_connection_from_the_pool_and_still_see_a_pause(
    app_db: AppDatabase,
) -> None:
    connection = PollConnection(app_db.db.engine)
    poll(app_db, connection)  # the first one inserts the row, the ordinary way
    checkouts: list[object] = []
    event.listen(app_db.db.engine, "checkout", lambda *args: checkouts.append(args))
    control.set_paused(app_db.db, True, by="ops@host", now=utcnow())
    checkouts.clear()

    seen = [poll(app_db, connection, state) for state in ("idle", "paused", "paused")]

    assert checkouts == []
    assert [s.paused for s in seen] == [True, True, True]
    assert seen[-1].updated_by == "ops@host"
    assert row(app_db) == ("paused", "paused, next cycle in 5 s")
    connection.close()


def test_the_heartbeat_of_a_kept_connection_poll_is_the_database_time(
    app_db: AppDatabase,
) -> None:
    connection = PollConnection(app_db.db.engine)
    poll(app_db, connection)
    with app_db.db.engine.begin() as conn:
        conn.execute(update(instances).values(heartbeat_at=dbclock.after(app_db.db.dialect, -600)))

    poll(app_db, connection)

    with app_db.db.engine.connect() as conn:
        fresh = conn.execute(
            select(instances.c.heartbeat_at > dbclock.after(app_db.db.dialect, -60))
        ).scalar_one()
    assert fresh
    connection.close()


def test_a_row_that_was_forgotten_is_written_again(app_db: AppDatabase) -> None:
    connection = PollConnection(app_db.db.engine)
    poll(app_db, connection)
    with app_db.db.engine.begin() as conn:
        conn.execute(instances.delete())

    poll(app_db, connection, "syncing")

    assert row(app_db) == ("syncing", "syncing, next cycle in 5 s")
    connection.close()


@pytest.mark.postgres
def test_a_kept_connection_the_server_killed_is_replaced_and_the_poll_answers(
    postgres_url: str, app_db: AppDatabase
) -> None:
    if app_db.db.dialect != "postgresql":
        pytest.skip("terminating a server connection is PostgreSQL's")
    connection = PollConnection(app_db.db.engine)
    poll(app_db, connection)
    pid = connection.run(lambda conn: conn.execute(text("SELECT pg_backend_pid()")).scalar())
    admin = Database(make_engine(postgres_url))
    admin.transaction(
        lambda s: s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}), name="kill"
    )
    admin.dispose()

    seen = poll(app_db, connection, "syncing")
    again = connection.run(lambda conn: conn.execute(text("SELECT pg_backend_pid()")).scalar())

    assert seen.paused is False
    assert row(app_db) == ("syncing", "syncing, next cycle in 5 s")
    assert again is not None and again != pid
    connection.close()


def test_a_deleted_sqlite_file_fails_the_poll_as_the_ordinary_path_does(
    app_db: AppDatabase,
) -> None:
    if app_db.db.dialect != "sqlite":
        pytest.skip("an SQLite file")
    connection = PollConnection(app_db.db.engine)
    poll(app_db, connection)
    database = app_db.db.engine.url.database
    assert database is not None
    for path in Path(database).parent.glob(Path(database).name + "*"):
        path.unlink()

    with pytest.raises(StoreError, match="is gone"):
        poll(app_db, connection)
    connection.close()
