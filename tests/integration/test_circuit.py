"""The circuit breaker over real cycles against the reference backend on 127.0.0.1.

The gate's clock is injected (a list the test moves forward), so the reset time passes
when the test says; everything else is real: the database, the HTTP calls, the cycle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from daemon.backend import PROBE_HOLD_MARGIN_SECONDS
from daemon.resilience import BackendGate, State
from tests.conftest import AppDatabase, ReferenceBackend, SettingsFactory
from tests.integration.test_cycle import run_cycle, synced
from tests.waiting import POLL_SECONDS, WAIT_SECONDS

RESET_SECONDS = 60.0


async def until(probe: Callable[[], bool], what: str) -> None:
    """Poll without blocking the event loop the daemon's code runs on."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not probe():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        await asyncio.sleep(POLL_SECONDS)


async def test_a_late_success_keeps_the_circuit_open_and_the_probe_cycle_sends_one_call(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    """User 1's call hangs, then succeeds; users 2-4 fail meanwhile and open the circuit.

    That late success answers a call started while the circuit was closed: it must not
    close it. The probe cycle then sends exactly one call to the still failing backend,
    however many callers it has, and that probe's failure re-opens the circuit.
    """
    app_db.seed(20)
    clock = [0.0]
    gate = BackendGate(
        threshold=3, reset_seconds=RESET_SECONDS, max_per_second=None, clock=lambda: clock[0]
    )
    # User 1 hangs for a while and then succeeds; every other user gets a 500 at once.
    await backend.faults(hang_rate=1.0, hang_seconds=1.5, fail_users=[str(u) for u in range(2, 21)])
    # No retries; a failed user backs off for a minute or more, so stays out of later cycles.
    env = {"SYNC_MAX_RETRIES": "0", "SYNC_RETRY_DELAY_SECONDS": "5"}
    with capture_logs() as logs:
        first = asyncio.create_task(
            run_cycle(app_db, make_settings, backend.url, gate=gate, SYNC_CONCURRENCY="2", **env)
        )
        await until(lambda: gate.state is State.OPEN or first.done(), "the circuit to open")
        at_open = await backend.stats()
        assert at_open["in_flight"] == 1, "user 1's call should still be in flight"
        report = await first
    stats = await backend.stats()
    assert stats["per_user_successes"] == {"1": 1}  # the late success arrived ...
    assert report.succeeded == 1 and report.circuit_open
    assert gate.state is State.OPEN  # ... and left the circuit open
    assert "circuit_closed" not in [e["event"] for e in logs]
    assert gate.stale_answers == 1
    assert synced(app_db) == {1}  # the user's own success still counts for that user

    # The reset time passes; the backend still fails for everyone.
    await backend.faults(error_rate=1.0)
    clock[0] = RESET_SECONDS + 1
    before = stats["requests"]
    with capture_logs() as logs:
        probe = await run_cycle(
            app_db, make_settings, backend.url, gate=gate, SYNC_CONCURRENCY="8", **env
        )
    assert (await backend.stats())["requests"] - before == 1  # one probe, not 8 callers
    assert probe.failed == 1 and probe.circuit_open
    events = [e["event"] for e in logs]
    assert events.count("circuit_half_open") == 1 and events.count("circuit_opened") == 1
    assert gate.state is State.OPEN
    assert gate.probe_in() == pytest.approx(RESET_SECONDS)  # a fresh reset timer

    # Only a probe's success closes it; then the cycle goes on at full concurrency.
    await backend.faults()
    clock[0] += RESET_SECONDS
    recovered = await run_cycle(
        app_db, make_settings, backend.url, gate=gate, SYNC_CONCURRENCY="8", **env
    )
    assert gate.state is State.CLOSED
    # 20 users: 1 synced first; 2-4 and the failed probe's user are backing off.
    assert recovered.succeeded == 15 and len(synced(app_db)) == 16


async def test_a_user_the_backend_always_fails_is_not_the_probe_twice_in_a_row(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    """The backend recovers for everyone but user 1, who is first in line (never synced,
    lowest id) and whose own failures back off in well under a reset period.

    The first probe goes to user 1 and fails, re-opening the circuit. User 1 is then
    held past the next probe, so that probe is another user's call: it succeeds, the
    circuit closes, and the rest sync. Without the hold user 1 would be the probe again
    (its backoff of a fraction of a second has passed) and keep the circuit open.
    """
    app_db.seed(5)
    clock = [0.0]
    gate = BackendGate(
        threshold=2, reset_seconds=RESET_SECONDS, max_per_second=None, clock=lambda: clock[0]
    )
    # Retries off; a failing user backs off for 0.06-0.12 s of real time.
    env = {"SYNC_MAX_RETRIES": "0", "SYNC_RETRY_DELAY_SECONDS": "0.01", "SYNC_CONCURRENCY": "1"}
    await backend.faults(error_rate=1.0)
    with capture_logs() as logs:
        opened = await run_cycle(app_db, make_settings, backend.url, gate=gate, **env)
    assert opened.circuit_open and gate.state is State.OPEN
    # The user that waited at the gate when the circuit opened was never called: it is
    # skipped, in the log as in the counts, and nothing is held against it.
    per_user = [(e["event"], e["user_id"]) for e in logs if "user_id" in e]
    assert per_user == [("user_sync_failed", 1), ("user_sync_failed", 2), ("user_sync_skipped", 3)]
    assert (opened.failed, opened.skipped) == (2, 1)

    await backend.faults(fail_users=["1"])
    await asyncio.sleep(0.3)  # every user's own backoff has passed
    clock[0] += RESET_SECONDS + 1
    with capture_logs() as logs:
        first_probe = await run_cycle(app_db, make_settings, backend.url, gate=gate, **env)
    assert first_probe.failed == 1 and first_probe.succeeded == 0
    assert gate.state is State.OPEN
    called = [e for e in logs if e["event"] == "user_sync_failed" and e["attempt"]]
    assert [(e["user_id"], e.get("circuit_probe")) for e in called] == [(1, True)]
    assert called[0]["held_s"] == round(RESET_SECONDS + PROBE_HOLD_MARGIN_SECONDS)

    await asyncio.sleep(0.3)  # longer than user 1's backoff would have been
    clock[0] += RESET_SECONDS + 1
    calls_before = (await backend.stats())["per_user_calls"]["1"]
    recovered = await run_cycle(app_db, make_settings, backend.url, gate=gate, **env)
    assert gate.state is State.CLOSED
    assert (await backend.stats())["per_user_calls"]["1"] == calls_before  # not probed again
    assert recovered.succeeded == 4 and synced(app_db) == {2, 3, 4, 5}
