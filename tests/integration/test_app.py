"""The daemon's lifecycle in process: a real App on a SQLite file and the reference backend.

These run `App.run_forever()` in the test's own event loop, so control-plane rules are
checked without a subprocess; signals, exit codes seen by systemd and sd_notify keep their
subprocess tests in tests/acceptance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from daemon import app as app_module
from daemon import control, supervisor
from daemon.app import EX_OK, EX_SOFTWARE, App
from daemon.database import Database, make_engine, utcnow
from tests.conftest import ReferenceBackend, app_settings
from tests.waiting import wait_until_async


@pytest.fixture
def fast_side_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control poll every 50 ms and restarts after 10 ms: minutes become a second."""
    monkeypatch.setattr(app_module, "CONTROL_POLL_SECONDS", 0.05)
    monkeypatch.setattr(supervisor, "RESTART_DELAY_SECONDS", 0.01)
    monkeypatch.setattr(supervisor, "RESTART_DELAY_CAP_SECONDS", 0.02)


def failing_after(calls: int, *, times: int | None) -> Callable[..., Any]:
    """control.report_instance that works `calls` times, then raises (`times` times)."""
    real = control.report_instance
    seen = {"calls": 0, "raised": 0}

    def report_instance(*args: Any, **kwargs: Any) -> Any:
        seen["calls"] += 1
        if seen["calls"] > calls and (times is None or seen["raised"] < times):
            seen["raised"] += 1
            raise RuntimeError("control poll bug")
        return real(*args, **kwargs)

    return report_instance


async def until_ready(daemon: App) -> None:
    await wait_until_async(lambda: daemon.snapshot()["state"] == "idle", what="idle")


async def test_a_control_poll_that_raises_is_restarted_and_pause_still_works(
    tmp_path: Path,
    backend: ReferenceBackend,
    fast_side_tasks: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = app_settings(tmp_path, backend)
    monkeypatch.setattr(control, "report_instance", failing_after(3, times=2))
    daemon = App(settings)
    with capture_logs() as logs:
        running = asyncio.create_task(daemon.run_forever())
        await until_ready(daemon)
        await wait_until_async(
            lambda: len([e for e in logs if e["event"] == "side_task_restarted"]) >= 2,
            what="two restarts of the control poll",
        )
        db = Database(make_engine(settings.database_url))
        control.set_paused(db, True, by="test", now=utcnow())
        db.dispose()
        await wait_until_async(
            lambda: any(e["event"] == "sync_paused" for e in logs), what="the pause seen"
        )
        daemon.stop("test")
        assert await running == EX_OK
    failed = [e for e in logs if e["event"] == "side_task_failed"]
    assert [e["task"] for e in failed] == ["control", "control"]
    assert all(e["error"] == "RuntimeError('control poll bug')" for e in failed)


async def test_a_side_task_that_keeps_failing_ends_the_daemon_with_70(
    tmp_path: Path,
    backend: ReferenceBackend,
    fast_side_tasks: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never silent, never exit 0: systemd's Restart=on-failure takes over."""
    settings = app_settings(tmp_path, backend)
    monkeypatch.setattr(control, "report_instance", failing_after(1, times=None))
    with capture_logs() as logs:
        status = await asyncio.wait_for(App(settings).run_forever(), 60)
    assert status == EX_SOFTWARE == 70
    assert [e["task"] for e in logs if e["event"] == "side_task_gave_up"] == ["control"]
    assert any(e["event"] == "daemon_stopped" and e["exit_status"] == 70 for e in logs)


async def health_page(daemon: App, logs: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    (started,) = [e for e in logs if e["event"] == "status_server_started"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{started['address']}/health") as response,
    ):
        return response.status, await response.json()


async def health_after_one_cycle(daemon: App) -> tuple[int, dict[str, Any]]:
    """Run the daemon until its first cycle is over, read /health, stop it cleanly."""
    with capture_logs() as logs:
        running = asyncio.create_task(daemon.run_forever())
        await wait_until_async(
            lambda: daemon.snapshot()["statistics"]["cycles_total"] == 1, what="one cycle"
        )
        answer = await health_page(daemon, logs)
        daemon.stop("test")
        assert await running == EX_OK
    return answer


async def test_an_open_circuit_is_degraded_with_the_probe_time_everywhere(
    tmp_path: Path, backend: ReferenceBackend
) -> None:
    await backend.faults(error_rate=1.0)
    settings = app_settings(
        tmp_path,
        backend,
        users=20,
        SYNC_MAX_RETRIES="0",
        SYNC_MAX_CONSECUTIVE_FAILURES="3",
        SYNC_CIRCUIT_RESET_SECONDS="600",
        SYNC_CONCURRENCY="1",
    )
    daemon = App(settings)
    with capture_logs() as logs:
        running = asyncio.create_task(daemon.run_forever())
        await wait_until_async(
            lambda: daemon.health().state == "degraded" and daemon.snapshot()["cycle"] is None,
            what="the circuit open after the first cycle",
        )
        status, page = await health_page(daemon, logs)
        line = daemon.status_line()
        snapshot = daemon.snapshot()
        daemon.stop("test")
        assert await running == EX_OK
    assert status == 503
    assert page["health"] == "degraded"
    assert any(r.startswith("circuit open, probe in ") for r in page["reasons"])
    assert line.startswith("degraded: circuit open, probe in ")
    assert snapshot["statistics"]["cycles_failed"] == 1
    assert snapshot["statistics"]["last_error"] == "circuit open: the backend is failing"
    assert daemon.metrics.health.labels("degraded")._value.get() == 1


async def test_rejected_credentials_are_unhealthy_not_ok(
    tmp_path: Path, token_backend: tuple[ReferenceBackend, Path]
) -> None:
    backend, _ = token_backend  # the daemon is given no token: every call is refused 401
    status, page = await health_after_one_cycle(App(app_settings(tmp_path, backend)))
    assert (status, page["health"]) == (503, "unhealthy")
    assert "the backend rejected our credentials" in page["reasons"]


async def test_a_healthy_daemon_answers_200_healthy(
    tmp_path: Path, backend: ReferenceBackend
) -> None:
    status, page = await health_after_one_cycle(App(app_settings(tmp_path, backend)))
    assert (status, page) == (200, {"health": "healthy", "reasons": []})


async def test_freshness_keeps_being_measured_while_no_cycle_runs(
    tmp_path: Path,
    backend: ReferenceBackend,
    fast_side_tasks: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Paused from the start: the share still follows the table, so views never freeze."""
    monkeypatch.setattr(app_module, "FRESHNESS_MIN_EVERY_SECONDS", 0.2)
    settings = app_settings(tmp_path, backend, users=5, SYNC_INTERVAL_SECONDS="1")
    db = Database(make_engine(settings.database_url))
    control.set_paused(db, True, by="test", now=utcnow())
    daemon = App(settings)
    running = asyncio.create_task(daemon.run_forever())
    try:
        await wait_until_async(
            lambda: (daemon.snapshot()["freshness"] or {}).get("overdue") == 5,
            what="the start-up measurement: 5 never-synced users",
        )
        with db.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE users SET last_sync = ?", (utcnow().replace(tzinfo=None),))
        await wait_until_async(
            lambda: (daemon.snapshot()["freshness"] or {}).get("overdue") == 0,
            what="a measurement without a cycle",
        )
        assert daemon.snapshot()["paused"] is True
        assert (await backend.stats())["requests"] == 0
    finally:
        daemon.stop("test")
        await running
        db.dispose()
