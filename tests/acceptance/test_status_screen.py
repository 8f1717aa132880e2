"""`background-sync status` as an operator runs it, beside real daemons.

Each daemon is `python -m daemon run` on a SQLite file against the reference backend;
`status` is the real command line, in a shell whose environment is not the daemon's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon import overview
from tests.acceptance.conftest import Database, Harness, wait_until


def status(harness: Harness, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    done = harness.cli("status", "--json", env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def make_stale(db: Database, ids: list[int], *, minutes: int) -> None:
    """As if these users had last been synced `minutes` ago (as the demo table stores it)."""
    with contextlib.closing(sqlite3.connect(db.path, timeout=10)) as conn, conn:
        conn.execute(
            "UPDATE users SET last_sync = strftime('%Y-%m-%d %H:%M:%f', 'now', ?) "
            f"WHERE id IN ({', '.join('?' * len(ids))})",
            (f"-{minutes} minutes", *ids),
        )


def test_status_during_a_running_cycle_shows_n_of_m_and_the_calls_in_flight(
    harness: Harness,
) -> None:
    harness.database(users=200)  # about 25 s of calls: status runs many times meanwhile
    backend = harness.start_backend(latency_ms=250)
    env = harness.env(
        backend,
        SYNC_CONCURRENCY=2,
        SYNC_LEASE_SECONDS=3,  # the run heartbeat (a third of it) writes the counts
        SYNC_REQUEST_TIMEOUT_SECONDS=2,
        SYNC_INTERVAL_SECONDS=3600,
    )
    daemon = harness.start_daemon(env)
    shell = harness.env()  # the operator's shell: none of the daemon's settings

    def progressed() -> dict[str, Any] | None:
        _, data = status(harness, shell)
        running = data["running"]
        # The counts come with the run heartbeat, the calls in flight with the instance's
        # next report (every 2 s): both are there a moment after the cycle starts.
        if running and running[0]["done"] > 0 and running[0]["calls_in_flight"] is not None:
            return running[0]
        return None

    run = wait_until(progressed, what="status to show the cycle's progress", describe=daemon.tail)
    assert run["of"] == 200 and run["due"] == 200
    assert 0 < run["done"] < 200
    assert run["claimed"] >= run["done"]
    assert run["calls_in_flight"] <= 2

    def screen() -> str | None:
        text = harness.cli("status", env=shell).stdout
        return text if re.search(r"cycle running .*: [1-9]\d* of 200 \(", text) else None

    text = wait_until(screen, what="the screen to show n of m", describe=daemon.tail)
    assert "users/s" in text and "claimed so far" in text, text
    assert "call(s) in flight" in text, text


def test_status_judges_due_users_with_the_daemons_thresholds_not_the_shells(
    harness: Harness,
) -> None:
    db = harness.database(users=10)
    backend = harness.start_backend()
    daemon_env = harness.env(backend, SYNC_STALE_AFTER_SECONDS=60, SYNC_INTERVAL_SECONDS=3600)
    daemon = harness.start_daemon(daemon_env)
    daemon.wait_for_event("cycle_finished")
    make_stale(db, [1, 2, 3, 4, 5], minutes=10)  # stale for the daemon (60 s), not for 1 h
    shell = harness.env(SYNC_STALE_AFTER_SECONDS=3600)

    def judged_by_the_daemon() -> dict[str, Any] | None:
        _, data = status(harness, shell)
        return data if data["thresholds"]["source"] == "instance" else None

    data = wait_until(judged_by_the_daemon, what="status to read the daemon's thresholds")
    assert data["due_users"] == 5
    assert data["thresholds"]["values"]["stale_after_seconds"] == 60
    text = harness.cli("status", env=shell).stdout
    assert f"thresholds of instance {data['thresholds']['instance']}: stale after 60 s" in text

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    code, data = status(harness, shell)
    assert code == overview.EXIT_NOT_RUNNING
    assert (data["thresholds"]["source"], data["due_users"]) == ("environment", 0)
    assert "no running instance: this environment's thresholds" in (
        harness.cli("status", env=shell).stdout
    )


def test_status_on_a_missing_sqlite_file_exits_78_and_creates_nothing(harness: Harness) -> None:
    missing = harness.tmp / "typo" / "sync.db"
    missing.parent.mkdir()
    done = harness.cli("status", env=harness.env(SYNC_DATABASE_URL=f"sqlite:///{missing}"))
    assert done.returncode == 78, done.stdout + done.stderr
    assert done.stderr.startswith(
        f"background-sync: SYNC_DATABASE_URL: no database file at {missing}"
    )
    assert list(missing.parent.iterdir()) == []


def test_status_into_a_closed_pipe_exits_quietly(harness: Harness) -> None:
    harness.database(users=3)
    env = harness.env()
    reader = subprocess.Popen(
        [sys.executable, "-m", "daemon", "status"],
        cwd=harness.tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None
    reader.stdout.close()  # gone long before the interpreter has started: `status | head -0`
    _, errors = reader.communicate(timeout=60)
    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors
    assert reader.returncode == overview.EXIT_NOT_RUNNING

    piped = subprocess.run(
        f"'{sys.executable}' -m daemon status | head -1",
        shell=True,
        cwd=harness.tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.stdout.startswith("0 % fresh (objective 99 %), 3 overdue"), piped.stdout
    assert piped.stdout.count("\n") == 1, piped.stdout
    assert piped.stderr == ""


def test_status_exits_with_the_state_healthy_paused_degraded_not_running(
    harness: Harness,
) -> None:
    harness.database(users=6)
    backend = harness.start_backend()
    env = harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_CONCURRENCY=1,  # the third call finds the circuit open and halts the run
        SYNC_MAX_RETRIES=0,
        SYNC_MAX_CONSECUTIVE_FAILURES=2,
        SYNC_CIRCUIT_RESET_SECONDS=600,
    )
    daemon = harness.start_daemon(env)
    daemon.wait_for_event("cycle_finished")

    def exits(code: int) -> dict[str, Any] | None:
        found, data = status(harness, env)
        return data if found == code else None

    wait_until(lambda: exits(overview.EXIT_HEALTHY), what="status 0", describe=daemon.tail)

    assert harness.cli("pause", env=env).returncode == 0
    data = wait_until(lambda: exits(overview.EXIT_PAUSED), what="status 3 (paused)")
    assert data["verdict"]["state"] == "paused"
    assert harness.cli("resume", env=env).returncode == 0
    wait_until(lambda: exits(overview.EXIT_HEALTHY), what="status 0 after resume")

    backend.set_faults(error_rate=1.0)
    with contextlib.closing(sqlite3.connect(harness.tmp / "sync.db", timeout=10)) as conn, conn:
        conn.execute("UPDATE users SET last_sync = NULL")
    assert harness.cli("force", env=env).returncode == 0
    data = wait_until(
        lambda: exits(overview.EXIT_DEGRADED), what="status 4 (circuit open)", describe=daemon.tail
    )
    assert any("circuit open" in reason for reason in data["verdict"]["reasons"]), data["verdict"]
    text = harness.cli("status", env=env).stdout
    assert text.splitlines()[1].startswith("status: DEGRADED (exit 4): "), text
    assert "circuit probe in " in text, text
    assert "circuit open: the backend is failing" in text, text  # the halted run's reason

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert status(harness, env)[0] == overview.EXIT_NOT_RUNNING


def test_failing_users_are_listed_in_numeric_order_and_json_carries_every_part(
    harness: Harness,
) -> None:
    harness.database(users=12)
    backend = harness.start_backend(fail_users=frozenset({"2", "10", "9"}))
    env = harness.env(backend, SYNC_MAX_RETRIES=0)
    assert harness.cli("once", env=env).returncode == 1

    code, data = status(harness, env)

    assert code == overview.EXIT_NOT_RUNNING
    assert [u["user_id"] for u in data["failing_users"]] == [2, 9, 10]
    assert set(data) >= {
        "verdict",
        "database",
        "thresholds",
        "freshness",
        "instances",
        "running",
        "recent_runs",
        "failing_users",
        "failing_users_total",
        "due_users",
        "quarantined_users",
        "users_claimed",
        "leases",
        "next",
        "paused",
        "generated_at",
    }
    assert data["database"]["url"] == f"sqlite:///{Path(harness.tmp / 'sync.db')}"
    text = harness.cli("status", env=env).stdout
    listed = [line.split(":")[0].strip() for line in text.splitlines() if " in a row" in line]
    assert listed == ["2", "9", "10"], text
    assert "T" not in text.split("recent runs:")[1].split("\n")[1][:12]  # "3 s ago", no ISO


def test_an_idle_daemon_is_seen_seconds_ago_and_its_next_cycle_holds_between_rewrites(
    harness: Harness,
) -> None:
    """Between cycles the poll refreshes the heartbeat every 2 s but rewrites the settings
    text only when it changes: `status` still shows the instance seen a moment ago, the
    next cycle at the same moment, and a reloaded interval at the next poll."""
    db = harness.database(users=6)
    backend = harness.start_backend()
    env_file = harness.tmp / "sync.env"
    env_file.write_text("SYNC_INTERVAL_SECONDS=3600\n")
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=None)
    daemon = harness.start_daemon(env, "--env-file", str(env_file))
    daemon.wait_for_event("cycle_finished")
    shell = harness.env()

    def row() -> tuple[str, str]:
        with contextlib.closing(sqlite3.connect(db.path, timeout=10)) as conn:
            heartbeat, text = conn.execute(
                "SELECT heartbeat_at, settings FROM sync_instances"
            ).fetchone()
        return heartbeat, json.loads(text)["live"]["as_of"]

    def next_cycle() -> tuple[float, float]:
        """Seconds to the next cycle as `status` shows them, and the instance's age."""
        _, data = status(harness, shell)
        [inst] = data["instances"]
        at = datetime.fromisoformat(inst["next_cycle_at"])
        now = datetime.fromisoformat(data["database_now"])
        return (at - now).total_seconds(), inst["seen_seconds_ago"]

    wait_until(lambda: row()[0] != row()[1], what="a poll that keeps the settings text")
    looks = []
    for _ in range(3):
        looks.append(next_cycle())
        time.sleep(1.5)
    for (until, _), (later, _) in itertools.pairwise(looks):
        assert 3500 < later < until <= 3600, looks  # counting down, not frozen, not reset
    assert all(seen <= 2.5 for _, seen in looks), looks  # seen at most a poll ago

    env_file.write_text("SYNC_INTERVAL_SECONDS=600\n")
    sent = time.monotonic()
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_event("config_reloaded")
    wait_until(lambda: next_cycle()[0] <= 600, what="status to show the reloaded interval")
    assert time.monotonic() - sent < 2 * 2 + 2  # within a poll or two of the reload
    assert 590 < next_cycle()[0] <= 600
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
