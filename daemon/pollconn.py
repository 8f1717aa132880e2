"""The connection the control poll keeps: what an idle daemon spends its CPU on, made cheap.

Between cycles a daemon does little but publish its row in `sync_instances` and read
`sync_control`, every `control.POLL_SECONDS`. As an ordinary unit of work (an ORM session
on a connection checked out of the pool, with the pool's pre-ping round trip on
PostgreSQL) one poll cost about 1 ms of CPU on SQLite and 1.7 ms on PostgreSQL: most of
an idle daemon's cost. Run as Core statements on one connection kept for the purpose, it
costs a fifth to a half of that (docs/performance.md, "Idle cost and scale-out").

Failures are not handled here, only noticed: a unit that fails closes the connection and
`run` returns None, so that the caller runs the unit the ordinary way
(`Database.transaction`: a fresh pooled connection, retries with backoff, schema errors
told apart). An outage therefore looks to the daemon as it did before, and the next
poll opens a new connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from daemon.errors import StoreError

T = TypeVar("T")


class PollConnection:
    """One connection, opened on first use, used from the database thread only."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Connection | None = None
        self.last_error: SQLAlchemyError | StoreError | None = None  # of the last `run`

    def run(self, unit: Callable[[Connection], T | None]) -> T | None:
        """`unit` in one transaction on the kept connection; None if it gave none or failed.

        A None from `unit` rolls the transaction back: the caller then does the work the
        ordinary way (such as inserting a row that was missing). On PostgreSQL each
        statement commits on its own (see `_connect`): `unit` must not need them atomic.
        """
        self.last_error = None
        try:
            if self._connection is None:
                self._connection = self._connect()
            with self._connection.begin() as transaction:
                result = unit(self._connection)
                if result is None:
                    transaction.rollback()
                return result
        except (SQLAlchemyError, StoreError) as exc:  # StoreError: SQLite's file check
            self.last_error = exc
            self.close(broken=True)
            return None

    def _connect(self) -> Connection:
        connection = self._engine.connect()
        if self._engine.dialect.name == "postgresql":
            # The usual poll is one statement (daemon.control): in autocommit it is one
            # round trip, without BEGIN and COMMIT around it. SQLite keeps its
            # transaction: BEGIN IMMEDIATE there is the write lock and the file check.
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        return connection

    def close(self, *, broken: bool = False) -> None:
        """Give the connection back (the engine's dispose then closes it); idempotent.

        A `broken` one (after an error) is discarded instead: it may be dead.
        """
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with contextlib.suppress(SQLAlchemyError):
            if broken:
                connection.invalidate()
            connection.close()
