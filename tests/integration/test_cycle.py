"""Whole cycles against a real SQLite file and the reference backend on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from daemon import backlog
from daemon.backend import BackendClient, Gate
from daemon.cycle import Clock, Cycle, DbRunner
from daemon.models import runs, user_state
from daemon.resilience import BackendGate, State
from daemon.values import Report
from tests.conftest import AppDatabase, ReferenceBackend, SettingsFactory


class RecordingSleep:
    """Backoff sleeps are recorded and shortened: time is injected, not slept on."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


async def run_cycle(
    app_db: AppDatabase,
    make_settings: SettingsFactory,
    url: str,
    *,
    stop: asyncio.Event | None = None,
    sleep: Any = None,
    gate: Gate | None = None,
    clock: Clock | None = None,
    paused: asyncio.Event | None = None,
    **env: str,
) -> Report:
    settings = make_settings(SYNC_BACKEND_URL=url, **env)
    db = DbRunner()
    session = BackendClient.open_session(settings)
    try:
        client = BackendClient(settings, session, sleep=sleep or RecordingSleep(), gate=gate)
        cycle = Cycle(
            settings,
            app_db.store(lease_seconds=settings.lease_seconds),
            client,
            db,
            stop=stop or asyncio.Event(),
            clock=clock,
            paused=(paused or asyncio.Event()).is_set,
        )
        return await cycle.run()
    finally:
        await session.close()
        db.close()


def synced(app_db: AppDatabase) -> set[int]:
    return {uid for uid, when in app_db.last_syncs().items() if when is not None}


def held_leases(app_db: AppDatabase) -> int:
    with app_db.db.engine.connect() as conn:
        rows = conn.execute(select(user_state).where(user_state.c.lease_owner.is_not(None)))
        return len(rows.all())


