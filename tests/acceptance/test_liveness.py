"""What `status` and `cleanup` say about real daemons: one stopped with SIGTERM, one
killed with -9, one in the middle of a cycle.

Each daemon is `python -m daemon run` on a SQLite file, the backend the reference
backend on 127.0.0.1, and `status` / `cleanup` the real command line.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
from typing import Any

from daemon.control import LOST_AFTER_SECONDS
from tests.acceptance.conftest import Database, Harness, Proc, wait_until


def status_json(harness: Harness, env: dict[str, str]) -> dict[str, Any]:
    done = harness.cli("status", "--json", env=env)
    assert done.returncode in (0, 5, 6), done.stdout + done.stderr  # healthy, lost, stopped
    return json.loads(done.stdout)


def instance_of(harness: Harness, env: dict[str, str], daemon: Proc) -> dict[str, Any] | None:
    for inst in status_json(harness, env)["instances"]:
        if f":{daemon.pid}:" in inst["instance"]:
            return inst
    return None


def wait_listed(harness: Harness, env: dict[str, str], daemon: Proc, state: str) -> None:
    wait_until(
        lambda: (inst := instance_of(harness, env, daemon)) is not None and inst["state"] == state,
        what=f"status to list the daemon as {state}",
        describe=daemon.tail,
    )


def write(db: Database, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(db.path, timeout=10)) as conn, conn:
        conn.execute(sql)


def test_a_daemon_stopped_with_sigterm_is_listed_as_stopped_not_idle(harness: Harness) -> None:
    harness.database(users=3)
    backend = harness.start_backend()
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=3600)
    daemon = harness.start_daemon(env)
    daemon.wait_for_event("cycle_finished")
    wait_listed(harness, env, daemon, "idle")

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.tail()

    inst = instance_of(harness, env, daemon)
    assert inst is not None, "a clean stop keeps the row, so status can say when"
    assert (inst["state"], inst["lost"]) == ("stopped", False), inst
    shown = harness.cli("status", env=env).stdout
    assert f"  {inst['instance']}: stopped " in shown, shown


def test_a_daemon_killed_with_sigkill_is_listed_as_lost_once_silent_past_the_bound(
    harness: Harness,
) -> None:
    db = harness.database(users=3)
    backend = harness.start_backend()
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=3600)
    daemon = harness.start_daemon(env)
    daemon.wait_for_event("cycle_finished")
    wait_listed(harness, env, daemon, "idle")

    daemon.signal(signal.SIGKILL)
    daemon.wait_exit()
    # Time passing on the database's clock, as SQLite stores it (text, microseconds).
    write(
        db,
        "UPDATE sync_instances SET heartbeat_at = "
        f"strftime('%Y-%m-%d %H:%M:%f', 'now', '-{LOST_AFTER_SECONDS + 5:g} seconds') || '000'",
    )

    inst = instance_of(harness, env, daemon)
    assert inst is not None
    assert (inst["state"], inst["last_state"], inst["lost"]) == ("lost", "idle", True), inst
    assert inst["seen_seconds_ago"] >= LOST_AFTER_SECONDS
    shown = harness.cli("status", env=env).stdout
    assert f"  {inst['instance']}: LOST: silent for " in shown, shown


def test_cleanup_refuses_a_threshold_below_the_lease_and_leaves_a_live_cycle_alone(
    harness: Harness,
) -> None:
    db = harness.database(users=12)
    # Every call hangs until the request timeout: the cycle is mid-flight for that long.
    backend = harness.start_backend(hang_rate=1, latency_ms=0)
    lease = 120
    env = harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_CONCURRENCY=4,
        SYNC_ADAPTIVE_CONCURRENCY="false",  # all 4 in flight from the first call
        SYNC_MAX_RETRIES=0,
        SYNC_LEASE_SECONDS=lease,
        SYNC_REQUEST_TIMEOUT_SECONDS=lease - 20,
        SYNC_SHUTDOWN_GRACE_SECONDS=1,
    )
    daemon = harness.start_daemon(env)
    wait_until(
        lambda: backend.stats()["in_flight"] == 4,
        what="4 calls in flight",
        describe=harness.describe,
    )
    wait_listed(harness, env, daemon, "syncing")
    leases = db.held_leases()
    assert leases

    for threshold in ("0", "-5", str(lease - 1)):
        refused = harness.cli("cleanup", "--stale-after", threshold, env=env)
        assert refused.returncode == 64, (threshold, refused.stdout, refused.stderr)
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert f"--stale-after {threshold}" in refused.stderr
        assert "SYNC_LEASE_SECONDS" in refused.stderr

    # A heartbeat held up (a slow database) does not make the run abandoned either:
    # its instance still renews live leases.
    write(db, "UPDATE sync_runs SET heartbeat_at = '2000-01-01 00:00:00.000000'")
    done = harness.cli("cleanup", "--stale-after", str(lease), env=env)
    assert done.returncode == 0, done.stderr
    assert "freed 0 expired lease(s), closed 0 abandoned run(s), forgot 0" in done.stdout

    assert db.query("SELECT outcome FROM sync_runs") == [("running",)]
    assert db.query("SELECT count(*) FROM sync_operations") == [(0,)]
    assert {row[:2] for row in db.held_leases()} == {row[:2] for row in leases}
    assert (inst := instance_of(harness, env, daemon)) is not None and inst["state"] == "syncing"
    assert daemon.alive

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.tail()
    assert db.held_leases() == []
