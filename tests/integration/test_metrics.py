"""Metrics fed by real cycles against the reference backend, and the instance census read
from a real database (a SQLite file and PostgreSQL)."""

from __future__ import annotations

import asyncio

from sqlalchemy import update

from daemon import control, dbclock
from daemon.backend import BackendClient
from daemon.cycle import Cycle, DbRunner
from daemon.database import utcnow
from daemon.metrics import Metrics
from daemon.models import instances
from daemon.resilience import BackendGate
from daemon.values import Report
from tests.conftest import AppDatabase, ReferenceBackend, SettingsFactory
from tests.integration.test_cycle import RecordingSleep


async def metered_cycle(
    app_db: AppDatabase, make_settings: SettingsFactory, url: str, metrics: Metrics, **env: str
) -> Report:
    """One cycle whose backend calls are counted by `metrics`, and recorded there."""
    settings = make_settings(SYNC_BACKEND_URL=url, **env)
    gate = BackendGate(
        threshold=settings.max_consecutive_failures,
        reset_seconds=settings.circuit_reset_seconds,
        max_per_second=None,
    )
    db = DbRunner()
    session = BackendClient.open_session(settings)
    try:
        client = BackendClient(
            settings, session, gate=gate, meter=metrics.calls, sleep=RecordingSleep()
        )
        cycle = Cycle(
            settings,
            app_db.store(lease_seconds=settings.lease_seconds),
            client,
            db,
            stop=asyncio.Event(),
        )
        report = await cycle.run()
    finally:
        await session.close()
        db.close()
    metrics.record(report, finished_at=1_800_000_000.0)
    return report


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"{name}{labels} is not exposed"
    return found


async def test_a_cycle_against_a_backend_with_8_percent_errors_counts_as_successful(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    """Users failing one by one do not keep the cycle from completing (it ran through
    its due list); so the last successful cycle's timestamp moves."""
    app_db.seed(200)
    await backend.faults(error_rate=0.08, seed=8)
    metrics = Metrics()
    report = await metered_cycle(
        app_db, make_settings, backend.url, metrics, SYNC_MAX_RETRIES="0", SYNC_CONCURRENCY="4"
    )
    assert report.outcome == "failed" and report.failed > 0 and report.succeeded > 150
    assert sample(metrics, "background_sync_last_successful_cycle_timestamp_seconds") == (
        1_800_000_000.0
    )
    # Every attempt was counted once, by status class and by outcome.
    assert sample(metrics, "background_sync_backend_requests_total", status_class="2xx") == (
        report.succeeded
    )
    assert sample(metrics, "background_sync_backend_requests_total", status_class="5xx") == (
        report.failed
    )
    duration = "background_sync_backend_request_duration_seconds_count"
    assert sample(metrics, duration, outcome="success") == report.succeeded
    assert sample(metrics, duration, outcome="server_error") == report.failed
    assert sample(metrics, "background_sync_backend_requests_in_flight") == 0


async def test_a_cycle_halted_by_the_circuit_is_not_a_successful_one(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(50)
    await backend.faults(error_rate=1.0)
    metrics = Metrics()
    report = await metered_cycle(
        app_db,
        make_settings,
        backend.url,
        metrics,
        SYNC_MAX_RETRIES="0",
        SYNC_MAX_CONSECUTIVE_FAILURES="3",
        SYNC_CONCURRENCY="1",
    )
    assert report.circuit_open
    assert sample(metrics, "background_sync_last_successful_cycle_timestamp_seconds") == 0
    assert sample(metrics, "background_sync_backend_requests_total", status_class="5xx") == 3


def test_instances_are_counted_by_state_with_silent_ones_lost_on_the_database_clock(
    app_db: AppDatabase,
) -> None:
    for name, state in [("a", "idle"), ("b", "syncing"), ("c", "idle"), ("d", "idle")]:
        control.report_instance(
            app_db.db,
            instance=name,
            started_at=utcnow(),
            now=utcnow(),
            state=state,
            circuit="closed",
            status=state,
        )
    control.mark_stopped(app_db.db, instance="d")
    silent = dbclock.after(app_db.db.dialect, -(control.LOST_AFTER_SECONDS + 5))
    with app_db.db.engine.begin() as conn:
        conn.execute(
            update(instances)
            .where(instances.c.instance.in_(["c", "d"]))
            .values(heartbeat_at=silent)
        )
    census = {"idle": 1, "syncing": 1, "lost": 1, "stopped": 1}
    assert control.count_instances(app_db.db) == census
    # The control poll reads the same census in its own transaction, its heartbeat first.
    reported = control.report_instance(
        app_db.db,
        instance="c",
        started_at=utcnow(),
        now=utcnow(),
        state="paused",
        circuit="closed",
        status="paused",
    )
    assert reported.instances == {"idle": 1, "syncing": 1, "paused": 1, "stopped": 1}


async def test_the_control_poll_counts_instances_at_its_first_poll_then_every_census_period(
    app_db: AppDatabase,
) -> None:
    """The census is for the metrics gauge: it need not be taken at every 2 s poll."""
    clock = [100.0]
    poll = control.Poll(_Log(), started_at=utcnow(), monotonic=lambda: clock[0])
    counted: list[bool] = []
    real = control.report_instance

    def report_instance(*args: object, **kwargs: object) -> control.Reported:
        counted.append(bool(kwargs["census"]))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    async def run(unit: object, *args: object, **kwargs: object) -> object:
        return report_instance(*args, **kwargs)

    async def one(state: str = "idle") -> None:
        await poll.report(
            run,
            app_db.db,
            instance="a",
            now=utcnow(),
            state=state,
            circuit="closed",
            status=state,
            bound_s=10,
            settings=app_db.settings,
        )

    await one()
    assert poll.instances == {"idle": 1}
    for _ in range(int(control.CENSUS_SECONDS / control.POLL_SECONDS) - 1):
        clock[0] += control.POLL_SECONDS
        await one("paused")
    assert poll.instances == {"idle": 1}  # as last counted
    clock[0] += control.POLL_SECONDS
    await one("paused")
    assert poll.instances == {"paused": 1}
    assert counted == [True] + [False] * (len(counted) - 2) + [True]
    poll.close()


class _Log:
    def warning(self, *args: object, **kwargs: object) -> None:
        pass
