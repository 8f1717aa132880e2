"""background-sync.service under a real systemd, installed and operated as an operator would.

The box (conftest.py) is a Debian bookworm with systemd as PID 1 and loopback only; the
daemon is installed there by `manage_background_sync.sh install` from a wheelhouse, the
reference backend runs beside it as a transient unit, and 200 demo users wait to be synced.
Each test gets the unit stopped and reset, with a drop-in (WatchdogSec=3, RestartSec=1) and
test settings in the env file (every user due in every cycle, no start jitter).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from datetime import datetime

import pytest

from tests.systemd.conftest import UNIT, USERS, Service, say, wait_until

# The first test of a session may build the rootfs, the wheelhouse and install.
pytestmark = pytest.mark.timeout(600)

STATUS_LINE = re.compile(
    r"^((warning|degraded|unhealthy): .+; )?"
    r"(syncing: starting|syncing \d+ of \d+|idle, .*next cycle in \d+ (s|min|h))"
)


def _at(event: dict[str, object]) -> datetime:
    return datetime.fromisoformat(str(event["timestamp"]))


def test_start_returns_only_after_ready_with_the_daemons_status_line(service: Service) -> None:
    blocked = service.start()
    props = service.props(
        "Type",
        "ActiveState",
        "SubState",
        "StatusText",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
    )
    # Read right after `systemctl start` returned: systemd had the READY=1 message (it
    # carries the first STATUS=), so the unit is already active and has a status line.
    assert props["Type"] == "notify"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert STATUS_LINE.match(props["StatusText"]), props["StatusText"]
    ready_after = (
        int(props["ActiveEnterTimestampMonotonic"]) - int(props["ExecMainStartTimestampMonotonic"])
    ) / 1e6
    # A Type=simple unit is active the instant it forks; this one only once READY=1 came.
    assert ready_after > 0.1, f"active {ready_after:.3f}s after the fork: READY=1 not awaited?"
    ready = service.wait_event("daemon_ready")[0]
    assert ready["watchdog_interval_s"] == 1.5  # half of the drop-in's WatchdogSec=3

    status = service.box.systemctl("status", UNIT, "--no-pager", "--lines=0", check=False)
    assert re.search(
        r'Status: "(syncing: starting|syncing \d+ of \d+|idle, .*next cycle in \d+ (s|min|h))',
        status,
    ), status
    say(
        f"start -> active: `systemctl start` blocked {blocked:.2f}s; READY=1 came "
        f"{ready_after:.2f}s after the fork; StatusText={props['StatusText']!r}"
    )


def test_a_frozen_daemon_is_killed_by_the_watchdog_and_restarted(service: Service) -> None:
    service.start()
    before = service.props("MainPID", "NRestarts")
    old_pid = before["MainPID"]
    service.wait_event("daemon_ready")

    service.box.systemctl("kill", "-s", "STOP", "--kill-whom=main", UNIT)
    t0 = time.monotonic()
    results: set[str] = set()

    def restarted() -> dict[str, str] | None:
        props = service.props("MainPID", "ActiveState", "SubState", "Result", "NRestarts")
        results.add(props["Result"])
        fresh = props["MainPID"] not in ("0", old_pid)
        running = (props["ActiveState"], props["SubState"]) == ("active", "running")
        return props if fresh and running else None

    after = wait_until(restarted, timeout=40, what="a new daemon process, active", interval=0.05)
    recovery = time.monotonic() - t0

    assert int(after["NRestarts"]) >= int(before["NRestarts"]) + 1, (before, after)
    messages = "\n".join(service.systemd_messages())
    assert "Watchdog timeout" in messages, messages
    assert "watchdog" in results or "Failed with result 'watchdog'" in messages, (results, messages)
    assert "code=killed, status=6/ABRT" in messages, messages  # the watchdog's SIGABRT
    # PYTHONFAULTHANDLER=1 in the unit: the stack of the hung daemon is in the journal.
    assert "Fatal Python error: Aborted" in service.output_lines(), service.output_lines()[-20:]
    assert recovery < 3 + 10 + 1 + 10, f"took {recovery:.1f}s"  # watchdog+abort+restart+start
    say(
        f"watchdog: SIGSTOP -> new process active in {recovery:.2f}s "
        f"(pid {old_pid} -> {after['MainPID']}, NRestarts {before['NRestarts']} -> "
        f"{after['NRestarts']}, Result seen: {sorted(results)})"
    )


def test_stop_during_a_cycle_drains_in_flight_calls_and_exits_0(service: Service) -> None:
    service.installed.backend_faults(latency_ms=2000)
    service.start()
    service.wait_event("cycle_started")
    wait_until(
        lambda: service.installed.backend_stats()["in_flight"] >= 4,
        timeout=15,
        what="several calls in flight at the backend",
    )
    in_flight = service.installed.backend_stats()["in_flight"]

    t0 = time.monotonic()
    service.box.systemctl("stop", UNIT, timeout=90)
    drain = time.monotonic() - t0

    props = service.props(
        "ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "TimeoutStopUSec"
    )
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success", props
    assert (props["ExecMainCode"], props["ExecMainStatus"]) == ("1", "0"), props  # exited, 0
    events = service.events()
    names = [e["event"] for e in events]
    for name in ("shutdown_requested", "cycle_draining", "cycle_finished", "daemon_stopped"):
        assert name in names, f"{name} not in the journal: {names[-15:]}"
    assert names.index("shutdown_requested") < names.index("cycle_draining")
    assert names.index("cycle_draining") < names.index("cycle_finished")
    draining = next(e for e in events if e["event"] == "cycle_draining")
    assert draining["in_flight"] > 0, draining
    stopped = next(e for e in events if e["event"] == "daemon_stopped")
    assert stopped["exit_status"] == 0
    assert "cycle_drain_timeout" not in names  # 2 s calls end well within the grace
    assert drain < 10, f"drain took {drain:.1f}s with 2 s backend calls"
    say(
        f"drain: `systemctl stop` took {drain:.2f}s with {in_flight} calls in flight at the "
        f"backend (cycle_draining in_flight={draining['in_flight']}; "
        f"TimeoutStopSec={props['TimeoutStopUSec']})"
    )


def test_a_bad_setting_fails_the_unit_once_with_status_78_and_no_restart_loop(
    service: Service,
) -> None:
    service.set_env(SYNC_CONCURRENCY="zero")
    result = service.box.run("systemctl", "start", UNIT, check=False, timeout=60)
    assert result.returncode != 0, "start of a misconfigured daemon succeeded"

    first = service.props("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts")
    time.sleep(4)  # RestartSec=1: a restart loop would have restarted it several times
    later = service.props("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts")
    for props in (first, later):
        assert props["ActiveState"] == "failed", props
        assert props["Result"] == "exit-code", props
        assert (props["ExecMainCode"], props["ExecMainStatus"]) == ("1", "78"), props
        assert props["NRestarts"] == "0", props
    output = "\n".join(service.output_lines())
    assert "SYNC_CONCURRENCY" in output, output
    messages = service.systemd_messages()
    starts = [m for m in messages if m.startswith("Starting")]
    assert len(starts) == 1, messages
    say(f"bad setting: one start, status 78, unit {later['ActiveState']}: {output.strip()!r}")


def test_reload_applies_a_new_interval(service: Service) -> None:
    # Nobody due after the first cycle, so later cycles are instant and their rhythm shows.
    service.set_env(SYNC_INTERVAL_SECONDS="60", SYNC_STALE_AFTER_SECONDS="3600")
    service.start()
    service.wait_event("cycle_finished")

    service.set_env(SYNC_INTERVAL_SECONDS="2")
    service.box.systemctl("reload", UNIT)
    reloaded = service.wait_event("config_reloaded", timeout=15)[0]
    assert "interval_seconds" in reloaded["changed"], reloaded
    ticks = service.wait_event(
        "cycle_requested", where=lambda e: e.get("reason") == "schedule", count=3, timeout=20
    )
    times = [_at(e) for e in ticks[:3]]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    after_reload = (times[0] - _at(reloaded)).total_seconds()
    assert 1.0 <= after_reload <= 3.5, after_reload
    assert all(1.5 <= gap <= 3.5 for gap in gaps), gaps
    assert service.props("ActiveState")["ActiveState"] == "active"
    say(
        f"reload: config_reloaded changed={reloaded['changed']}; first scheduled cycle "
        f"{after_reload:.2f}s later, then every {', '.join(f'{g:.2f}' for g in gaps)}s"
    )


def test_the_journal_holds_the_daemons_json_lines(service: Service) -> None:
    service.start()
    service.wait_event("cycle_finished", timeout=30)
    invocation = service.props("InvocationID")["InvocationID"]
    # `journalctl -u background-sync -o cat`, as an operator reads it, for this run of the
    # daemon only (systemd's own "Starting ..." lines about the unit are not the daemon's).
    text = service.box.journal(
        "-u", UNIT, "-o", "cat", f"_SYSTEMD_INVOCATION_ID={invocation}", "--no-hostname"
    )
    lines = text.splitlines()
    assert lines
    objects = []
    for line in lines:
        value = json.loads(line)  # every line the daemon wrote is one JSON object
        assert isinstance(value, dict), line
        assert {"event", "level", "timestamp"} <= value.keys(), line
        datetime.fromisoformat(value["timestamp"])
        objects.append(value)
    assert "daemon_ready" in {o["event"] for o in objects}
    synced = [o for o in objects if o["event"] == "user_synced"]
    assert len(synced) == USERS
    say(f"journal: {len(objects)} JSON lines of this run, {len(synced)} user_synced")


def test_the_token_appears_nowhere_in_the_journal(service: Service) -> None:
    installed = service.installed
    before = installed.backend_stats()
    service.start()
    finished = service.wait_event("cycle_finished", timeout=30)[0]
    after = installed.backend_stats()
    # The backend requires the token: these calls succeeded only because the daemon sent it.
    assert finished["succeeded"] == USERS, finished
    assert after["successes"] - before["successes"] >= USERS
    assert after["auth_failures"] == before["auth_failures"]
    service.box.systemctl("stop", UNIT)

    token = installed.token
    everything = service.box.journal("-o", "cat")
    assert token not in everything
    every_field = service.box.journal("-o", "json")  # all fields, every unit, since boot
    assert token not in every_field
    say(
        f"token: {finished['succeeded']} authenticated syncs; token absent from "
        f"{len(everything.splitlines())} journal lines (all fields checked)"
    )
