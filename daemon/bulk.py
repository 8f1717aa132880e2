"""executemany for the hot write statements, compiled once, rows sent straight to the driver.

SQLAlchemy assembles every row of an executemany through its generic parameter machinery
(key checks, escaping, a processor lookup per value): for the fenced writes of a batch,
that cost more CPU than SQLite took to execute the rows. A `BulkStatement` compiles its
statement once for the engine's dialect, and turns each row into the driver's parameter
form (a tuple for SQLite's `?`, a dict for psycopg's `%(name)s`) using the same bind
processors that SQLAlchemy would apply, found once per statement. It runs in the unit of
work's own transaction, through `Connection.exec_driver_sql`, so rollback, retry and the
engine's events behave exactly as for any other statement.

Only for statements whose every parameter is a plain bindparam given in each row or
fixed in the statement (no expanding IN, no defaults computed in Python).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class BulkStatement:
    """One statement, compiled at its first use, and how to turn a row (a dict by bind
    name) into the driver's parameters. Compiling at first use, as SQLAlchemy's own cache
    does, keeps constructing a Store cheap (status and check-config construct one too)."""

    def __init__(
        self,
        statement: ClauseElement,
        dialect: Dialect,
        *,
        column_keys: Sequence[str] | None = None,
    ) -> None:
        """`column_keys`: for an INSERT, the columns each row gives (the others keep their
        server defaults), as SQLAlchemy would take them from the first row."""
        self._statement = statement
        self._dialect = dialect
        self._column_keys = list(column_keys) if column_keys else None
        self._compiled: _Compiled | None = None

    @property
    def sql(self) -> str:
        return self._compile().sql

    def _compile(self) -> _Compiled:
        if self._compiled is None:
            self._compiled = _Compiled(self._statement, self._dialect, self._column_keys)
        return self._compiled

    def rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The driver's parameters for `rows`; a row lacking a required name raises KeyError."""
        return self._compile().rows(rows)

    def execute(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
        """executemany `rows` in the session's transaction; nothing to do for no rows."""
        if rows:
            session.connection().exec_driver_sql(self.sql, self.rows(rows))


class _Compiled:
    """The SQL text and the parameter layout of one statement for one dialect."""

    def __init__(
        self, statement: ClauseElement, dialect: Dialect, column_keys: list[str] | None
    ) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        self._positional = bool(compiled.positional)
        by_name = {name: bind for bind, name in compiled.bind_names.items()}
        names = list(compiled.positiontup or []) if self._positional else list(by_name)
        self._names = names
        # Each distinct parameter the rows give is read and processed once per row, even
        # where the statement uses it twice; the statement's own values once, here.
        given: list[str] = []
        fixed: list[Any] = []
        self._layout: list[int] = []  # >= 0: the row's given[i]; < 0: fixed[~i]
        self._processors: list[tuple[int, Callable[[Any], Any]]] = []
        for name in names:
            bind = by_name[name]
            if bind.expanding or bind.callable is not None:
                raise ValueError(f"{name}: not a plain parameter, cannot be sent in bulk")
            processor = _faster(bind.type.dialect_impl(dialect).bind_processor(dialect))
            if not bind.required:
                value = bind.value if processor is None else processor(bind.value)
                fixed.append(value)
                self._layout.append(~(len(fixed) - 1))
            elif bind.key in given:
                self._layout.append(given.index(bind.key))
            else:
                given.append(bind.key)
                self._layout.append(len(given) - 1)
                if processor is not None:
                    self._processors.append((len(given) - 1, processor))
        self._fixed = fixed
        self._given = given
        self._get = operator.itemgetter(*given) if given else (lambda row: ())

    def rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The driver's parameters for `rows`; a row lacking a required name raises KeyError."""
        get, processors, layout, fixed = self._get, self._processors, self._layout, self._fixed
        single = len(self._given) == 1
        out: list[Any] = []
        for row in rows:
            values = [get(row)] if single else list(get(row))
            for index, processor in processors:
                values[index] = processor(values[index])
            ordered = tuple([values[i] if i >= 0 else fixed[~i] for i in layout])
            out.append(
                ordered if self._positional else dict(zip(self._names, ordered, strict=True))
            )
        return out


_SAMPLES = (
    datetime(2026, 11, 22, 12, 0, 5, 123456, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))),
    datetime(999, 12, 31, 23, 59, 59, 999999),
)


def _iso_text(value: Any) -> Any:
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _faster(processor: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """SQLite's DateTime processor formats through a dict of seven fields per value; where
    `isoformat` gives the very same text (checked here, on samples), use it instead."""
    if processor is None:
        return None
    try:
        same = all(processor(value) == _iso_text(value) for value in _SAMPLES)
        same = same and processor(None) is None
    except Exception:
        return processor
    if not same:
        return processor

    def iso_or_original(value: Any) -> Any:
        return _iso_text(value) if type(value) is datetime else processor(value)

    return iso_or_original
