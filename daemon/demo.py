"""Demo data: an application users table, as the demo, tests and benchmarks need it.

The daemon itself never creates, alters or drops the application's table; only this
command does, and only when the table is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
)

from daemon.settings import Settings

CHUNK = 10_000


def users_table(settings: Settings) -> Table:
    """The shape a typical application has: integer id, email, nullable last_sync."""
    schema, name = settings.users_table_parts
    return Table(
        name,
        MetaData(),
        Column(settings.user_id_column, Integer, primary_key=True, autoincrement=True),
        Column(settings.user_email_column, String(255), nullable=False),
        Column(settings.last_sync_column, DateTime, nullable=True),
        # Due users are found by last_sync; an application should have this index too.
        Index(
            f"ix_{name}_{settings.last_sync_column}",
            settings.last_sync_column,
            settings.user_id_column,
        ),
        schema=schema,
    )


def seed(
    engine: Engine, settings: Settings, users: int, *, last_sync: datetime | None = None
) -> int:
    """Create the table if missing and top it up to `users` rows; return how many added."""
    table = users_table(settings)
    table.metadata.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        have = conn.execute(select(func.count()).select_from(table)).scalar_one()
        start = int(have)
    added = 0
    for chunk in _chunks(range(start + 1, users + 1)):
        rows = [
            {
                settings.user_email_column: f"user{n}@example.com",
                settings.last_sync_column: last_sync,
            }
            for n in chunk
        ]
        with engine.begin() as conn:
            conn.execute(insert(table), rows)
        added += len(rows)
    return added


def _chunks(numbers: range) -> Iterator[range]:
    for first in range(numbers.start, numbers.stop, CHUNK):
        yield range(first, min(first + CHUNK, numbers.stop))
