"""Settings: one frozen object built from the environment, validated as a whole.

Every value is checked when the process starts (and again on SIGHUP), so a typo in the
env file stops the unit at once with one line naming the variable, rather than
surfacing hours later in the middle of a cycle.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from daemon.errors import ConfigError

T = TypeVar("T")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMATS = ("auto", "json", "console")
# SYNC_TEST_POSTGRES_URL and the like: read by the test suite, never by the daemon.
_NOT_SETTINGS_PREFIX = "SYNC_TEST_"
_UNSET: Any = object()


class Secret:
    """A value that never shows itself in a repr, a log line or check-config."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('<redacted>')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    """The effective configuration. Field names follow the SYNC_* variables."""

    database_url: str
    backend_url: str = "http://localhost:8000/api/v1/sync/start"
    backend_token_file: Path | None = None
    backend_token: Secret | None = field(default=None, compare=False)
    backend_payload: Mapping[str, Any] = field(default_factory=dict)
    interval_seconds: float = 300.0
    stale_after_seconds: float = 3600.0
    concurrency: int = 16
    min_concurrency: int = 1
    adaptive_concurrency: bool = True
    request_timeout_seconds: float = 30.0
    max_retries: int = 3
    retry_delay_seconds: float = 5.0
    max_consecutive_failures: int = 5
    lease_seconds: float = 120.0
    shutdown_grace_seconds: float = 20.0
    circuit_reset_seconds: float = 60.0
    quarantine_after: int = 10
    max_requests_per_second: float | None = None
    users_table: str = "users"
    user_id_column: str = "id"
    user_email_column: str = "email"
    last_sync_column: str = "last_sync"
    status_address: tuple[str, int] | None = ("127.0.0.1", 8787)
    log_level: str = "INFO"
    log_format: str = "auto"
    dry_run: bool = False
    claim_batch_size: int = 256
    response_max_bytes: int = 1024 * 1024
    jitter_seconds: float = 10.0
    quarantine_probe_seconds: float = 86400.0
    poll_base_seconds: float = 60.0
    poll_per_item_seconds: float = 1.0
    poll_min_seconds: float = 30.0
    poll_max_seconds: float = 1800.0
    database_outage_seconds: float = 600.0
    database_prepared_statements: bool = True
    history_days: float = 14.0
    # A user is fresh when synced within this many seconds; unset, the longest a healthy
    # daemon lets a user wait: stale after SYNC_STALE_AFTER_SECONDS, found by the next cycle.
    freshness_target_seconds: float | None = None
    freshness_objective: float = 0.99

    def __post_init__(self) -> None:
        if self.freshness_target_seconds is None:
            target = self.stale_after_seconds + self.interval_seconds
            object.__setattr__(self, "freshness_target_seconds", target)

    @property
    def freshness_target_s(self) -> float:
        """The resolved target (never None once constructed)."""
        assert self.freshness_target_seconds is not None
        return self.freshness_target_seconds

    @property
    def users_table_parts(self) -> tuple[str | None, str]:
        """(schema or None, table) of SYNC_USERS_TABLE."""
        schema, _, name = self.users_table.rpartition(".")
        return schema or None, name

    def redacted(self) -> dict[str, Any]:
        """The settings as check-config prints them: the token itself never appears."""
        shown = asdict(self)
        shown["backend_token"] = "<redacted>" if self.backend_token else None
        shown["backend_token_file"] = (
            str(self.backend_token_file) if self.backend_token_file else None
        )
        shown["database_url"] = make_url(self.database_url).render_as_string(hide_password=True)
        shown["backend_payload"] = dict(self.backend_payload)
        if self.status_address is not None:
            shown["status_address"] = f"{self.status_address[0]}:{self.status_address[1]}"
        return shown


def load(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Settings:
    """Build Settings from the environment; raise ConfigError naming the first bad variable."""
    env = os.environ if environ is None else environ
    reader = _Reader(env)
    token_file = _token_file(env)
    values: dict[str, Any] = {}
    for name, (parse, empty) in _VARIABLES.items():
        value = reader.get(name, parse, _UNSET, empty=empty)
        if value is not _UNSET:
            values[_field_name(name)] = value
    settings = Settings(
        database_url=_database_url(env, cwd or Path.cwd()),
        backend_token_file=token_file,
        backend_token=_read_token(token_file) if token_file else None,
        **values,
    )
    _check_consistency(settings)
    return settings


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Warnings for SYNC_* variables no setting reads, each naming the closest known one.

    A misspelt name (`SYNC_CONCURENCY=8`) would otherwise be ignored without a word and
    the default used. Names starting with SYNC_TEST_ belong to the test suite.
    """
    known = sorted(KNOWN_VARIABLES)
    warnings = []
    for name in sorted(environ):
        if not name.startswith("SYNC_") or name in KNOWN_VARIABLES:
            continue
        if name.startswith(_NOT_SETTINGS_PREFIX):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a known setting and is ignored{hint}")
    return warnings


