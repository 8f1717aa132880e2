"""Settings: every variable validated, every error naming its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.settings import KNOWN_VARIABLES, Settings, load, unknown_variables


def test_defaults_match_the_design() -> None:
    settings = load({}, cwd=Path("/srv/app"))
    assert settings.database_url == "sqlite:////srv/app/var/background-sync.db"
    assert settings.backend_url == "http://localhost:8000/api/v1/sync/start"
    assert settings.interval_seconds == 300
    assert settings.stale_after_seconds == 3600
    assert settings.concurrency == 16
    assert settings.request_timeout_seconds == 30
    assert (settings.max_retries, settings.retry_delay_seconds) == (3, 5)
    assert settings.max_consecutive_failures == 5
    assert settings.lease_seconds == 120
    assert settings.shutdown_grace_seconds == 20
    assert settings.circuit_reset_seconds == 60
    assert settings.quarantine_after == 10
    assert settings.max_requests_per_second is None
    assert (settings.users_table, settings.user_id_column) == ("users", "id")
    assert (settings.user_email_column, settings.last_sync_column) == ("email", "last_sync")
    assert settings.status_address == ("127.0.0.1", 8787)
    assert (settings.log_level, settings.log_format, settings.dry_run) == ("INFO", "auto", False)


def test_systemd_state_directory_holds_the_default_database() -> None:
    settings = load({"STATE_DIRECTORY": "/var/lib/background-sync"})
    assert settings.database_url == "sqlite:////var/lib/background-sync/background-sync.db"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SYNC_CONCURRENCY", "zero"),
        ("SYNC_CONCURRENCY", "0"),
        ("SYNC_CONCURRENCY", "2.5"),
        ("SYNC_INTERVAL_SECONDS", "-1"),
        ("SYNC_INTERVAL_SECONDS", "nan"),
        ("SYNC_STALE_AFTER_SECONDS", "soon"),
        ("SYNC_REQUEST_TIMEOUT_SECONDS", "0"),
        ("SYNC_MAX_RETRIES", "-1"),
        ("SYNC_BACKEND_URL", "ftp://example.com/sync"),
        ("SYNC_BACKEND_URL", "localhost:8000"),
        ("SYNC_BACKEND_PAYLOAD", "{not json"),
        ("SYNC_BACKEND_PAYLOAD", "[1, 2]"),
        ("SYNC_BACKEND_PAYLOAD", '{"user_id": 1}'),
        ("SYNC_USERS_TABLE", "users; drop table users"),
        ("SYNC_USER_ID_COLUMN", "1id"),
        ("SYNC_LAST_SYNC_COLUMN", "last-sync"),
        ("SYNC_STATUS_ADDRESS", "8787"),
        ("SYNC_STATUS_ADDRESS", "127.0.0.1:99999"),
        ("SYNC_LOG_LEVEL", "LOUD"),
        ("SYNC_LOG_FORMAT", "xml"),
        ("SYNC_DRY_RUN", "maybe"),
        ("SYNC_DATABASE_URL", "mysql://localhost/app"),
        ("SYNC_DATABASE_URL", "postgresql+asyncpg://localhost/app"),
        ("SYNC_DATABASE_URL", "not a url"),
        ("SYNC_MAX_REQUESTS_PER_SECOND", "0"),
        ("SYNC_QUARANTINE_AFTER", "0"),
        ("SYNC_MIN_CONCURRENCY", "0"),
        ("SYNC_MIN_CONCURRENCY", "17"),
        ("SYNC_ADAPTIVE_CONCURRENCY", "sometimes"),
    ],
)
def test_bad_value_is_one_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}:")
    assert "\n" not in message


def test_a_lease_shorter_than_a_request_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^SYNC_LEASE_SECONDS:"):
        load({"SYNC_LEASE_SECONDS": "10", "SYNC_REQUEST_TIMEOUT_SECONDS": "30"})


def test_a_minimum_concurrency_above_the_maximum_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^SYNC_MIN_CONCURRENCY: .*SYNC_CONCURRENCY.*\(5 > 4\)"):
        load({"SYNC_MIN_CONCURRENCY": "5", "SYNC_CONCURRENCY": "4"})
    settings = load({"SYNC_MIN_CONCURRENCY": "4", "SYNC_CONCURRENCY": "4"})
    assert (settings.min_concurrency, settings.concurrency) == (4, 4)


def test_concurrency_adapts_by_default_and_can_be_fixed() -> None:
    assert load({}).adaptive_concurrency is True
    assert load({}).min_concurrency == 1
    assert load({"SYNC_ADAPTIVE_CONCURRENCY": "false"}).adaptive_concurrency is False


def test_empty_status_address_disables_the_status_server() -> None:
    assert load({"SYNC_STATUS_ADDRESS": ""}).status_address is None
    assert load({"SYNC_STATUS_ADDRESS": "off"}).status_address is None
    assert load({"SYNC_STATUS_ADDRESS": "[::1]:9000"}).status_address == ("::1", 9000)


def test_token_is_read_from_the_file_and_never_shown(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc123-secret\n")
    settings = load({"SYNC_BACKEND_TOKEN_FILE": str(token_file)})
    assert settings.backend_token is not None
    assert settings.backend_token.reveal() == "abc123-secret"
    assert "abc123-secret" not in repr(settings)
    assert "abc123-secret" not in str(settings.redacted())
    assert settings.redacted()["backend_token"] == "<redacted>"


def test_token_comes_from_systemd_credentials_when_present(tmp_path: Path) -> None:
    (tmp_path / "backend-token").write_text("from-credentials")
    settings = load({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert settings.backend_token is not None
    assert settings.backend_token.reveal() == "from-credentials"


def test_unreadable_or_empty_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^SYNC_BACKEND_TOKEN_FILE: cannot read"):
        load({"SYNC_BACKEND_TOKEN_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        load({"SYNC_BACKEND_TOKEN_FILE": str(tmp_path / "empty")})


def test_database_password_is_hidden_in_the_printed_configuration() -> None:
    settings = load({"SYNC_DATABASE_URL": "postgresql+psycopg://app:hunter2@db/app"})
    assert "hunter2" not in settings.redacted()["database_url"]


@pytest.mark.parametrize(
    "url",
    [
        "http://alice:hunter2@backend.internal/api/v1/sync/start",
        "https://alice@backend.internal/api/v1/sync/start",
        "http://:hunter2@backend.internal/sync",
    ],
)
def test_a_backend_url_with_credentials_is_refused_without_repeating_them(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load({"SYNC_BACKEND_URL": url})
    message = str(refused.value)
    assert message.startswith("SYNC_BACKEND_URL: must not carry credentials")
    assert "SYNC_BACKEND_TOKEN_FILE" in message
    assert "hunter2" not in message and "alice" not in message


def test_settings_are_immutable() -> None:
    settings = load({})
    with pytest.raises(AttributeError):
        settings.concurrency = 3  # type: ignore[misc]
    assert isinstance(settings, Settings)


# -- the database URL's options ------------------------------------------------------------

_PG = "postgresql+psycopg://app:secret@db.internal/app"


def test_prepared_statements_are_on_by_default_and_can_be_turned_off() -> None:
    assert load({}).database_prepared_statements is True
    settings = load({"SYNC_DATABASE_PREPARED_STATEMENTS": "false"})
    assert settings.database_prepared_statements is False
    assert settings.redacted()["database_prepared_statements"] is False


@pytest.mark.parametrize(
    "query",
    [
        "?bogus=1",  # not a libpq keyword
        "?prepare_threshold=0",  # a psycopg argument: reached psycopg as the string "0"
        "?autocommit=true",
        "?sslmode=sometimes",  # libpq's own value checks
        "?target_session_attrs=fastest",
        "?load_balance_hosts=maybe",
        "?service=no-such-service",
        "?keepalives_idle=soon",
        "?connect_timeout=later",
        "?host=a:5432&host=b:port",
    ],
)
def test_a_bad_postgresql_url_option_is_one_error_naming_the_url(query: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"SYNC_DATABASE_URL": _PG + query})
    message = str(caught.value)
    assert message.startswith("SYNC_DATABASE_URL: ")
    assert "\n" not in message
    assert "secret" not in message


def test_prepare_threshold_in_the_url_points_to_the_setting() -> None:
    with pytest.raises(ConfigError, match="SYNC_DATABASE_PREPARED_STATEMENTS=false"):
        load({"SYNC_DATABASE_URL": _PG + "?prepare_threshold=0"})


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?options=-csearch_path%3Dapp",
        "?sslmode=require&connect_timeout=3",
        "?application_name=sync-eu&keepalives_idle=30",
        "?host=a:5432&host=b:5433&target_session_attrs=read-write",
    ],
)
def test_valid_postgresql_url_options_are_accepted(query: str) -> None:
    assert load({"SYNC_DATABASE_URL": _PG + query}).database_url == _PG + query


def test_a_port_that_is_not_a_number_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^SYNC_DATABASE_URL:"):
        load({"SYNC_DATABASE_URL": "postgresql+psycopg://app@db:fivefour/app"})


# -- unknown variables -----------------------------------------------------------------------


def test_a_misspelt_variable_is_reported_with_the_closest_setting() -> None:
    warnings = unknown_variables({"SYNC_CONCURENCY": "8", "SYNC_INTERVAL_SECOND": "60"})
    assert warnings == [
        "SYNC_CONCURENCY is not a known setting and is ignored; did you mean SYNC_CONCURRENCY?",
        "SYNC_INTERVAL_SECOND is not a known setting and is ignored; "
        "did you mean SYNC_INTERVAL_SECONDS?",
    ]


def test_known_settings_and_variables_of_others_are_not_reported() -> None:
    environ = {name: "" for name in KNOWN_VARIABLES}
    environ |= {"SYNC_TEST_POSTGRES_URL": "postgresql://x", "PATH": "/bin", "HOME": "/root"}
    environ |= {"BACKGROUND_SYNC_UNIT_FILE": "/etc/x", "STATE_DIRECTORY": "/var/lib/x"}
    assert unknown_variables(environ) == []


def test_every_known_variable_is_documented() -> None:
    reference = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert [name for name in sorted(KNOWN_VARIABLES) if f"`{name}`" not in reference] == []
