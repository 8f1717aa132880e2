"""The env file is read the way systemd's EnvironmentFile= reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import envfile
from daemon.errors import ConfigError


def test_comments_quotes_and_blank_lines() -> None:
    text = """
# a comment
; another
SYNC_INTERVAL_SECONDS=60
SYNC_BACKEND_PAYLOAD='{"max_emails": 50}'
export SYNC_LOG_LEVEL="DEBUG"
EMPTY=
"""
    assert envfile.parse(text) == {
        "SYNC_INTERVAL_SECONDS": "60",
        "SYNC_BACKEND_PAYLOAD": '{"max_emails": 50}',
        "SYNC_LOG_LEVEL": "DEBUG",
        "EMPTY": "",
    }


def test_a_malformed_line_names_the_file_and_line() -> None:
    with pytest.raises(ConfigError, match=r"sync\.env:2: expected KEY=VALUE"):
        envfile.parse("A=1\nnot a pair\n", source="sync.env")


def test_file_values_override_the_environment_and_a_missing_file_changes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sync.env"
    assert envfile.overlay({"A": "1"}, path) == {"A": "1"}
    path.write_text("A=2\nB=3\n")
    assert envfile.overlay({"A": "1", "C": "4"}, path) == {"A": "2", "B": "3", "C": "4"}
