"""Settings: one frozen object built from the environment, validated as a whole.

Every value is checked when the process starts (and again on SIGHUP), so a typo in the
env file stops the unit at once with one line naming the variable, rather than
surfacing hours later in the middle of a cycle.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from daemon.errors import ConfigError

T = TypeVar("T")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMATS = ("auto", "json", "console")
_DEFAULT_STATUS_ADDRESS: tuple[str, int] | None = ("127.0.0.1", 8787)


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
    history_days: float = 14.0

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
    settings = Settings(
        database_url=_database_url(env, cwd or Path.cwd()),
        backend_url=reader.get("SYNC_BACKEND_URL", _http_url, Settings.backend_url),
        backend_token_file=token_file,
        backend_token=_read_token(token_file) if token_file else None,
        backend_payload=reader.get("SYNC_BACKEND_PAYLOAD", _json_object, {}),
        interval_seconds=reader.get("SYNC_INTERVAL_SECONDS", _number(1, 86400), 300.0),
        stale_after_seconds=reader.get("SYNC_STALE_AFTER_SECONDS", _number(0, 10**8), 3600.0),
        concurrency=reader.get("SYNC_CONCURRENCY", _integer(1, 1024), 16),
        request_timeout_seconds=reader.get(
            "SYNC_REQUEST_TIMEOUT_SECONDS", _number(0.01, 3600), 30.0
        ),
        max_retries=reader.get("SYNC_MAX_RETRIES", _integer(0, 20), 3),
        retry_delay_seconds=reader.get("SYNC_RETRY_DELAY_SECONDS", _number(0, 3600), 5.0),
        max_consecutive_failures=reader.get("SYNC_MAX_CONSECUTIVE_FAILURES", _integer(1, 10**6), 5),
        lease_seconds=reader.get("SYNC_LEASE_SECONDS", _number(1, 86400), 120.0),
        shutdown_grace_seconds=reader.get("SYNC_SHUTDOWN_GRACE_SECONDS", _number(0, 3600), 20.0),
        circuit_reset_seconds=reader.get("SYNC_CIRCUIT_RESET_SECONDS", _number(0.1, 86400), 60.0),
        quarantine_after=reader.get("SYNC_QUARANTINE_AFTER", _integer(1, 10**6), 10),
        max_requests_per_second=reader.get(
            "SYNC_MAX_REQUESTS_PER_SECOND", _number(0.001, 10**6), None
        ),
        users_table=reader.get("SYNC_USERS_TABLE", _table_name, "users"),
        user_id_column=reader.get("SYNC_USER_ID_COLUMN", _identifier, "id"),
        user_email_column=reader.get("SYNC_USER_EMAIL_COLUMN", _identifier, "email"),
        last_sync_column=reader.get("SYNC_LAST_SYNC_COLUMN", _identifier, "last_sync"),
        status_address=reader.get(
            "SYNC_STATUS_ADDRESS", _address, _DEFAULT_STATUS_ADDRESS, empty="off"
        ),
        log_level=reader.get("SYNC_LOG_LEVEL", _choice(_LOG_LEVELS, upper=True), "INFO"),
        log_format=reader.get("SYNC_LOG_FORMAT", _choice(_LOG_FORMATS), "auto"),
        dry_run=reader.get("SYNC_DRY_RUN", _boolean, False),
        claim_batch_size=reader.get("SYNC_CLAIM_BATCH_SIZE", _integer(1, 10_000), 256),
        response_max_bytes=reader.get(
            "SYNC_RESPONSE_MAX_BYTES", _integer(1024, 64 * 1024 * 1024), 1024 * 1024
        ),
        jitter_seconds=reader.get("SYNC_JITTER_SECONDS", _number(0, 3600), 10.0),
        quarantine_probe_seconds=reader.get(
            "SYNC_QUARANTINE_PROBE_SECONDS", _number(1, 30 * 86400), 86400.0
        ),
        poll_base_seconds=reader.get("SYNC_POLL_BASE_SECONDS", _number(0, 86400), 60.0),
        poll_per_item_seconds=reader.get("SYNC_POLL_PER_ITEM_SECONDS", _number(0, 3600), 1.0),
        poll_min_seconds=reader.get("SYNC_POLL_MIN_SECONDS", _number(0.1, 86400), 30.0),
        poll_max_seconds=reader.get("SYNC_POLL_MAX_SECONDS", _number(0.1, 7 * 86400), 1800.0),
        database_outage_seconds=reader.get(
            "SYNC_DATABASE_OUTAGE_SECONDS", _number(1, 86400), 600.0
        ),
        history_days=reader.get("SYNC_HISTORY_DAYS", _number(0.001, 3650), 14.0),
    )
    _check_consistency(settings)
    return settings


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
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{name}: {exc} (got {raw.strip()!r})") from None


def _number(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"must be a number between {low:g} and {high:g}")
        return value

    return parse


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


def _database_url(env: Mapping[str, str], cwd: Path) -> str:
    raw = env.get("SYNC_DATABASE_URL", "").strip()
    if not raw:
        state_dirs = env.get("STATE_DIRECTORY", "").strip()
        base = Path(state_dirs.split(":")[0]) if state_dirs else cwd / "var"
        return f"sqlite:///{base / 'background-sync.db'}"
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError("SYNC_DATABASE_URL: is not a database URL") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError("SYNC_DATABASE_URL: only sqlite and postgresql are supported")
    if url.get_backend_name() == "postgresql" and url.get_driver_name() not in ("psycopg",):
        raise ConfigError("SYNC_DATABASE_URL: use the psycopg driver (postgresql+psycopg://)")
    return raw


def _token_file(env: Mapping[str, str]) -> Path | None:
    raw = env.get("SYNC_BACKEND_TOKEN_FILE", "").strip()
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
