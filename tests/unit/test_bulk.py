"""Bulk statements send each row as SQLAlchemy would: same SQL, same converted values."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from daemon.bulk import BulkStatement

_table = Table(
    "t",
    MetaData(),
    Column("key", String(10), primary_key=True),
    Column("n", Integer),
    Column("at", DateTime(timezone=True)),
    Column("seen", DateTime(timezone=True)),
    Column("note", String(10)),
)
# One parameter used twice, one fixed in the statement, one datetime.
_statement = (
    update(_table)
    .where(_table.c.key == bindparam("b_key"))
    .values(
        n=bindparam("b_n", type_=Integer),
        at=bindparam("b_at", type_=_table.c.at.type),
        seen=bindparam("b_at", type_=_table.c.seen.type),
        note="fixed",
    )
)
_ROW = {"b_key": "k1", "b_n": 3, "b_at": datetime(2026, 11, 22, 12, 0, 5, 7, tzinfo=UTC)}


def _sqlalchemys_own(dialect: object, row: dict) -> list:
    compiled = _statement.compile(dialect=dialect)  # type: ignore[arg-type]
    params = compiled.construct_params(row)
    processors = compiled._bind_processors
    names = compiled.positiontup or list(params)
    return [processors[n](params[n]) if n in processors else params[n] for n in names]


def test_sqlite_rows_are_the_positional_values_sqlalchemy_would_send() -> None:
    bulk = BulkStatement(_statement, sqlite.dialect())
    assert bulk.sql == str(_statement.compile(dialect=sqlite.dialect()))
    assert bulk.rows([_ROW]) == [tuple(_sqlalchemys_own(sqlite.dialect(), _ROW))]


def test_postgresql_rows_are_the_named_values_sqlalchemy_would_send() -> None:
    dialect = postgresql.psycopg.dialect()
    bulk = BulkStatement(_statement, dialect)
    (row,) = bulk.rows([_ROW])
    assert list(row.values()) == _sqlalchemys_own(dialect, _ROW)
    assert all(f"%({name})s" in bulk.sql for name in row)


def test_a_row_without_a_required_value_is_refused() -> None:
    bulk = BulkStatement(_statement, sqlite.dialect())
    try:
        bulk.rows([{"b_key": "k1", "b_n": 3}])
    except KeyError as exc:
        assert "b_at" in str(exc)
    else:
        raise AssertionError("a row without b_at was accepted")


def test_sqlite_datetimes_are_the_text_sqlalchemy_stores() -> None:
    processor = (
        DateTime(timezone=True).dialect_impl(sqlite.dialect()).bind_processor(sqlite.dialect())
    )
    assert processor is not None
    bulk = BulkStatement(_statement, sqlite.dialect())
    rng = random.Random(7)
    zones = [UTC, timezone(timedelta(hours=-5)), None]
    for _ in range(500):
        value = datetime(1, 1, 1) + timedelta(seconds=rng.uniform(0, 3e11))
        value = value.replace(microsecond=rng.choice([0, rng.randrange(10**6)]))
        value = value.replace(tzinfo=rng.choice(zones))
        (sent,) = bulk.rows([{"b_key": "k", "b_n": 1, "b_at": value}])
        assert sent[1] == sent[2] == processor(value)
