"""The daemon as systemd runs it: a real process, real signals, a real NOTIFY_SOCKET.

Each test starts `python -m daemon run` (or `once`, `status`, `check-config`) as a
subprocess against an SQLite file prepared with `migrate` and `seed-demo`, and the bundled
reference backend as a real HTTP server on 127.0.0.1. What the tests look at is what an
operator or systemd sees: exit statuses, notify datagrams, JSON log lines on stdout, the
rows in the database and the backend's own counters.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.acceptance.conftest import Backend, Harness, Proc, json_lines, wait_until

# STATUS= between cycles: "idle, 100 % fresh, next cycle in 59 min"
IDLE = r"idle, (\d+(?:\.\d)? % fresh(?:, [^,]+)*), next cycle in (\d+ (?:s|min|h))"

pytestmark = pytest.mark.skipif(
    not Path("/proc").is_dir() or not hasattr(signal, "SIGUSR1"),
    reason="needs a Linux process model (signals, /proc, unix sockets)",
)


def _ready(harness: Harness, daemon: Proc) -> None:
    harness.notify.wait_for("READY", "1", describe=harness.describe)
    daemon.wait_for_event("daemon_ready")


def _holds_file_open(pid: int, path: Path) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
    except (FileNotFoundError, PermissionError):
        return False
    return str(path) in links


def _gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


# -- readiness and status ---------------------------------------------------------------------


def test_ready_is_sent_once_the_database_answers_and_status_describes_the_state(
    harness: Harness,
) -> None:
    db = harness.database(users=6)
    backend = harness.start_backend(latency_ms=600)
    env = harness.env(
        backend, SYNC_INTERVAL_SECONDS=3600, SYNC_CONCURRENCY=2, SYNC_LEASE_SECONDS=60
    )
    # The database does not answer yet: a writer holds it, so the daemon's first
    # transaction waits on SQLite's busy timeout.
    blocker = sqlite3.connect(db.path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        daemon = harness.start_daemon(env)
        wait_until(
            lambda: _holds_file_open(daemon.pid, db.path),
            what="the daemon to open the database",
            describe=daemon.tail,
        )
        time.sleep(0.1)
        held_until = time.monotonic() + 1.0
        while time.monotonic() < held_until:
            assert daemon.alive, daemon.tail()
            assert not harness.notify.messages("READY"), "READY=1 before the database answered"
            time.sleep(0.05)
        released = time.monotonic()
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()

    ready = harness.notify.wait_for("READY", "1", describe=harness.describe)
    assert ready.at >= released
    assert ready.get("STATUS"), "READY=1 should carry a STATUS= line"
    daemon.wait_for_event("daemon_ready")
    assert not harness.notify.messages("STOPPING")

    # 6 users, 2 at a time, 0.6 s each: the cycle outlives the main loop's 1 s wake-up.
    harness.notify.wait_for("STATUS", since=ready.at, describe=harness.describe)
    finished = daemon.wait_for_event("cycle_finished", outcome="succeeded")
    assert finished["succeeded"] == 6

    def statuses() -> list[str]:
        return harness.notify.values("STATUS")

    wait_until(
        lambda: any(re.fullmatch(IDLE, s) for s in statuses()),
        what="an idle STATUS= line",
        describe=harness.notify.dump,
    )
    syncing = [s for s in statuses() if re.fullmatch(r"syncing \d+ of 6", s)]
    assert syncing, f"no 'syncing n of 6' STATUS= line in {statuses()}"
    idle_after = [
        s
        for d in harness.notify.messages("STATUS", since=finished["_at"] - 0.5)
        if (s := d.get("STATUS")) and s.startswith("idle")
    ]
    assert idle_after, harness.notify.dump()
    match = re.fullmatch(IDLE, idle_after[-1])
    assert match is not None, idle_after
    assert match.group(1) == "100 % fresh", idle_after  # every user just synced
    assert match.group(2) in ("58 min", "59 min", "60 min"), idle_after
    assert db.synced_ids() == set(range(1, 7))


@pytest.mark.parametrize("number", [signal.SIGUSR1, signal.SIGHUP], ids=["SIGUSR1", "SIGHUP"])
def test_a_signal_while_waiting_for_the_database_does_not_kill_the_daemon(
    harness: Harness, number: int
) -> None:
    db = harness.database(users=6)
    backend = harness.start_backend()
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=3600)
    blocker = sqlite3.connect(db.path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        daemon = harness.start_daemon(env)
        wait_until(
            lambda: _holds_file_open(daemon.pid, db.path),
            what="the daemon to open the database",
            describe=daemon.tail,
        )
        time.sleep(0.1)
        daemon.signal(number)
        time.sleep(0.1)
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    if not daemon.alive:
        daemon.wait_exit()
    assert daemon.alive, f"killed by a signal during start-up: status {daemon.popen.returncode}"
    _ready(harness, daemon)


# -- the watchdog ------------------------------------------------------------------------------


def test_watchdog_is_fed_while_the_daemon_makes_progress(harness: Harness) -> None:
    harness.database(users=6)
    backend = harness.start_backend(latency_ms=700)
    env = harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_CONCURRENCY=2,
        WATCHDOG_USEC=1_000_000,
        WATCHDOG_PID=None,
    )
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    assert daemon.events("daemon_ready")[0]["watchdog_interval_s"] == 0.5
    started = daemon.wait_for_event("cycle_started")
    finished = daemon.wait_for_event("cycle_finished")
    # Keep watching a little after the (about 2 s long) cycle, while the daemon is idle.
    wait_until(
        lambda: len(harness.notify.messages("WATCHDOG", since=finished["_at"])) >= 3,
        what="WATCHDOG=1 pings after the cycle",
        describe=harness.notify.dump,
    )
    pings = [d.at for d in harness.notify.messages("WATCHDOG")]
    assert all(v == "1" for v in harness.notify.values("WATCHDOG"))
    during = [t for t in pings if started["_at"] <= t <= finished["_at"]]
    assert len(during) >= 2, f"too few pings during the cycle: {harness.notify.dump()}"
    gaps = _gaps(pings)
    assert 0.4 <= statistics.median(gaps) <= 0.65, gaps
    assert max(gaps) < 1.0, gaps  # WatchdogSec=1s: a gap this long would be a restart
    assert min(gaps) > 0.3, gaps


def test_watchdog_is_not_fed_when_watchdog_pid_names_another_process(harness: Harness) -> None:
    harness.database(users=6)
    backend = harness.start_backend()
    env = harness.env(
        backend, SYNC_INTERVAL_SECONDS=3600, WATCHDOG_USEC=1_000_000, WATCHDOG_PID=os.getpid()
    )
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    finished = daemon.wait_for_event("cycle_finished")
    time.sleep(0.1)
    quiet_until = finished["_at"] + 1.5
    while time.monotonic() < quiet_until:
        time.sleep(0.05)
    assert daemon.events("daemon_ready")[0]["watchdog_interval_s"] is None
    assert not harness.notify.messages("WATCHDOG"), harness.notify.dump()


def _stall_env(harness: Harness, backend: Backend) -> dict[str, str]:
    # Database units are bounded by the lease (3 s) plus 5 s of grace; SQLite's busy
    # timeout is 10 s and units are retried, so a held write lock really overruns that.
    return harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_LEASE_SECONDS=3,
        SYNC_REQUEST_TIMEOUT_SECONDS=1,
        SYNC_CONCURRENCY=1,
        WATCHDOG_USEC=1_000_000,
        WATCHDOG_PID=None,
    )


def test_stalled_cycle_stops_the_watchdog_pings(harness: Harness) -> None:
    db = harness.database(users=6)
    backend = harness.start_backend()
    env = _stall_env(harness, backend)
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    daemon.wait_for_event("cycle_finished", outcome="succeeded")
    harness.wait_no_cycle(daemon)
    harness.notify.wait_for("WATCHDOG", "1", describe=harness.describe)
    seeded = harness.cli("seed-demo", "--users", "30", env=env)
    assert seeded.returncode == 0, seeded.stderr
    backend.set_faults(latency_ms=300)  # the forced cycle takes a while: 24 users, 1 at a time

    daemon.signal(signal.SIGUSR1)
    daemon.wait_for_event("cycle_requested", reason="SIGUSR1")
    daemon.wait_for_event("user_synced", count=7)  # the forced cycle is under way
    blocker = sqlite3.connect(db.path, isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        locked = time.monotonic()
        withheld = daemon.wait_for_event("watchdog_withheld", timeout=20)
        assert withheld["stalled_on"].startswith("database "), withheld
        assert withheld["level"] == "error"
        # Overrunning means 3 s bound + 5 s grace: nothing is withheld sooner.
        assert withheld["_at"] - locked >= 7.5
        # No pings now, for as long as the lock is held.
        quiet_since = withheld["_at"]
        while time.monotonic() < quiet_since + 3.0:
            assert daemon.alive, daemon.tail()
            time.sleep(0.05)
        assert not harness.notify.messages("WATCHDOG", since=quiet_since)
        released = time.monotonic()
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()

    resumed = harness.notify.wait_for("WATCHDOG", "1", since=released, timeout=5)
    before = [d.at for d in harness.notify.messages("WATCHDOG") if d.at < withheld["_at"]]
    gap = resumed.at - before[-1]
    assert gap >= 3.5, f"pings did not stop long enough: gap {gap:.2f}s"
    # The cycle itself got through once the database answered, losing nobody.
    finished = daemon.wait_for_event("cycle_finished", count=2)
    assert (finished["outcome"], finished["succeeded"]) == ("succeeded", 24), finished
    assert db.synced_ids() == set(range(1, 31))
    wait_until(
        lambda: len(harness.notify.messages("WATCHDOG", since=resumed.at)) >= 3,
        what="steady pings after the stall",
        describe=harness.notify.dump,
    )
    assert daemon.alive


def test_a_cycle_wedged_on_a_locked_database_at_its_start_stops_the_watchdog_pings(
    harness: Harness,
) -> None:
    db = harness.database(users=6)
    backend = harness.start_backend()
    env = _stall_env(harness, backend)
    env.update(SYNC_LEASE_SECONDS="1", SYNC_REQUEST_TIMEOUT_SECONDS="0.5")  # bound: 1 s + 5 s
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    daemon.wait_for_event("cycle_finished", outcome="succeeded")
    harness.wait_no_cycle(daemon)
    blocker = sqlite3.connect(db.path, isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        forced = daemon.signal(signal.SIGUSR1)
        # 1 s bound + 5 s grace + one 0.5 s watchdog tick, and some slack.
        withheld = daemon.wait_for_event("watchdog_withheld", timeout=8)
        assert withheld["_at"] - forced >= 5.5
        assert not harness.notify.messages("WATCHDOG", since=withheld["_at"])
    finally:
        blocker.close()


def test_sigterm_while_the_database_is_locked_stops_an_idle_daemon_promptly(
    harness: Harness,
) -> None:
    db = harness.database(users=6)
    backend = harness.start_backend()
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=3600, SYNC_SHUTDOWN_GRACE_SECONDS=1)
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    daemon.wait_for_event("cycle_finished", outcome="succeeded")
    harness.wait_no_cycle(daemon)
    blocker = sqlite3.connect(db.path, isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        # Idle, with nothing in flight; let the daemon run into the lock on its own.
        locked = time.monotonic()
        while time.monotonic() < locked + 2.2:  # the control poll comes every 2 s
            time.sleep(0.05)
        sent = daemon.signal(signal.SIGTERM)
        harness.notify.wait_for("STOPPING", "1", since=sent, timeout=2)
        # A database unit already waiting on the lock ends at SQLite's busy timeout
        # (10 s) and is not retried once stopping: the exit is bounded by that.
        status = daemon.wait_exit(timeout=13)
    finally:
        blocker.close()
    assert status == 0


# -- stopping ----------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_calls_and_exits_zero(harness: Harness) -> None:
    db = harness.database(users=10)
    backend = harness.start_backend(latency_ms=1500)
    grace = 10
    env = harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_CONCURRENCY=4,
        SYNC_ADAPTIVE_CONCURRENCY="false",  # all 4 in flight from the first call
        SYNC_SHUTDOWN_GRACE_SECONDS=grace,
    )
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    wait_until(
        lambda: backend.stats()["in_flight"] == 4,
        what="4 calls in flight",
        describe=harness.describe,
    )
    in_flight = set(backend.stats()["per_user_calls"])
    sent = daemon.signal(signal.SIGTERM)
    status = daemon.wait_exit(timeout=grace + 5)
    took = time.monotonic() - sent

    assert status == 0, daemon.tail()
    assert took < grace, f"took {took:.1f}s to stop"
    assert harness.notify.messages("STOPPING"), harness.notify.dump()
    stats = backend.stats()
    called = {int(u) for u in stats["per_user_calls"]}
    assert {int(u) for u in in_flight} == called, "a call started after SIGTERM"
    assert len(called) == 4
    assert stats["in_flight"] == 0
    synced_events = {e["user_id"] for e in daemon.events("user_synced")}
    assert synced_events == called
    assert db.synced_ids() == called
    assert db.held_leases() == []
    assert daemon.events("shutdown_requested", reason="SIGTERM")
    finished = daemon.events("cycle_finished")[-1]
    assert finished["outcome"] == "interrupted"
    assert finished["succeeded"] == 4
    assert daemon.events("daemon_stopped", exit_status=0)


def test_sigterm_past_the_grace_period_cuts_calls_and_releases_leases(harness: Harness) -> None:
    db = harness.database(users=6)
    backend = harness.start_backend(hang_rate=1, latency_ms=0)
    env = harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_CONCURRENCY=4,
        SYNC_ADAPTIVE_CONCURRENCY="false",  # all 4 in flight from the first call
        SYNC_REQUEST_TIMEOUT_SECONDS=30,
        SYNC_LEASE_SECONDS=60,
        SYNC_SHUTDOWN_GRACE_SECONDS=1,
    )
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    wait_until(
        lambda: backend.stats()["in_flight"] == 4,
        what="4 hanging calls",
        describe=harness.describe,
    )
    wait_until(lambda: len(db.held_leases()) == 6, what="6 leases", describe=harness.describe)
    sent = daemon.signal(signal.SIGTERM)
    status = daemon.wait_exit(timeout=15)
    took = time.monotonic() - sent

    assert status == 0, daemon.tail()
    assert took < 4, f"took {took:.1f}s to stop with a 1 s grace period"
    assert daemon.events("cycle_drain_timeout", cancelled=4)
    assert harness.notify.messages("STOPPING")
    assert db.held_leases() == []
    assert db.synced_ids() == set()
    assert not daemon.events("user_synced")
    # The cut calls count as nothing: no failure recorded against those users.
    assert db.query("SELECT COUNT(*) FROM sync_user_state WHERE consecutive_failures > 0") == [(0,)]
    wait_until(
        lambda: backend.stats()["in_flight"] == 0,
        what="the backend to see the calls go away",
        describe=harness.describe,
    )


def test_second_sigint_exits_at_once(harness: Harness) -> None:
    harness.database(users=10)
    backend = harness.start_backend(latency_ms=3000)
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=3600, SYNC_CONCURRENCY=2)
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    wait_until(
        lambda: backend.stats()["in_flight"] == 2,
        what="calls in flight",
        describe=harness.describe,
    )
    daemon.signal(signal.SIGINT)
    daemon.wait_for_event("shutdown_requested", reason="SIGINT")
    assert daemon.alive, "the first SIGINT should drain, not exit"
    sent = daemon.signal(signal.SIGINT)
    status = daemon.wait_exit(timeout=5)
    took = time.monotonic() - sent

    assert status == 130, daemon.tail()
    assert took < 1.5, f"took {took:.1f}s to exit after the second SIGINT"
    assert daemon.events("forced_exit", reason="second SIGINT")
    assert not daemon.events("user_synced"), "the calls should have been cut, not finished"
    assert not daemon.events("daemon_stopped")


# -- cycles on demand --------------------------------------------------------------------------


def test_sigusr1_starts_a_cycle_now(harness: Harness) -> None:
    db = harness.database(users=6)
    backend = harness.start_backend()
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=3600)
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    first = daemon.wait_for_event("cycle_finished")
    assert first["claimed"] == 6
    harness.wait_no_cycle(daemon)

    seeded = harness.cli("seed-demo", "--users", "9", env=env)
    assert seeded.returncode == 0, seeded.stderr
    assert db.synced_ids() == set(range(1, 7))
    daemon.signal(signal.SIGUSR1)
    daemon.wait_for_event("cycle_requested", reason="SIGUSR1")
    second = daemon.wait_for_event("cycle_finished", count=2)

    assert second["outcome"] == "succeeded"
    assert second["claimed"] == 3
    assert db.synced_ids() == set(range(1, 10))
    assert {e["user_id"] for e in daemon.events("user_synced")} == set(range(1, 10))
    assert not daemon.events("cycle_tick_skipped")


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SYNC_CONCURRENCY", "zero"),
        ("SYNC_BACKEND_URL", "ftp://x"),
        ("SYNC_USERS_TABLE", "users; drop"),
        ("SYNC_LEASE_SECONDS", "5"),  # not longer than SYNC_REQUEST_TIMEOUT_SECONDS=30
    ],
)
def test_bad_setting_exits_78_with_one_line_naming_the_variable(
    harness: Harness, variable: str, value: str
) -> None:

    env = harness.env(None, **{variable: value})
    daemon = harness.start_daemon(env)
    status = daemon.wait_exit()

    assert status == 78
    errors = [line.text for line in daemon.lines("stderr")]
    assert len(errors) == 1, errors
    assert variable in errors[0]
    assert not harness.notify.messages("READY")


def test_run_without_the_daemons_tables_exits_78_and_says_to_migrate(harness: Harness) -> None:
    harness.database(users=6, migrated=False)
    daemon = harness.start_daemon(harness.env())
    status = daemon.wait_exit()

    assert status == 78, daemon.tail()
    messages = [e.get("error", "") for e in daemon.events("config_error")]
    messages += [line.text for line in daemon.lines("stderr")]
    assert any("migrate" in m for m in messages), daemon.tail()
    assert not harness.notify.messages("READY")


def test_sighup_reloads_the_interval_from_the_env_file(harness: Harness) -> None:
    harness.database(users=6)
    backend = harness.start_backend()
    env_file = harness.tmp / "sync.env"
    env_file.write_text("# written by the test\nSYNC_INTERVAL_SECONDS=3600\n")
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=None)
    daemon = harness.start_daemon(env, "--env-file", str(env_file))
    _ready(harness, daemon)
    assert daemon.events("daemon_ready")[0]["interval_s"] == 3600
    daemon.wait_for_event("cycle_finished")

    env_file.write_text("SYNC_INTERVAL_SECONDS=2\n")
    sent = daemon.signal(signal.SIGHUP)
    reloaded = daemon.wait_for_event("config_reloaded")
    assert "interval_seconds" in reloaded["changed"]
    assert harness.notify.messages("RELOADING", since=sent)
    scheduled = daemon.wait_for_event("cycle_requested", reason="schedule", timeout=6)
    assert scheduled["_at"] - sent <= 4.0

    env_file.write_text("SYNC_INTERVAL_SECONDS=soon\n")
    daemon.signal(signal.SIGHUP)
    rejected = daemon.wait_for_event("reload_rejected")
    assert "SYNC_INTERVAL_SECONDS" in rejected["error"]
    # Still running, still on the 2 s interval.
    count = len(daemon.events("cycle_requested", reason="schedule"))
    daemon.wait_for_event("cycle_requested", reason="schedule", count=count + 1, timeout=6)
    assert daemon.alive
    assert len(daemon.events("config_reloaded")) == 1


def test_sighup_during_a_long_cycle_does_not_abandon_its_users(harness: Harness) -> None:
    db = harness.database(users=40)
    backend = harness.start_backend(latency_ms=200)
    env = harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_CONCURRENCY=1,
        SYNC_REQUEST_TIMEOUT_SECONDS=0.5,
        SYNC_LEASE_SECONDS=10,
    )
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    daemon.wait_for_event("user_synced")
    daemon.signal(signal.SIGHUP)  # nothing changed: a plain `systemctl reload`
    daemon.wait_for_event("config_reloaded")
    finished = daemon.wait_for_event("cycle_finished", timeout=30)

    assert not daemon.events("cycle_crashed")
    assert finished["claimed"] == 40
    assert (finished["outcome"], finished["succeeded"]) == ("succeeded", 40), finished
    assert db.synced_ids() == set(range(1, 41))


def test_sigterm_soon_after_sighup_closes_every_http_session(harness: Harness) -> None:
    harness.database(users=6)
    backend = harness.start_backend()
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=3600)
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    daemon.wait_for_event("cycle_finished")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_event("config_reloaded")
    daemon.signal(signal.SIGTERM)

    assert daemon.wait_exit() == 0
    stderr = "\n".join(line.text for line in daemon.lines("stderr"))
    assert "Unclosed" not in stderr, stderr
    assert stderr == ""


def test_an_empty_status_address_disables_the_status_server(harness: Harness) -> None:

    shown = harness.cli("check-config", env=harness.env(SYNC_STATUS_ADDRESS=""))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status_address"] is None


# -- secrets -----------------------------------------------------------------------------------


def test_the_token_never_appears_in_any_log_line(harness: Harness) -> None:
    token = "tok-" + os.urandom(12).hex() + "-SECRET"
    token_file = harness.tmp / "backend-token"
    token_file.write_text(token + "\n")
    harness.database(users=10)
    backend = harness.start_backend(
        token=token_file.read_text().strip(),  # what the backend's --token-file does
        error_rate=0.4,
        seed=7,
        fail_users=frozenset({"3"}),
    )
    env = harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_BACKEND_TOKEN_FILE=token_file,
        SYNC_MAX_RETRIES=1,
        SYNC_LOG_LEVEL="DEBUG",
        # 40 % errors make five failures in a row likely enough to open the circuit, and
        # then the users behind it are never called; every user must carry the token here
        SYNC_MAX_CONSECUTIVE_FAILURES=1000,
    )
    daemon = harness.start_daemon(env)
    _ready(harness, daemon)
    finished = daemon.wait_for_event("cycle_finished")
    assert finished["succeeded"] >= 1
    assert finished["failed"] >= 1
    assert daemon.events("user_sync_failed")
    status_page = json.dumps(harness.status(daemon))
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    checked = harness.cli("check-config", env=env)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["backend_token"] == "<redacted>"

    stats = backend.stats()
    assert stats["auth_failures"] == 0
    assert stats["requests"] >= 10
    assert stats["last_headers_sample"]["authorization_present"] is True
    everything = [daemon.all_text(), checked.stdout, checked.stderr, status_page]
    everything += [d.text for d in harness.notify.messages()]
    for text in everything:
        assert token not in text
        assert token[4:28] not in text  # not even the random middle of it


# -- one-shot runs and status ------------------------------------------------------------------


def test_once_exits_zero_when_all_synced_and_one_when_any_failed(harness: Harness) -> None:
    healthy_db = harness.database(users=6, name="healthy.db")
    failing_db = harness.database(users=6, name="failing.db")
    healthy = harness.start_backend()
    failing = harness.start_backend(fail_users=frozenset({"3"}))

    ok = harness.cli("once", env=harness.env(healthy, SYNC_DATABASE_URL=healthy_db.url))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert healthy_db.synced_ids() == {1, 2, 3, 4, 5, 6}
    assert healthy_db.held_leases() == []

    bad = harness.cli("once", env=harness.env(failing, SYNC_DATABASE_URL=failing_db.url))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert failing_db.last_sync()[3] is None
    assert failing_db.synced_ids() == {1, 2, 4, 5, 6}
    assert failing_db.held_leases() == []
    events = json_lines(bad.stdout)
    failed = [e for e in events if e.get("event") == "user_sync_failed"]
    assert [e["user_id"] for e in failed] == [3]
    assert failing.stats()["per_user_calls"]["3"] == 4  # 1 + SYNC_MAX_RETRIES (3)


def test_once_whose_log_reader_went_away_still_syncs_and_records_every_user(
    harness: Harness,
) -> None:
    """`once | head -1`, or a journal stream that closed: the log lines are lost, the
    syncs are not. A write to a pipe nobody reads fails (EPIPE); it must not end the
    cycle between a backend's answer and recording it. A failing user's warning is
    written inside its call, so two users fail here."""
    db = harness.database(users=40)
    backend = harness.start_backend(latency_ms=20, fail_users=frozenset({"3", "7"}))
    env = harness.env(backend, SYNC_MAX_RETRIES=0)
    with subprocess.Popen(
        [sys.executable, "-m", "daemon", "once"],
        cwd=harness.tmp,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as once:
        assert once.stdout is not None and once.stderr is not None
        try:
            assert json.loads(once.stdout.readline())["event"]  # one line, then it goes
            once.stdout.close()
            stderr = once.stderr.read()
            status = once.wait(timeout=60)
        finally:
            once.kill()
    assert status == 1, stderr  # some users failed, and nothing else went wrong
    assert db.synced_ids() == set(range(1, 41)) - {3, 7}
    assert db.held_leases() == []
    assert backend.stats()["successes"] == 38
    assert "writing log lines failed (Broken pipe)" in stderr
    assert "Traceback" not in stderr


def test_status_reports_runs_and_failing_users(harness: Harness) -> None:
    db = harness.database(users=6)
    backend = harness.start_backend(fail_users=frozenset({"2"}))
    env = harness.env(backend, SYNC_MAX_RETRIES=0)
    run = harness.cli("once", env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    run_id = next(e["run_id"] for e in json_lines(run.stdout) if e.get("event") == "cycle_finished")

    shown = harness.cli("status", "--json", env=env)
    assert shown.returncode == 6, shown.stderr  # `once` has ended: no instance is running
    data = json.loads(shown.stdout)
    runs = {r["run_id"]: r for r in data["recent_runs"]}
    assert run_id in runs, data
    recorded = runs[run_id]
    counts = (recorded["claimed"], recorded["succeeded"], recorded["failed"])
    assert (recorded["outcome"], counts) == ("failed", (6, 5, 1)), recorded
    assert recorded["finished_at"] is not None
    failing = {str(u["user_id"]): u for u in data["failing_users"]}
    assert set(failing) == {"2"}, data["failing_users"]
    assert failing["2"]["consecutive_failures"] == 1
    assert failing["2"]["last_status"] == 500
    assert data["users_claimed"] == 0
    assert db.synced_ids() == {1, 3, 4, 5, 6}


def test_dry_run_logs_who_would_be_synced_and_calls_and_writes_nothing(harness: Harness) -> None:
    db = harness.database(users=4)
    backend = harness.start_backend()
    env = harness.env(backend, SYNC_INTERVAL_SECONDS=3600, SYNC_DRY_RUN="true")
    daemon = harness.start_daemon(env)
    finished = daemon.wait_for_event("dry_run_finished")
    assert finished["due"] == 4
    assert sorted(e["user_id"] for e in daemon.events("user_would_sync")) == [1, 2, 3, 4]
    assert backend.stats()["requests"] == 0
    assert db.synced_ids() == set()
    assert db.query("SELECT count(*) FROM sync_user_state") == [(0,)]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


@pytest.mark.parametrize(
    "command",
    [["status"], ["migrate"], ["pause"], ["force"], ["cleanup"], ["seed-demo", "--users", "1"]],
)
def test_a_command_against_an_unreachable_database_exits_69_with_one_line(
    harness: Harness, command: list[str]
) -> None:
    env = harness.env(SYNC_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/absent")
    done = harness.cli(*command, env=env)
    assert done.returncode == 69
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Connection refused" in lines[0]
