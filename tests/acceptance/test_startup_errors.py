"""Start-up and configuration errors as an operator meets them: one line, the right status.

A setting that cannot work stops the process with 78 (EX_CONFIG), which the unit does
not restart; an outage waits and exits 69; a database file lost while running exits 74.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys

import pytest
from sqlalchemy.engine import make_url

from tests.acceptance.conftest import Harness, Proc


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize(
    "query", ["?bogus=1", "?prepare_threshold=0", "?sslmode=sometimes", "?keepalives_idle=x"]
)
def test_check_config_with_a_bad_url_option_exits_78_with_one_line(
    harness: Harness, query: str
) -> None:
    env = harness.env(SYNC_DATABASE_URL=f"postgresql+psycopg://app@127.0.0.1/app{query}")
    done = harness.cli("check-config", env=env)
    assert done.returncode == 78, done.stdout + done.stderr
    assert _one_line(done.stderr).startswith("background-sync: SYNC_DATABASE_URL: ")
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("path", ["/etc/hostname/sync.db", "/proc/background-sync/sync.db"])
@pytest.mark.parametrize("command", [["run"], ["once"], ["status"], ["migrate"], ["pause"]])
def test_an_unusable_sqlite_path_exits_78_with_one_line(
    harness: Harness, path: str, command: list[str]
) -> None:
    done = harness.cli(*command, env=harness.env(SYNC_DATABASE_URL=f"sqlite:///{path}"))
    assert done.returncode == 78, done.stdout + done.stderr
    line = _one_line(done.stderr)
    assert line.startswith("background-sync: SYNC_DATABASE_URL: ")
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        *((command, "database") for command in ("run", "once", "status", "migrate", "force")),
        *((command, "database") for command in ("cleanup", "seed-demo")),
        ("run", "role"),
        ("status", "role"),
    ],
)
def test_a_database_that_refuses_the_login_exits_78_at_once(
    harness: Harness, postgres_database: str, command: str, missing: str
) -> None:
    """A missing database or role answers the same on every restart: no wait, no 69."""
    url = make_url(postgres_database)
    url = url.set(database="no_such_db") if missing == "database" else url.set(username="nobody_x")
    env = harness.env(SYNC_DATABASE_URL=url.render_as_string(False))
    done = harness.cli(command, env=env, timeout=30)
    assert done.returncode == 78, done.stdout + done.stderr
    line = _one_line(done.stderr)
    assert line.startswith("background-sync: SYNC_DATABASE_URL: the server refused: ")
    assert "does not exist" in line
    assert "database_waiting" not in done.stdout


def test_a_misspelt_variable_is_warned_about_by_check_config(harness: Harness) -> None:
    done = harness.cli("check-config", env=harness.env(SYNC_CONCURENCY="8"))
    assert done.returncode == 0, done.stderr
    line = _one_line(done.stderr)
    assert "SYNC_CONCURENCY" in line and "did you mean SYNC_CONCURRENCY?" in line
    assert json.loads(done.stdout)["concurrency"] == 16


def test_a_misspelt_variable_is_logged_when_the_daemon_starts(harness: Harness) -> None:
    harness.database(users=1)
    daemon = harness.start_daemon(harness.env(harness.start_backend(), SYNC_CONCURENCY="8"))
    warning = daemon.wait_for_event("unknown_variable")
    assert "did you mean SYNC_CONCURRENCY?" in warning["warning"]
    daemon.wait_for_event("daemon_ready")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def test_removing_the_sqlite_directory_stops_the_daemon_with_74(harness: Harness) -> None:
    """No sync is "recorded" into a deleted file: the daemon stops and says why."""
    (harness.tmp / "state").mkdir()
    harness.database(users=60, name="state/sync.db")
    backend = harness.start_backend(latency_ms=300)
    env = harness.env(backend, SYNC_CONCURRENCY="2", SYNC_SHUTDOWN_GRACE_SECONDS="5")
    daemon = harness.start_daemon(env)
    daemon.wait_for_event("user_synced", count=4, timeout=30)

    shutil.rmtree(harness.tmp / "state")
    status = daemon.wait_exit(timeout=30)

    assert status == 74, daemon.tail()
    lost = daemon.events("database_file_lost")
    assert len(lost) == 1, daemon.tail()
    errors = [line.text for line in daemon.lines("stderr")]
    assert errors == [f"background-sync: SYNC_DATABASE_URL: {lost[0]['error']}"]
    assert "is gone" in errors[0]
    names = [line.event.get("event") for line in daemon.lines() if line.event is not None]
    after = names[names.index("database_file_lost") :]
    assert after.count("user_synced") <= 2  # only the calls that were in flight
    assert backend.stats()["requests"] < 60


def test_removing_the_sqlite_file_during_once_exits_74(harness: Harness) -> None:
    database = harness.database(users=30)
    backend = harness.start_backend(latency_ms=300)
    env = harness.env(
        backend, SYNC_CONCURRENCY="2", SYNC_CLAIM_BATCH_SIZE="2", SYNC_SHUTDOWN_GRACE_SECONDS="2"
    )
    once = Proc("once", [sys.executable, "-m", "daemon", "once"], env=env, cwd=harness.tmp)
    harness.procs.append(once)
    once.wait_for_event("user_synced", count=2, timeout=30)

    for path in harness.tmp.glob(f"{database.path.name}*"):
        path.unlink()
    status = once.wait_exit(timeout=60)

    assert status == 74, once.tail()
    assert [e["error"] for e in once.events("database_file_lost")] == [
        f"the database file {database.path} is gone (No such file or directory)"
    ]
    assert backend.stats()["requests"] < 30
