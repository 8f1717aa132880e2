"""Settings: every variable validated, every error naming its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.settings import Settings, load


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


def test_settings_are_immutable() -> None:
    settings = load({})
    with pytest.raises(AttributeError):
        settings.concurrency = 3  # type: ignore[misc]
    assert isinstance(settings, Settings)
