"""The application's users table as it really is: its columns, id type and last_sync storage.

The table belongs to the application. The daemon reads it, writes only last_sync, and
must never write a value in a form the application does not use: an application that
keeps unix seconds in last_sync must find unix seconds there after a sync. So at start-up
the table is inspected once (declared types, and on SQLite the storage actually found in
the rows, since SQLite keeps any value in any column) and the daemon either adopts that
form for every read and write, or refuses to start with one line naming the setting.

Ids are sent to the backend by one rule: an integer column's values as JSON numbers,
every other type (numeric, uuid, text, ...) as the string the database prints for it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    Numeric,
    Select,
    Table,
    Text,
    column,
    func,
    inspect,
    select,
    table,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, NoSuchTableError
from sqlalchemy.types import TypeDecorator, TypeEngine

from daemon.database import short_error
from daemon.errors import ConfigError, StoreError
from daemon.settings import Settings

# Above this, an integer last_sync is read as milliseconds (1e11 s is the year 5138).
_MILLIS_FROM = 10**11
_SQLITE_TEXT = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's own DateTime format on SQLite
_DATE = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"
_TIME = "[0-9][0-9]:[0-9][0-9]:[0-9][0-9]"


class IdKind(enum.StrEnum):
    """How a user's id travels in the request body."""

    NUMBER = "number"  # integer, bigint, smallint
    STRING = "string"  # numeric, uuid, text, varchar, anything else


class Storage(enum.StrEnum):
    """The form last_sync values take in the application's rows."""

    TIMESTAMP = "timestamp"  # a native timestamp type (PostgreSQL)
    TEXT = "text 'YYYY-MM-DD HH:MM:SS.ffffff'"  # SQLite: what SQLAlchemy and Django write
    ISO8601 = "ISO-8601 text 'YYYY-MM-DDTHH:MM:SS'"  # SQLite
    UNIX_SECONDS = "unix seconds"  # SQLite integer or real
    UNIX_MILLISECONDS = "unix milliseconds"  # SQLite integer


@dataclass(frozen=True)
class UsersTable:
    """What the daemon knows of the users table; `table` reads and writes in its forms."""

    table: Table
    id_column: str
    email_column: str
    last_sync_column: str
    id_kind: IdKind
    storage: Storage

    @property
    def last_sync_indexed(self) -> bool:
        """An index starts with last_sync: counts of a last_sync range read only the index."""
        return any(
            next(iter(index.columns)).name == self.last_sync_column
            for index in self.table.indexes
            if len(index.columns)
        )

    @property
    def qualified_name(self) -> str:
        return f"{self.table.schema}.{self.table.name}" if self.table.schema else self.table.name


class _SqliteTime(TypeDecorator[Any]):
    """last_sync on SQLite, in the storage found in the rows.

    Values read stay exactly as stored: the due scan's keyset cursor compares them with
    the rows again, and a re-rendered value ('...05' read, '...05.000000' written back)
    would skip users whose last_sync equals the page's last one.
    """

    impl = Text
    cache_ok = True

    def __init__(self, storage: Storage, suffix: str = "", real: bool = False) -> None:
        super().__init__()
        self.storage = storage
        self.suffix = suffix
        self.real = real

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if self.storage in (Storage.UNIX_SECONDS, Storage.UNIX_MILLISECONDS):
            return dialect.type_descriptor(Float() if self.real else Integer())
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if not isinstance(value, datetime):
            return value  # None, or a value read from the table (a cursor position)
        if self.storage in (Storage.UNIX_SECONDS, Storage.UNIX_MILLISECONDS):
            utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
            if self.storage is Storage.UNIX_SECONDS:
                return utc.timestamp() if self.real else int(utc.timestamp())
            return int(utc.timestamp() * 1000)
        # A naive value is UTC already (Store passes them so); each replace costs a
        # microsecond or two, and this runs for every synced user.
        naive = value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)
        # isoformat gives strftime's text, faster (this runs for every synced user), except
        # before year 1000, where glibc's %Y does not pad to four digits.
        if self.storage is Storage.ISO8601:
            if naive.year >= 1000:
                return naive.isoformat("T", "microseconds") + self.suffix
            return naive.strftime("%Y-%m-%dT%H:%M:%S.%f") + self.suffix
        if naive.year >= 1000:
            return naive.isoformat(" ", "microseconds")
        return naive.strftime(_SQLITE_TEXT)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return value


