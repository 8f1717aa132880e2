"""Pause, resume and force as an operator uses them: the CLI against a running daemon.

The daemon runs as a subprocess against an SQLite file and the reference backend; `pause`,
`resume`, `force`, `once` and `status` are the real commands. What is checked is what the
backend receives (its own request counter), what the database holds (leases, failures,
operations) and what the views show (STATUS=, /status, /metrics, `status`).
"""

from __future__ import annotations

import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from daemon.app import CONTROL_POLL_SECONDS, EX_PAUSED
from tests.acceptance.conftest import Backend, Database, Harness, Proc, wait_until

pytestmark = pytest.mark.skipif(
    not Path("/proc").is_dir() or not hasattr(signal, "SIGUSR1"),
    reason="needs a Linux process model (signals, /proc, unix sockets)",
)

USERS = 120
LATENCY_MS = 300
CONCURRENCY = 2
# Calls a pause may still let through: what the callers dispatch during one control poll
# period at this latency, plus the calls in flight, with a wide margin for a loaded
# machine.
LATE_CALLS_BOUND = CONCURRENCY * (int(CONTROL_POLL_SECONDS * 1000 / LATENCY_MS) + 1) * 3


def _requests(backend: Backend) -> int:
    return int(backend.stats()["requests"])


def _stays_flat(backend: Backend, seconds: float) -> int:
    """The backend's request count does not move for `seconds`, and nothing is in flight."""
    count = _requests(backend)
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        stats = backend.stats()
        assert stats["requests"] == count, f"calls after the pause settled: {stats}"
        assert stats["in_flight"] == 0, stats
        time.sleep(0.1)
    return count


def _metrics(harness: Harness, daemon: Proc) -> str:
    with urllib.request.urlopen(harness.status_url(daemon) + "/metrics", timeout=5) as response:
        return response.read().decode()


def _paused_env(harness: Harness, backend: Backend, users: int) -> tuple[Database, dict[str, str]]:
    db = harness.database(users=users)
    env = harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_CONCURRENCY=CONCURRENCY,
        SYNC_CLAIM_BATCH_SIZE=500,  # the backlog holds a second of calls (daemon.backlog)
        SYNC_LEASE_SECONDS=120,
    )
    return db, env


def test_pause_mid_cycle_stops_calls_and_releases_the_backlog_then_resume_and_force_sync_the_rest(
    harness: Harness,
) -> None:
    backend = harness.start_backend(latency_ms=LATENCY_MS)
    db, env = _paused_env(harness, backend, USERS)
    daemon = harness.start_daemon(env)
    wait_until(
        lambda: db.held_leases() and _requests(backend) >= 2 * CONCURRENCY,
        what="a cycle with a claimed backlog",
        describe=harness.describe,
    )

    paused = harness.cli("pause", env=env)
    assert paused.returncode == 0, paused
    at_pause = _requests(backend)

    finished = daemon.wait_for_event("cycle_finished")
    assert finished["outcome"] == "paused", finished
    late = _requests(backend) - at_pause
    assert late <= LATE_CALLS_BOUND, f"{late} calls after pause (bound {LATE_CALLS_BOUND})"
    called = _stays_flat(backend, 2 * CONTROL_POLL_SECONDS)
    assert called < USERS
    assert db.held_leases() == []  # the unstarted claims were given back
    assert db.query("SELECT count(*) FROM sync_user_state WHERE consecutive_failures > 0") == [(0,)]
    released = db.query(
        "SELECT count(*) FROM sync_operations WHERE outcome = 'released'"
        " AND error = 'paused by an operator'"
    )[0][0]
    assert released == finished["claimed"] - called == finished["skipped"]
    assert released > 0  # the pause came while claims waited in the backlog
    assert len(db.synced_ids()) == called
    run = db.query("SELECT outcome, error FROM sync_runs WHERE outcome != 'running'")
    assert run == [("paused", f"paused by an operator; {released} claimed user(s) released")]

    assert harness.cli("resume", env=env).returncode == 0
    daemon.wait_for_event("sync_resumed")
    forced = harness.cli("force", env=env)
    assert forced.returncode == 0, forced
    wait_until(
        lambda: len(db.synced_ids()) == USERS,
        what="the rest synced after resume and force",
        describe=harness.describe,
    )
    stats = backend.stats()
    assert stats["requests"] == USERS  # every user called exactly once, across the pause
    assert stats["overlaps"] == 0


