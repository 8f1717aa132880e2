"""The database every client works on: a users table with `due` never-synced users.

Before each client's run the same users are made due again and the daemon's history
is emptied, so that every run of every client starts from the same rows.
"""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, delete, func, insert, inspect, select, update

from bench.procs import BenchError, base_environment, daemon_command
from daemon import settings as settings_module
from daemon.database import make_engine
from daemon.demo import users_table
from daemon.models import operations, runs, user_state
from daemon.settings import Settings

INSERT_CHUNK = 50_000


def daemon_environment(
    database_url: str, backend_url: str | None = None, concurrency: int = 32
) -> dict[str, str]:
    """What the daemon runs with: only these SYNC_* variables, INFO lines as JSON."""
    env = base_environment()
    env.update(
        {
            "SYNC_DATABASE_URL": database_url,
            "SYNC_CONCURRENCY": str(concurrency),
            "SYNC_STATUS_ADDRESS": "off",  # empty would mean the default address
            "SYNC_LOG_FORMAT": "json",
            "SYNC_LOG_LEVEL": "INFO",  # user_synced lines are INFO
        }
    )
    if backend_url is not None:
        env["SYNC_BACKEND_URL"] = backend_url
    return env


class Workload:
    """The users table and the daemon's tables of one bench database."""

    def __init__(self, database_url: str, due: int, table_size: int) -> None:
        self.database_url = database_url
        self.due = due
        self.table_size = table_size
        self.settings: Settings = settings_module.load(daemon_environment(database_url))
        self.engine: Engine = make_engine(database_url)
        self._table = users_table(self.settings)
        self._id = self._table.c[self.settings.user_id_column]
        self._last_sync = self._table.c[self.settings.last_sync_column]

    @classmethod
    def sqlite(cls, workdir: Path, due: int, table_size: int) -> Workload:
        return cls(f"sqlite:///{workdir / 'bench.db'}", due, table_size)

    def create(self, *, scratch_check: bool) -> float:
        """Migrate, create and fill the users table; return the seconds it took."""
        started = time.monotonic()
        if scratch_check:
            self._refuse_used_database()
        done = subprocess.run(
            daemon_command("migrate"),
            env=daemon_environment(self.database_url),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"migrate exited with {done.returncode}: {done.stderr[-2000:]}")
        self._table.metadata.create_all(self.engine)
        fresh = self._now()
        id_col, email_col = self.settings.user_id_column, self.settings.user_email_column
        last_col = self.settings.last_sync_column
        for first in range(1, self.table_size + 1, INSERT_CHUNK):
            last = min(first + INSERT_CHUNK, self.table_size + 1)
            rows = [
                {id_col: n, email_col: f"user{n}@example.com", last_col: None}
                if n <= self.due
                else {id_col: n, email_col: f"user{n}@example.com", last_col: fresh}
                for n in range(first, last)
            ]
            with self.engine.begin() as conn:
                conn.execute(insert(self._table), rows)
        return time.monotonic() - started

    def _refuse_used_database(self) -> None:
        names = set(inspect(self.engine).get_table_names())
        clash = names & {self.settings.users_table, "sync_user_state", "sync_runs"}
        if clash:
            raise BenchError(
                f"the database already has {', '.join(sorted(clash))}; point --database-url "
                "at an empty scratch database (the bench drops nothing)"
            )

    def _now(self) -> datetime:
        """Now, UTC, in the form the demo table's naive DateTime column stores."""
        return datetime.now(UTC).replace(tzinfo=None)

    def make_due(self) -> None:
        """Users 1..due never synced again; the daemon's leases and history forgotten."""
        with self.engine.begin() as conn:
            conn.execute(
                update(self._table).where(self._id <= self.due).values({self._last_sync.name: None})
            )
            conn.execute(delete(user_state))
            conn.execute(delete(operations))
            conn.execute(delete(runs))

    def make_fresh(self) -> None:
        """Nothing due: what a start-up baseline runs against."""
        with self.engine.begin() as conn:
            conn.execute(
                update(self._table)
                .where(self._id <= self.due)
                .values({self._last_sync.name: self._now()})
            )

    def unsynced(self) -> int:
        """Due users whose last_sync did not move."""
        query = (
            select(func.count())
            .select_from(self._table)
            .where(self._id <= self.due, self._last_sync.is_(None))
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def dispose(self) -> None:
        self.engine.dispose()