def _check_consistency(settings: Settings) -> None:
    """Rules that involve two variables; the message names the one to change."""
    if settings.lease_seconds <= settings.request_timeout_seconds:
        raise ConfigError(
            "SYNC_LEASE_SECONDS: must be longer than SYNC_REQUEST_TIMEOUT_SECONDS "
            f"({settings.lease_seconds:g} <= {settings.request_timeout_seconds:g}), "
            "or a slow call would outlive its lease"
        )
    if settings.poll_min_seconds > settings.poll_max_seconds:
        raise ConfigError(
            "SYNC_POLL_MIN_SECONDS: must not exceed SYNC_POLL_MAX_SECONDS "
            f"({settings.poll_min_seconds:g} > {settings.poll_max_seconds:g})"
        )
    if settings.min_concurrency > settings.concurrency:
        raise ConfigError(
            "SYNC_MIN_CONCURRENCY: must not exceed SYNC_CONCURRENCY, the maximum "
            f"({settings.min_concurrency} > {settings.concurrency})"
        )
    if len({settings.user_id_column, settings.user_email_column, settings.last_sync_column}) < 3:
        raise ConfigError(
            "SYNC_LAST_SYNC_COLUMN: the id, email and last_sync columns must be different"
        )


class _Reader:
    """Reads one variable at a time and wraps any parse failure with the variable's name."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, parse: Callable[[str], T], default: T, *, empty: str = "") -> T:
        """`empty` is what a variable set to an empty string means (default: unset)."""
        raw = self._env.get(name)
        if raw is None:
            return default
        if raw.strip() == "":
            if not empty:
                return default
            raw = empty
        try:
            return parse(raw.strip())
        except _Unshown as exc:
            raise ConfigError(f"{name}: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{name}: {exc} (got {raw.strip()!r})") from None


class _Unshown(ValueError):
    """A value refused because it holds a secret: the error must not repeat the value."""


def _number(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"must be a number between {low:g} and {high:g}")
        return value

    return parse


def _share(raw: str) -> float:
    """A fraction above 0 and at most 1 (an objective of 0 would promise nothing)."""
    value = float(raw)
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError("must be a number above 0 and at most 1 (0.99 is 99 %)")
    return value


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw, 10)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _boolean(raw: str) -> bool:
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("must be true or false")


def _identifier(raw: str) -> str:
    if not _IDENTIFIER.match(raw):
        raise ValueError("must be a plain SQL identifier (letters, digits, underscore)")
    return raw


def _table_name(raw: str) -> str:
    """A table, optionally schema-qualified (`app.users`): an identifier on each side."""
    parts = raw.split(".")
    if len(parts) > 2 or not all(_IDENTIFIER.match(part) for part in parts):
        raise ValueError(
            "must be a table name, optionally schema-qualified (schema.table), "
            "each part a plain SQL identifier (letters, digits, underscore)"
        )
    return raw


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.username is not None or parts.password is not None:
        # aiohttp would send them as Basic auth (and refuse every call beside a bearer
        # token), and the URL is shown by check-config and in error messages.
        raise _Unshown(
            "must not carry credentials (user:password@host): the backend's bearer token "
            "goes in SYNC_BACKEND_TOKEN_FILE, which is never shown or logged"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return raw


def _json_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    reserved = {"user_id", "email"} & value.keys()
    if reserved:
        raise ValueError(f"must not set {', '.join(sorted(reserved))}")
    return value


def _address(raw: str) -> tuple[str, int] | None:
    if raw.lower() in ("off", "none", "disabled"):
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT, or empty to disable")
    port_number = _integer(0, 65535)(port)
    return host.strip("[]"), port_number


# Every variable read by the loop in load(), with its parser and what an empty value
# means ("" = unset). The field is the name without SYNC_, in lower case; the default is
# the field's default in Settings, written there once.
_VARIABLES: dict[str, tuple[Callable[[str], Any], str]] = {
    "SYNC_BACKEND_URL": (_http_url, ""),
    "SYNC_BACKEND_PAYLOAD": (_json_object, ""),
    "SYNC_INTERVAL_SECONDS": (_number(1, 86400), ""),
    "SYNC_STALE_AFTER_SECONDS": (_number(0, 10**8), ""),
    "SYNC_CONCURRENCY": (_integer(1, 1024), ""),
    "SYNC_MIN_CONCURRENCY": (_integer(1, 1024), ""),
    "SYNC_ADAPTIVE_CONCURRENCY": (_boolean, ""),
    "SYNC_REQUEST_TIMEOUT_SECONDS": (_number(0.01, 3600), ""),
    "SYNC_MAX_RETRIES": (_integer(0, 20), ""),
    "SYNC_RETRY_DELAY_SECONDS": (_number(0, 3600), ""),
    "SYNC_MAX_CONSECUTIVE_FAILURES": (_integer(1, 10**6), ""),
    "SYNC_LEASE_SECONDS": (_number(1, 86400), ""),
    "SYNC_SHUTDOWN_GRACE_SECONDS": (_number(0, 3600), ""),
    "SYNC_CIRCUIT_RESET_SECONDS": (_number(0.1, 86400), ""),
    "SYNC_QUARANTINE_AFTER": (_integer(1, 10**6), ""),
    "SYNC_MAX_REQUESTS_PER_SECOND": (_number(0.001, 10**6), ""),
    "SYNC_USERS_TABLE": (_table_name, ""),
    "SYNC_USER_ID_COLUMN": (_identifier, ""),
    "SYNC_USER_EMAIL_COLUMN": (_identifier, ""),
    "SYNC_LAST_SYNC_COLUMN": (_identifier, ""),
    "SYNC_STATUS_ADDRESS": (_address, "off"),
    "SYNC_LOG_LEVEL": (_choice(_LOG_LEVELS, upper=True), ""),
    "SYNC_LOG_FORMAT": (_choice(_LOG_FORMATS), ""),
    "SYNC_DRY_RUN": (_boolean, ""),
    "SYNC_CLAIM_BATCH_SIZE": (_integer(1, 10_000), ""),
    "SYNC_RESPONSE_MAX_BYTES": (_integer(1024, 64 * 1024 * 1024), ""),
    "SYNC_JITTER_SECONDS": (_number(0, 3600), ""),
    "SYNC_QUARANTINE_PROBE_SECONDS": (_number(1, 30 * 86400), ""),
    "SYNC_POLL_BASE_SECONDS": (_number(0, 86400), ""),
    "SYNC_POLL_PER_ITEM_SECONDS": (_number(0, 3600), ""),
    "SYNC_POLL_MIN_SECONDS": (_number(0.1, 86400), ""),
    "SYNC_POLL_MAX_SECONDS": (_number(0.1, 7 * 86400), ""),
    "SYNC_DATABASE_OUTAGE_SECONDS": (_number(1, 86400), ""),
    "SYNC_DATABASE_PREPARED_STATEMENTS": (_boolean, ""),
    "SYNC_HISTORY_DAYS": (_number(0.001, 3650), ""),
    "SYNC_FRESHNESS_TARGET_SECONDS": (_number(1, 10**9), ""),
    "SYNC_FRESHNESS_OBJECTIVE": (_share, ""),
}
# Read by their own functions below, because their values depend on other variables.
_DATABASE_URL = "SYNC_DATABASE_URL"
_TOKEN_FILE = "SYNC_BACKEND_TOKEN_FILE"
KNOWN_VARIABLES = frozenset(_VARIABLES) | {_DATABASE_URL, _TOKEN_FILE}


def _field_name(variable: str) -> str:
    return variable.removeprefix("SYNC_").lower()


def _database_url(env: Mapping[str, str], cwd: Path) -> str:
    raw = env.get(_DATABASE_URL, "").strip()
    if not raw:
        state_dirs = env.get("STATE_DIRECTORY", "").strip()
        base = Path(state_dirs.split(":")[0]) if state_dirs else cwd / "var"
        return f"sqlite:///{base / 'background-sync.db'}"
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError("SYNC_DATABASE_URL: is not a database URL") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError("SYNC_DATABASE_URL: only sqlite and postgresql are supported")
    if url.get_backend_name() == "postgresql" and url.get_driver_name() not in ("psycopg",):
        raise ConfigError("SYNC_DATABASE_URL: use the psycopg driver (postgresql+psycopg://)")
    if url.get_backend_name() == "postgresql":
        problem = _postgres_url_problem(url)
        if problem:
            raise ConfigError(f"SYNC_DATABASE_URL: {problem}")
    return raw


# Options psycopg.connect() takes as Python values, not as libpq text: from a URL they
# would arrive as strings and fail deep inside a query.
_PSYCOPG_ARGUMENTS = ("prepare_threshold", "autocommit", "row_factory", "cursor_factory")
# libpq parses these as integers only when it opens a TCP connection; check them now.
_LIBPQ_INTEGERS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
# A socket directory that cannot exist: libpq checks the options, then fails to connect.
_NO_SERVER = "/nonexistent/background-sync-option-check"


def _postgres_url_problem(url: URL) -> str | None:
    """What is wrong with a PostgreSQL URL's query options, as libpq itself judges them.

    The options go to psycopg and libpq, which would only complain at the first
    connection (a wait and exit 69, or a TypeError deep in a query for
    prepare_threshold=0). SQLAlchemy builds the very arguments it will pass to
    psycopg.connect(); libpq's own conninfo parser checks every keyword; and a
    connection started towards a socket that cannot exist makes libpq check the values
    it validates before connecting (sslmode, target_session_attrs, service, ...),
    without any network traffic.
    """
    import psycopg
    from psycopg import pq
    from psycopg.conninfo import make_conninfo

    for name in _PSYCOPG_ARGUMENTS:
        if name in url.query:
            if name == "prepare_threshold":
                return (
                    "prepare_threshold is not accepted in the URL; set "
                    "SYNC_DATABASE_PREPARED_STATEMENTS=false to turn server-side prepared "
                    "statements off (as pgbouncer's transaction pooling needs)"
                )
            return f"{name} is a psycopg argument, not a connection option of the URL"
    try:
        _args, params = url.get_dialect()().create_connect_args(url)
    except ArgumentError as exc:
        return str(exc)
    params = {key: str(value) for key, value in params.items()}
    try:
        make_conninfo("", **params)
    except psycopg.ProgrammingError as exc:
        return str(exc).strip().splitlines()[0]
    for name in _LIBPQ_INTEGERS:
        if name in params:
            try:
                int(params[name].strip(), 10)
            except ValueError:
                return f"invalid integer value {params[name]!r} for option {name}"
    hosts = params.get("host", "").count(",") + 1
    probe = {**params, "host": ",".join([_NO_SERVER] * hosts), "hostaddr": ""}
    conn = pq.PGconn.connect_start(make_conninfo("", **probe).encode())
    try:
        message = conn.error_message.decode("utf-8", "replace").strip()
    finally:
        conn.finish()
    if message and _NO_SERVER not in message:
        return message.splitlines()[0]
    return None


def _token_file(env: Mapping[str, str]) -> Path | None:
    raw = env.get(_TOKEN_FILE, "").strip()
    if raw:
        return Path(raw)
    credentials = env.get("CREDENTIALS_DIRECTORY", "").strip()
    if credentials and (Path(credentials) / "backend-token").is_file():
        return Path(credentials) / "backend-token"
    return None


def _read_token(path: Path) -> Secret:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"SYNC_BACKEND_TOKEN_FILE: cannot read {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"SYNC_BACKEND_TOKEN_FILE: {path} is empty")
    if any(ch in token for ch in "\r\n"):
        raise ConfigError(f"SYNC_BACKEND_TOKEN_FILE: {path} must hold one line")
    return Secret(token)
