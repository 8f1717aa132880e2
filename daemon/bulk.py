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
        positional = bool(compiled.positional)
        by_name = {name: bind for bind, name in compiled.bind_names.items()}
        names = list(compiled.positiontup or []) if positional else list(by_name)
        # Each distinct parameter the rows give is read and processed once per row, even
        # where the statement uses it twice; the statement's own values once, here.
        given: list[str] = []
        fixed: list[Any] = []
        layout: list[int] = []  # >= 0: the row's given[i]; < 0: fixed[~i]
        processors: dict[int, Callable[[Any], Any]] = {}
        for name in names:
            bind = by_name[name]
            if bind.expanding or bind.callable is not None:
                raise ValueError(f"{name}: not a plain parameter, cannot be sent in bulk")
            processor = _faster(bind.type.dialect_impl(dialect).bind_processor(dialect))
            if not bind.required:
                value = bind.value if processor is None else processor(bind.value)
                fixed.append(value)
                layout.append(~(len(fixed) - 1))
            elif bind.key in given:
                layout.append(given.index(bind.key))
            else:
                given.append(bind.key)
                layout.append(len(given) - 1)
                if processor is not None:
                    processors[len(given) - 1] = processor
        self._row = _row_builder(given, layout, processors, fixed, None if positional else names)

    def rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The driver's parameters for `rows`; a row lacking a required name raises KeyError."""
        return list(map(self._row, rows))


def _row_builder(
    given: Sequence[str],
    layout: Sequence[int],
    processors: Mapping[int, Callable[[Any], Any]],
    fixed: Sequence[Any],
    names: Sequence[str] | None,
) -> Callable[[Mapping[str, Any]], Any]:
    """One function that turns a row into the driver's parameters, written for this layout.

    The generic loop (read the values, process some, reorder) cost about as much CPU per
    row as SQLite took to write it; a function with the reads, the processor calls and
    the order written out costs a fraction. SQLAlchemy builds its own hot paths the same
    way. Only names and indexes enter the source (the names through repr); values and
    processors are passed in its namespace.
    """
    namespace: dict[str, Any] = {}
    lines = ["def build(row):"]
    for index, key in enumerate(given):
        read = f"row[{key!r}]"
        if index in processors:
            namespace[f"p{index}"] = processors[index]
            read = f"p{index}({read})"
        lines.append(f"    v{index} = {read}")
    for index, value in enumerate(fixed):
        namespace[f"f{index}"] = value
    values = [f"v{i}" if i >= 0 else f"f{~i}" for i in layout]
    if names is None:
        lines.append(f"    return ({', '.join(values)}{',' if len(values) == 1 else ''})")
    else:
        pairs = ", ".join(f"{name!r}: {value}" for name, value in zip(names, values, strict=True))
        lines.append(f"    return {{{pairs}}}")
    exec("\n".join(lines), namespace)  # the source holds names and indexes only
    build: Callable[[Mapping[str, Any]], Any] = namespace["build"]
    return build


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
        if type(value) is not datetime:
            return processor(value)
        if value.tzinfo is UTC:  # the usual case: no new datetime, the offset cut off
            text = value.isoformat(" ")
            return text[:-6] if value.microsecond else text[:-6] + ".000000"
        return _iso_text(value)

    return iso_or_original