def as_instant(value: Any, storage: Storage) -> datetime | None:
    """A last_sync value as read from the table (in any storage) as a UTC instant."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        seconds = value / 1000 if storage is Storage.UNIX_MILLISECONDS else value
        return datetime.fromtimestamp(seconds, UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def inspect_users(engine: Engine, settings: Settings) -> UsersTable:
    """Reflect and check the configured users table; ConfigError names what is wrong."""
    schema, name = settings.users_table_parts
    try:
        reflected = Table(name, MetaData(), schema=schema, autoload_with=engine)
    except NoSuchTableError:
        raise ConfigError(
            f"SYNC_USERS_TABLE: table {settings.users_table!r} does not exist"
        ) from None
    except DBAPIError as exc:
        raise StoreError(f"reading the users table: {short_error(exc)}") from exc
    for variable, wanted in (
        ("SYNC_USER_ID_COLUMN", settings.user_id_column),
        ("SYNC_USER_EMAIL_COLUMN", settings.user_email_column),
        ("SYNC_LAST_SYNC_COLUMN", settings.last_sync_column),
    ):
        if wanted not in reflected.c:
            raise ConfigError(
                f"{variable}: table {settings.users_table!r} has no column {wanted!r}"
            )
    id_type = reflected.c[settings.user_id_column].type
    id_kind = IdKind.NUMBER if isinstance(id_type, Integer) else IdKind.STRING
    declared = reflected.c[settings.last_sync_column].type
    try:
        if engine.dialect.name == "sqlite":
            storage, typed = _sqlite_storage(engine, settings, declared)
        else:
            storage, typed = _native_storage(settings, declared), None
    except DBAPIError as exc:
        raise StoreError(f"reading the users table: {short_error(exc)}") from exc
    if typed is not None:
        # The same table, with last_sync read and written in the storage found.
        reflected = Table(
            name,
            MetaData(),
            _override(settings.last_sync_column, typed),
            schema=schema,
            autoload_with=engine,
        )
    return UsersTable(
        reflected,
        settings.user_id_column,
        settings.user_email_column,
        settings.last_sync_column,
        id_kind,
        storage,
    )


def _override(name: str, type_: TypeEngine[Any]) -> Column[Any]:
    return Column(name, type_)


def _native_storage(settings: Settings, declared: TypeEngine[Any]) -> Storage:
    """PostgreSQL keeps types: last_sync must be a timestamp, with or without time zone."""
    if isinstance(declared, DateTime):
        return Storage.TIMESTAMP
    kind = "a date" if isinstance(declared, Date) else f"of type {declared}"
    raise ConfigError(
        f"SYNC_LAST_SYNC_COLUMN: {settings.users_table}.{settings.last_sync_column} is {kind}; "
        "the daemon needs a timestamp column (timestamp with time zone, or timestamp in UTC)"
    )


def _sqlite_storage(
    engine: Engine, settings: Settings, declared: TypeEngine[Any]
) -> tuple[Storage, _SqliteTime]:
    """SQLite keeps any value in any column: decide from what the rows really hold.

    One pass over the table counts, per storage class, the values in each text form and
    with each UTC designator, and the largest magnitude (seconds or milliseconds).
    """
    where = f"{settings.users_table}.{settings.last_sync_column}"
    schema, name = settings.users_table_parts
    users = table(name, column(settings.last_sync_column), schema=schema)
    value = users.c[settings.last_sync_column]

    def rows_where(condition: Any) -> Any:
        return func.sum(condition.cast(Integer))

    def ends(length: int) -> Any:
        return func.substr(value, -length)

    kind = func.typeof(value)
    query = (
        select(
            kind,
            func.count(),
            rows_where(value.op("GLOB")(f"{_DATE} {_TIME}*")),
            rows_where(value.op("GLOB")(f"{_DATE}T{_TIME}*")),
            rows_where(ends(1) == "Z"),
            rows_where(ends(6).in_(("+00:00", "-00:00"))),
            rows_where(ends(6).op("GLOB")("[+-][0-9][0-9]:[0-9][0-9]")),
            func.max(func.abs(value)),
        )
        .where(value.is_not(None))
        .group_by(kind)
    )
    with engine.connect() as conn:
        found = {row[0]: row[1:] for row in conn.execute(query)}
    if len(found) > 1:
        listed = ", ".join(f"{row[0]} {k}" for k, row in sorted(found.items()))
        raise ConfigError(
            f"SYNC_LAST_SYNC_COLUMN: {where} mixes storage classes ({listed}); "
            "the daemon cannot order or compare such values"
        )
    if not found:
        return _empty_column_storage(declared)
    ((storage_class, counts),) = found.items()
    total, spaced, iso, zulu, utc, offset = (int(n or 0) for n in counts[:6])
    if storage_class in ("integer", "real"):
        if storage_class == "integer" and counts[6] >= _MILLIS_FROM:
            return Storage.UNIX_MILLISECONDS, _SqliteTime(Storage.UNIX_MILLISECONDS)
        real = storage_class == "real"
        return Storage.UNIX_SECONDS, _SqliteTime(Storage.UNIX_SECONDS, real=real)
    if storage_class != "text":
        raise ConfigError(f"SYNC_LAST_SYNC_COLUMN: {where} holds {storage_class} values, not times")
    if offset > utc:
        # ISO-8601 text orders as time only when every value is in the same zone.
        raise ConfigError(
            f"SYNC_LAST_SYNC_COLUMN: {where} holds times with offsets other than UTC; "
            "such text does not order as time: store UTC"
        )
    if spaced == total and not (zulu or utc):
        return Storage.TEXT, _SqliteTime(Storage.TEXT)
    if iso == total:
        suffix = "+00:00" if utc else "Z" if zulu else ""
        return Storage.ISO8601, _SqliteTime(Storage.ISO8601, suffix=suffix)
    raise ConfigError(
        f"SYNC_LAST_SYNC_COLUMN: {where} holds text the daemon cannot order as times "
        f"({spaced} 'YYYY-MM-DD HH:MM:SS', {iso} 'YYYY-MM-DDTHH:MM:SS', "
        f"{total - spaced - iso} other); use one form, in UTC"
    )


def _empty_column_storage(declared: TypeEngine[Any]) -> tuple[Storage, _SqliteTime]:
    """No value yet: the declared type decides. Numbers are unix seconds; dates, text and
    anything else get the 'YYYY-MM-DD HH:MM:SS.ffffff' text SQLAlchemy and Django write."""
    if isinstance(declared, Integer):
        return Storage.UNIX_SECONDS, _SqliteTime(Storage.UNIX_SECONDS)
    if isinstance(declared, Float | Numeric):
        return Storage.UNIX_SECONDS, _SqliteTime(Storage.UNIX_SECONDS, real=True)
    return Storage.TEXT, _SqliteTime(Storage.TEXT)


def wire_id(kind: IdKind, row_id: Any, key: str) -> int | str:
    """The id as the backend receives it: integers as JSON numbers, the rest as text."""
    if kind is IdKind.NUMBER and isinstance(row_id, int) and not isinstance(row_id, bool):
        return row_id
    return key


# -- the due scan's index -------------------------------------------------------------------


def index_advice(engine: Engine, users: UsersTable, due_page: Select[Any]) -> str | None:
    """The CREATE INDEX statement the due scan needs, or None when it can use an index.

    Without an index on (last_sync, id), every page of the scan reads and sorts the whole
    table (113-130 ms per page at a million rows on PostgreSQL, against 1.3-2.5 ms with
    it). The daemon never alters the application's table, so it only says what to run.
    PostgreSQL is asked for its plan with every alternative to an ordered index scan
    priced out (sequential and bitmap scans, sorts, hash and merge joins), so that a small
    table answers as a large one would: a Sort or a sequential scan of the users table
    left in the plan means no index can serve the scan. SQLite's index list is read.
    """
    try:
        if engine.dialect.name == "postgresql":
            usable = _plan_uses_index(engine, users, due_page)
        else:
            usable = _sqlite_has_index(engine, users)
    except DBAPIError as exc:
        raise StoreError(f"reading the users table's indexes: {short_error(exc)}") from exc
    return None if usable else _create_index(engine, users)


# What the planner could choose instead of walking an index in (last_sync, id) order.
_PRICED_OUT = ("seqscan", "bitmapscan", "sort", "hashjoin", "mergejoin")


def _plan_uses_index(engine: Engine, users: UsersTable, due_page: Select[Any]) -> bool:
    compiled = due_page.compile(dialect=engine.dialect)
    with engine.connect() as conn, conn.begin():
        for method in _PRICED_OUT:
            conn.exec_driver_sql(f"SET LOCAL enable_{method} = off")
        raw = conn.exec_driver_sql(
            f"EXPLAIN (FORMAT JSON) {compiled.string}", compiled.params
        ).scalar_one()
        conn.rollback()
    plan = json.loads(raw) if isinstance(raw, str) else raw
    return not any(_scans_or_sorts(node, users.table.name) for node in _nodes(plan[0]["Plan"]))


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", ()):
        found.extend(_nodes(child))
    return found


def _scans_or_sorts(node: dict[str, Any], name: str) -> bool:
    kind = node.get("Node Type", "")
    if kind == "Seq Scan" and node.get("Relation Name") == name:
        return True
    return kind in ("Sort", "Incremental Sort")


def _sqlite_has_index(engine: Engine, users: UsersTable) -> bool:
    users_ = users.table
    id_col = users_.c[users.id_column]
    # An index on last_sync alone orders ties by rowid: enough when id is the rowid.
    rowid = id_col.primary_key and isinstance(id_col.type, Integer)
    for index in inspect(engine).get_indexes(users_.name, schema=users_.schema):
        names = list(index["column_names"])
        if names[:1] != [users.last_sync_column]:
            continue
        if (len(names) == 1 and rowid) or names[1:2] == [users.id_column]:
            return True
    return False


def _create_index(engine: Engine, users: UsersTable) -> str:
    quote = engine.dialect.identifier_preparer.quote
    last_sync, id_name = users.last_sync_column, users.id_column
    target = quote(users.table.name)
    if users.table.schema:
        target = f"{quote(users.table.schema)}.{target}"
    index = quote(f"ix_{users.table.name}_{last_sync}_{id_name}"[:63])
    concurrently = " CONCURRENTLY" if engine.dialect.name == "postgresql" else ""
    return f"CREATE INDEX{concurrently} {index} ON {target} ({quote(last_sync)}, {quote(id_name)});"