def test_a_paused_daemon_says_so_in_status_line_http_status_metrics_and_status_command(
    harness: Harness,
) -> None:
    backend = harness.start_backend(latency_ms=5)
    db, env = _paused_env(harness, backend, 3)
    daemon = harness.start_daemon(env)
    daemon.wait_for_event("cycle_finished", outcome="succeeded")
    assert "background_sync_paused 0.0" in _metrics(harness, daemon)

    since = time.monotonic()
    assert harness.cli("pause", env=env).returncode == 0
    daemon.wait_for_event("sync_paused")
    status_line = wait_until(
        lambda: next(
            (v for v in harness.notify.values("STATUS", since=since) if v.startswith("paused")),
            None,
        ),
        what="a STATUS= line saying paused",
        describe=harness.describe,
    )
    assert status_line.startswith("paused by ")
    assert status_line.endswith(" UTC, next cycle on resume")

    snapshot = harness.status(daemon)
    assert snapshot["paused"] is True
    assert snapshot["state"] == "paused"
    assert snapshot["paused_by"] and "@" in snapshot["paused_by"]
    assert snapshot["paused_at"]
    assert snapshot["status"].startswith("paused by ")
    assert snapshot["health"] == "healthy"  # a pause is an operator's choice, not a fault
    assert "background_sync_paused 1.0" in _metrics(harness, daemon)

    def status_shows_the_instance_paused() -> str | None:
        out = harness.cli("status", env=env).stdout
        return out if "PAUSED by" in out and ": paused, circuit" in out else None

    wait_until(status_shows_the_instance_paused, what="`status` to show the pause")

    assert harness.cli("resume", env=env).returncode == 0
    daemon.wait_for_event("sync_resumed")
    wait_until(
        lambda: "background_sync_paused 0.0" in _metrics(harness, daemon),
        what="the paused gauge back to 0",
    )
    assert harness.status(daemon)["paused"] is False
    assert db.synced_ids() == {1, 2, 3}


def test_force_while_paused_says_the_daemon_is_paused_and_starts_no_cycle(
    harness: Harness,
) -> None:
    backend = harness.start_backend(latency_ms=5)
    db, env = _paused_env(harness, backend, 3)
    assert harness.cli("pause", env=env).returncode == 0
    daemon = harness.start_daemon(env)
    daemon.wait_for_event("daemon_ready")

    forced = harness.cli("force", env=env)
    assert forced.returncode == EX_PAUSED, forced
    assert "cycle requested" not in forced.stdout + forced.stderr
    assert forced.stderr.startswith("background-sync: not forced: every instance is paused by ")
    assert "until `background-sync resume`" in forced.stderr
    assert db.query("SELECT force_requested_at FROM sync_control") == [(None,)]
    _stays_flat(backend, 2 * CONTROL_POLL_SECONDS)
    assert _requests(backend) == 0
    assert not daemon.events("cycle_requested")
    assert db.synced_ids() == set()


def test_pause_twice_says_it_is_already_paused(harness: Harness) -> None:
    backend = harness.start_backend()
    _, env = _paused_env(harness, backend, 1)
    assert harness.cli("pause", env=env).returncode == 0
    again = harness.cli("pause", env=env)
    assert again.returncode == 0
    assert again.stdout.startswith("already paused by ")


# -- once ---------------------------------------------------------------------------------


def test_once_while_paused_calls_nobody_and_exits_3_with_one_line_saying_why(
    harness: Harness,
) -> None:
    backend = harness.start_backend()
    db, env = _paused_env(harness, backend, 30)
    assert harness.cli("pause", env=env).returncode == 0

    once = harness.cli("once", env=env)
    assert once.returncode == EX_PAUSED == 3, once
    lines = once.stderr.splitlines()
    assert len(lines) == 1, once.stderr
    assert lines[0].startswith("background-sync: paused by ")
    assert lines[0].endswith(" UTC; nothing synced (use --ignore-pause to run anyway)")
    assert _requests(backend) == 0
    assert db.synced_ids() == set()
    assert db.query("SELECT count(*) FROM sync_runs") == [(0,)]


def test_once_with_ignore_pause_syncs_everyone_while_paused(harness: Harness) -> None:
    backend = harness.start_backend()
    db, env = _paused_env(harness, backend, 30)
    assert harness.cli("pause", env=env).returncode == 0

    once = harness.cli("once", "--ignore-pause", env=env)
    assert once.returncode == 0, once
    assert len(db.synced_ids()) == 30
    assert _requests(backend) == 30


def test_once_paused_while_it_runs_stops_calling_and_exits_3(harness: Harness) -> None:
    backend = harness.start_backend(latency_ms=LATENCY_MS)
    db, env = _paused_env(harness, backend, USERS)
    once = Proc("once", [sys.executable, "-m", "daemon", "once"], env=env, cwd=harness.tmp)
    harness.procs.append(once)
    wait_until(
        lambda: _requests(backend) >= 2 * CONCURRENCY,
        what="once to be calling",
        describe=harness.describe,
    )
    assert harness.cli("pause", env=env).returncode == 0
    at_pause = _requests(backend)

    assert once.wait_exit() == EX_PAUSED
    assert _requests(backend) - at_pause <= LATE_CALLS_BOUND
    assert _requests(backend) < USERS
    assert db.held_leases() == []
    errors = [line.text for line in once.lines("stderr")]
    assert len(errors) == 1 and errors[0].startswith("background-sync: paused by "), errors
    assert " stopped after " in errors[0]
