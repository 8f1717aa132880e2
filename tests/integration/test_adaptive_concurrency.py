"""Whole cycles against a reference backend with a server-side capacity: the adaptive limit
finds the capacity, follows it down when it halves and back up when it returns.

Each phase runs a number of cycles (so a number of completed calls), never a length of
time, and the limit is read at the end of each cycle and compared with a range: a slow,
loaded machine makes every call slower, not the limit different.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from statistics import median

import aiohttp
import pytest
from structlog.testing import capture_logs

from daemon.app import EX_OK, App
from daemon.backend import BackendClient
from daemon.concurrency import Concurrency
from daemon.cycle import Cycle, DbRunner
from daemon.limiter import INITIAL_LIMIT, REASONS
from daemon.settings import Settings
from tests.conftest import AppDatabase, ReferenceBackend, SettingsFactory, app_settings
from tests.waiting import wait_until_async

USERS = 40  # calls per cycle
# Long enough that the test's own event loop (the backend runs in it too) adds little.
LATENCY_MS = 100
CAPACITY = 8
MAXIMUM = 32


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the limit does not depend on the database, and this test is long."""
    return f"sqlite:///{tmp_path / 'sync.db'}"


async def instant(seconds: float) -> None:
    """Retry delays are not slept: the test is about the limit, not about backoff."""
    await asyncio.sleep(0)


async def cycles(
    count: int,
    settings: Settings,
    app_db: AppDatabase,
    concurrency: Concurrency,
    *,
    every_user: bool = True,
) -> list[int]:
    """Run `count` cycles over every user, sharing one instance's limit; the limit after each."""
    limits = []
    db = DbRunner()
    session = BackendClient.open_session(settings)
    try:
        client = BackendClient(settings, session, sleep=instant)
        for _ in range(count):
            cycle = Cycle(
                settings,
                app_db.store(lease_seconds=settings.lease_seconds),
                client,
                db,
                stop=asyncio.Event(),
                concurrency=concurrency,
            )
            report = await cycle.run()
            assert report.claimed == USERS or not every_user, report
            limits.append(concurrency.limit)
    finally:
        await session.close()
        db.close()
    return limits


def make(make_settings: SettingsFactory, url: str, adaptive: bool = True) -> Settings:
    return make_settings(
        SYNC_BACKEND_URL=url,
        SYNC_STALE_AFTER_SECONDS="0",  # every user is due again at the next cycle
        SYNC_CONCURRENCY=str(MAXIMUM),
        SYNC_ADAPTIVE_CONCURRENCY="true" if adaptive else "false",
        SYNC_MAX_RETRIES="5",
    )