async def test_every_due_user_is_synced_exactly_once(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(300)
    report = await run_cycle(app_db, make_settings, backend.url, SYNC_CONCURRENCY="8")
    stats = await backend.stats()
    assert (report.outcome, report.succeeded, report.failed) == ("succeeded", 300, 0)
    assert synced(app_db) == set(range(1, 301))
    assert stats["successes"] == 300
    assert set(stats["per_user_calls"].values()) == {1}
    assert stats["overlaps"] == 0
    assert stats["max_in_flight"] <= 8
    assert held_leases(app_db) == 0


async def test_a_user_synced_ten_minutes_ago_is_not_called(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(3)
    app_db.set_last_sync(2, datetime.now(UTC) - timedelta(minutes=10))
    await run_cycle(app_db, make_settings, backend.url)
    assert set((await backend.stats())["per_user_calls"]) == {"1", "3"}


async def test_a_failed_or_5xx_call_never_advances_last_sync(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(5)
    await backend.faults(error_rate=1.0)
    report = await run_cycle(app_db, make_settings, backend.url, SYNC_MAX_RETRIES="2")
    assert (report.outcome, report.failed, report.succeeded) == ("failed", 5, 0)
    assert synced(app_db) == set()
    assert (await backend.stats())["requests"] == 15  # 1 try + 2 retries each
    assert held_leases(app_db) == 0


async def test_a_hanging_backend_is_cut_by_the_timeout_and_the_cycle_ends(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(3)
    await backend.faults(hang_rate=1.0)
    with capture_logs() as logs:
        report = await asyncio.wait_for(
            run_cycle(
                app_db,
                make_settings,
                backend.url,
                SYNC_REQUEST_TIMEOUT_SECONDS="0.3",
                SYNC_MAX_RETRIES="0",
            ),
            timeout=10,
        )
    assert (report.outcome, report.failed) == ("failed", 3)
    failures = [e for e in logs if e["event"] == "user_sync_failed"]
    assert {e["error"] for e in failures} == {"timed out after 0.3s"}
    assert synced(app_db) == set()


async def test_garbage_and_oversized_bodies_fail_that_user_not_the_daemon(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(40)
    await backend.faults(garbage_rate=0.25, oversize_rate=0.25, seed=3)
    with capture_logs() as logs:
        report = await run_cycle(app_db, make_settings, backend.url, SYNC_MAX_RETRIES="0")
    errors = {e["error"] for e in logs if e["event"] == "user_sync_failed"}
    assert errors == {
        "response body is not a JSON object",
        f"response body larger than {1024 * 1024} bytes",
    }
    assert report.succeeded + report.failed == 40
    assert 0 < report.failed < 40
    assert len(synced(app_db)) == report.succeeded


async def test_resets_and_5xx_are_retried_and_every_success_is_recorded(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(60)
    await backend.faults(reset_rate=0.2, error_rate=0.2, unavailable_rate=0.1, seed=11)
    report = await run_cycle(app_db, make_settings, backend.url, SYNC_MAX_RETRIES="8")
    stats = await backend.stats()
    assert report.succeeded == 60
    assert synced(app_db) == set(range(1, 61))
    assert stats["by_status"].get("reset", 0) > 0
    # the Idempotency-Key is stable across the retries of one user in one cycle
    assert stats["idempotency_keys_seen"] == 60


async def test_retry_after_on_429_is_honoured(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(1)
    await backend.faults(rate_limit_rate=1.0, retry_after_seconds=7)
    sleep = RecordingSleep()
    report = await run_cycle(app_db, make_settings, backend.url, sleep=sleep, SYNC_MAX_RETRIES="2")
    assert report.failed == 1
    assert sleep.delays and all(delay >= 7 for delay in sleep.delays)


async def test_a_409_conflict_is_neither_success_nor_failure(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(4)
    await backend.faults(conflict_rate=1.0)
    report = await run_cycle(app_db, make_settings, backend.url)
    assert (report.outcome, report.skipped, report.failed, report.succeeded) == (
        "succeeded",
        4,
        0,
        0,
    )
    assert synced(app_db) == set()
    assert (await backend.stats())["requests"] == 4  # a conflict is not retried


async def test_a_202_is_polled_until_the_background_sync_finishes(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(3)
    await backend.faults(accepted_rate=1.0, job_seconds=0.1)
    report = await run_cycle(app_db, make_settings, backend.url)
    assert report.succeeded == 3
    assert synced(app_db) == {1, 2, 3}
    assert (await backend.stats())["progress_polls"] >= 3


async def test_a_202_whose_background_sync_fails_is_a_failure(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(2)
    await backend.faults(accepted_rate=1.0, job_seconds=0.05, job_failure_rate=1.0)
    report = await run_cycle(app_db, make_settings, backend.url)
    assert report.failed == 2
    assert synced(app_db) == set()


async def test_the_payload_is_merged_into_every_request(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(1)
    await run_cycle(app_db, make_settings, backend.url, SYNC_BACKEND_PAYLOAD='{"max_emails": 50}')
    body = (await backend.stats())["last_body"]
    assert body == {"max_emails": 50, "user_id": 1, "email": "user1@example.com"}


async def test_the_token_is_sent_and_absent_from_every_log_line(
    app_db: AppDatabase,
    make_settings: SettingsFactory,
    token_backend: tuple[ReferenceBackend, Path],
) -> None:
    backend, token_file = token_backend
    token = token_file.read_text().strip()
    app_db.seed(10)
    await backend.faults(error_rate=0.3, seed=5)
    with capture_logs() as logs:
        report = await run_cycle(
            app_db,
            make_settings,
            backend.url,
            SYNC_BACKEND_TOKEN_FILE=str(token_file),
            SYNC_MAX_RETRIES="0",
        )
    assert report.succeeded > 0
    assert (await backend.stats())["auth_failures"] == 0
    assert token not in json.dumps(logs, default=str)


async def test_a_401_halts_the_cycle_as_a_configuration_problem_and_blames_no_user(
    app_db: AppDatabase,
    make_settings: SettingsFactory,
    token_backend: tuple[ReferenceBackend, Path],
) -> None:
    backend, _ = token_backend
    app_db.seed(40)
    with capture_logs() as logs:
        report = await run_cycle(app_db, make_settings, backend.url, SYNC_CONCURRENCY="2")
    assert report.outcome == "failed"
    assert report.error == "the backend rejected our credentials"
    rejected = [e for e in logs if e["event"] == "backend_auth_rejected"]
    assert len(rejected) == 1
    assert "SYNC_BACKEND_TOKEN_FILE" in rejected[0]["error"]
    assert (await backend.stats())["requests"] <= 2  # halted: the rest were never called
    with app_db.db.engine.connect() as conn:
        failures = conn.execute(select(user_state.c.consecutive_failures)).scalars().all()
    assert set(failures) == {0}
    assert held_leases(app_db) == 0


async def once_called(backend: ReferenceBackend, event: asyncio.Event) -> None:
    """Set `event` once the backend has answered a call: calls are then in flight."""
    while (await backend.stats())["requests"] == 0:  # noqa: ASYNC110 (another server)
        await asyncio.sleep(0.02)
    event.set()


async def test_stop_lets_in_flight_calls_finish_and_releases_the_rest(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(50)
    await backend.faults(latency_ms=300)
    stop = asyncio.Event()
    set_on_first_call = asyncio.create_task(once_called(backend, stop))
    report = await run_cycle(app_db, make_settings, backend.url, stop=stop, SYNC_CONCURRENCY="4")
    await set_on_first_call
    assert report.outcome == "interrupted"
    assert 0 < report.succeeded < 50
    assert len(synced(app_db)) == report.succeeded
    assert held_leases(app_db) == 0
    with app_db.db.engine.connect() as conn:
        assert conn.execute(select(runs.c.outcome)).scalar_one() == "interrupted"


async def test_a_pause_lets_in_flight_calls_finish_and_releases_the_backlog_uncalled(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(50)
    await backend.faults(latency_ms=300)
    paused = asyncio.Event()
    set_on_first_call = asyncio.create_task(once_called(backend, paused))
    report = await run_cycle(
        app_db, make_settings, backend.url, paused=paused, SYNC_CONCURRENCY="4"
    )
    await set_on_first_call
    assert report.outcome == "paused"
    assert 0 < report.succeeded < 50
    # Claimed: the calls made and a backlog of about a second of calls, not the table.
    assert report.succeeded + report.skipped == report.claimed < 50
    assert report.skipped > 0
    assert report.failed == 0
    assert (await backend.stats())["requests"] == report.succeeded  # the rest never called
    assert len(synced(app_db)) == report.succeeded
    assert held_leases(app_db) == 0
    with app_db.db.engine.connect() as conn:
        failures = conn.execute(select(user_state.c.consecutive_failures)).scalars().all()
        assert set(failures) == {0}  # a pause is held against nobody
        assert conn.execute(select(runs.c.outcome)).scalar_one() == "paused"


async def test_a_call_past_the_grace_period_is_cut_and_its_lease_released(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(2)
    await backend.faults(hang_rate=1.0)
    stop = asyncio.Event()

    async def stop_once_both_calls_hang() -> None:
        while True:
            if (await backend.stats())["in_flight"] >= 2:
                stop.set()
                return
            await asyncio.sleep(0.02)

    stopper = asyncio.create_task(stop_once_both_calls_hang())
    report = await asyncio.wait_for(
        run_cycle(
            app_db,
            make_settings,
            backend.url,
            stop=stop,
            SYNC_SHUTDOWN_GRACE_SECONDS="0.5",
        ),
        timeout=10,
    )
    await stopper
    assert report.outcome == "interrupted"
    assert synced(app_db) == set()
    assert held_leases(app_db) == 0


@pytest.mark.parametrize("concurrency", ["1", "16"])
async def test_no_two_calls_for_one_user_ever_overlap(
    app_db: AppDatabase,
    make_settings: SettingsFactory,
    backend: ReferenceBackend,
    concurrency: str,
) -> None:
    app_db.seed(200)
    await backend.faults(latency_ms=5, error_rate=0.2, seed=2)
    await run_cycle(
        app_db, make_settings, backend.url, SYNC_CONCURRENCY=concurrency, SYNC_MAX_RETRIES="3"
    )
    assert (await backend.stats())["overlaps"] == 0


class SteppedClock(Clock):
    """Wall time that tests move forward by hand; monotonic time stays real."""

    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def now(self) -> datetime:
        return self.at


def failures_of(app_db: AppDatabase) -> dict[str, int]:
    with app_db.db.engine.connect() as conn:
        rows = conn.execute(select(user_state.c.user_key, user_state.c.consecutive_failures))
        return {key: count for key, count in rows}


async def test_a_failing_backend_opens_the_circuit_then_a_probe_closes_it(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(100)
    now = [0.0]
    gate = BackendGate(threshold=5, reset_seconds=60, max_per_second=None, clock=lambda: now[0])
    await backend.faults(error_rate=1.0)
    with capture_logs() as logs:
        first = await run_cycle(
            app_db,
            make_settings,
            backend.url,
            gate=gate,
            SYNC_CONCURRENCY="1",
            SYNC_MAX_RETRIES="0",
            SYNC_RETRY_DELAY_SECONDS="5",
        )
    assert (first.outcome, first.circuit_open, first.failed) == ("failed", True, 5)
    assert gate.state is State.OPEN
    assert (await backend.stats())["requests"] == 5  # no calls once open
    assert "circuit_opened" in [e["event"] for e in logs]
    assert sum(failures_of(app_db).values()) == 5  # only the users really called

    await backend.faults()  # the backend recovers
    still_open = await run_cycle(app_db, make_settings, backend.url, gate=gate)
    assert still_open.succeeded == 0 and still_open.circuit_open  # before the reset time

    now[0] = 61.0
    with capture_logs() as logs:
        probe = await run_cycle(app_db, make_settings, backend.url, gate=gate)
    events = [e["event"] for e in logs]
    assert "circuit_half_open" in events and "circuit_closed" in events
    assert gate.state is State.CLOSED
    assert probe.succeeded == 95  # the 5 that failed are backing off
    assert len(synced(app_db)) == 95


async def test_a_user_failing_again_and_again_is_quarantined_then_probed_and_recovers(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(2)
    clock = SteppedClock()
    env = {
        "SYNC_QUARANTINE_AFTER": "3",
        "SYNC_QUARANTINE_PROBE_SECONDS": "86400",
        "SYNC_MAX_RETRIES": "0",
    }
    await backend.faults(fail_users=["1"])
    with capture_logs() as logs:
        for _ in range(3):
            await run_cycle(app_db, make_settings, backend.url, clock=clock, **env)
            clock.at += timedelta(hours=2)
            app_db.let_time_pass(2 * 3600)  # the backoff runs on the database's clock
    assert failures_of(app_db)["1"] == 3
    assert [e["user_id"] for e in logs if e["event"] == "user_quarantined"] == [1]

    calls_before = (await backend.stats())["per_user_calls"]["1"]
    await run_cycle(app_db, make_settings, backend.url, clock=clock, **env)
    assert (await backend.stats())["per_user_calls"]["1"] == calls_before  # only probed rarely

    await backend.faults()  # whatever broke this user is fixed
    clock.at += timedelta(hours=25)
    app_db.let_time_pass(25 * 3600)
    report = await run_cycle(app_db, make_settings, backend.url, clock=clock, **env)
    assert (report.succeeded, report.failed) == (2, 0)  # user 2 was stale again too
    assert failures_of(app_db)["1"] == 0
    assert 1 in synced(app_db)


async def test_a_bug_in_a_call_closes_the_run_as_crashed_and_surfaces(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    """A run row never stays "running" after a bug; leases go back; the error propagates."""

    class Broken(BackendClient):
        async def sync_user(self, claim: Any, *, run_id: str, progress: Any = None) -> Any:
            raise RuntimeError("a bug in the client")

    app_db.seed(5)
    settings = make_settings(SYNC_BACKEND_URL=backend.url)
    db = DbRunner()
    session = BackendClient.open_session(settings)
    try:
        cycle = Cycle(
            settings,
            app_db.store(lease_seconds=settings.lease_seconds),
            Broken(settings, session),
            db,
            stop=asyncio.Event(),
        )
        with pytest.raises(RuntimeError, match="a bug in the client"):
            await cycle.run()
    finally:
        await session.close()
        db.close()
    with app_db.db.engine.connect() as conn:
        row = conn.execute(select(runs.c.outcome, runs.c.error)).one()
    assert row.outcome == "crashed"
    assert row.error == "RuntimeError: a bug in the client"
    assert held_leases(app_db) == 0


async def test_a_cycle_leases_no_further_ahead_than_about_a_second_of_calls(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    """Leases held ahead of need are users another instance could be calling."""
    app_db.seed(60)
    await backend.faults(latency_ms=100)
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, await asyncio.to_thread(held_leases, app_db))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        report = await run_cycle(
            app_db, make_settings, backend.url, SYNC_CONCURRENCY="2", SYNC_CLAIM_BATCH_SIZE="256"
        )
    finally:
        watcher.cancel()
    assert report.succeeded == 60
    # In the callers' hands, in the backlog (a second of 100 ms calls by 2 callers), and
    # done but not yet recorded (a batch of min(batch, 4 x concurrency)): never the 60 a
    # page of 256 would lease at once.
    assert 0 < most <= 2 + backlog.room(256, 2, 0.1) + 4 * 2