async def test_the_limit_finds_the_capacity_follows_it_down_and_climbs_back(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(USERS)
    await backend.faults(latency_ms=LATENCY_MS, capacity=CAPACITY, queue_limit=2 * CAPACITY)
    settings = make(make_settings, backend.url)
    concurrency = Concurrency(settings)
    assert concurrency.limit == INITIAL_LIMIT
    with capture_logs() as logs:
        full = await cycles(10, settings, app_db, concurrency)
        await backend.faults(latency_ms=LATENCY_MS, capacity=CAPACITY // 2, queue_limit=CAPACITY)
        halved = await cycles(10, settings, app_db, concurrency)
        await backend.faults(latency_ms=LATENCY_MS, capacity=CAPACITY, queue_limit=2 * CAPACITY)
        restored = await cycles(12, settings, app_db, concurrency)
    settled, low, back = median(full[-6:]), median(halved[-6:]), median(restored[-6:])
    assert CAPACITY - 2 <= settled <= 2 * CAPACITY, full
    assert low <= CAPACITY and low < settled, halved
    assert CAPACITY - 2 <= back <= 2 * CAPACITY and back > low, restored
    changes = [e for e in logs if e["event"] == "concurrency_limit_changed"]
    assert {e["reason"] for e in changes} >= {"growth", "latency"}
    assert all(e["baseline_ms"] is None or e["baseline_ms"] >= LATENCY_MS for e in changes)
    # logged when it changes, never per call
    assert len(changes) < (10 + 10 + 12) * USERS / 10


async def test_a_fixed_limit_keeps_every_caller_busy_whatever_the_backend_does(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(USERS)
    await backend.faults(latency_ms=LATENCY_MS, capacity=CAPACITY)
    settings = make(make_settings, backend.url, adaptive=False)
    concurrency = Concurrency(settings)
    with capture_logs() as logs:
        limits = await cycles(2, settings, app_db, concurrency)
    assert limits == [MAXIMUM, MAXIMUM]
    assert (await backend.stats())["max_in_flight"] == MAXIMUM
    assert not [e for e in logs if e["event"] == "concurrency_limit_changed"]


async def test_no_more_calls_than_the_limit_are_in_flight(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(USERS)
    await backend.faults(latency_ms=LATENCY_MS)
    settings = make(make_settings, backend.url)
    concurrency = Concurrency(settings)
    seen: list[int] = []
    concurrency.limiter.sample = _watching(concurrency, seen)  # type: ignore[method-assign]
    await cycles(1, settings, app_db, concurrency)
    assert seen and max(seen) <= MAXIMUM
    stats = await backend.stats()
    assert stats["max_in_flight"] <= max(concurrency.limit, max(seen))


def _watching(concurrency: Concurrency, seen: list[int]):  # type: ignore[no-untyped-def]
    """The limiter's sample, checking at each call that in flight never exceeds the limit."""
    original = concurrency.limiter.sample

    def sample(**kwargs):  # type: ignore[no-untyped-def]
        assert kwargs["in_flight"] <= concurrency.limit
        seen.append(kwargs["in_flight"])
        return original(**kwargs)

    return sample


async def test_the_limit_its_reason_and_the_baseline_are_in_status_metrics_and_logs(
    tmp_path: Path, backend: ReferenceBackend
) -> None:
    """A daemon against a backend of capacity 2: the limit comes down from its slow start,
    and every view shows the same limit; each change is logged once, not each call."""
    await backend.faults(latency_ms=LATENCY_MS, capacity=2, queue_limit=4)
    settings = app_settings(tmp_path, backend, users=120, SYNC_CONCURRENCY="16")
    daemon = App(settings)
    lines: list[str] = []
    with capture_logs() as logs:
        running = asyncio.create_task(daemon.run_forever())

        def cut_while_syncing() -> bool:
            if daemon.snapshot()["cycle"] is not None:
                lines.append(daemon.status_line())
            return any(
                e["event"] == "concurrency_limit_changed" and e["new"] < e["old"] for e in logs
            )

        await wait_until_async(cut_while_syncing, what="a cut of the limit")
        await wait_until_async(
            lambda: daemon.snapshot()["statistics"]["cycles_total"] == 1, what="one cycle"
        )
        (started,) = [e for e in logs if e["event"] == "status_server_started"]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{started['address']}/status") as response,
        ):
            page = await response.json()
        daemon.stop("test")
        assert await running == EX_OK
    shown = page["concurrency"]
    assert shown["adaptive"] is True and (shown["minimum"], shown["maximum"]) == (1, 16)
    assert 1 <= shown["limit"] < 16 and shown["reason"] in ("drops", "latency", "growth")
    assert shown["baseline_s"] >= LATENCY_MS / 1000
    metrics = daemon.metrics
    assert metrics.concurrency_limit._value.get() == shown["limit"]
    assert metrics.concurrency_max._value.get() == 16
    assert metrics.latency_baseline._value.get() >= LATENCY_MS / 1000
    changes = [e for e in logs if e["event"] == "concurrency_limit_changed"]
    counted = sum(metrics.limit_changes.labels(r)._value.get() for r in REASONS)
    assert counted == len(changes) and 0 < len(changes) < 120 / 10
    assert changes[-1]["new"] == shown["limit"] and changes[-1]["reason"] == shown["reason"]
    assert all({"old", "new", "reason", "baseline_ms"} <= set(e) for e in changes)
    assert any(", concurrency " in line and " of 16" in line for line in lines), lines[-3:]


async def test_a_backend_that_answers_500_to_a_third_of_calls_does_not_hold_the_limit_down(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    """500s are retried and mostly succeed: the backend's verdict on single calls, not
    overload (no 429, 503 or timeout), so the limit grows on a backend with room."""
    app_db.seed(USERS)
    await backend.faults(latency_ms=LATENCY_MS, error_rate=0.3, seed=11)
    settings = make(make_settings, backend.url)
    concurrency = Concurrency(settings)
    # a user failing all its retries backs off, so later cycles may call fewer
    limits = await cycles(8, settings, app_db, concurrency, every_user=False)
    assert min(limits[-3:]) > 2 * INITIAL_LIMIT, limits
