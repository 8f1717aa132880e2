"""Several daemons on one PostgreSQL database, and the faults that used to lose or double
work in other tools: kill -9, a sick backend, a database that goes away, operator pauses.

Every daemon is a real `python -m daemon` process, the backend is the reference backend
as a real server, and the database is the machine's PostgreSQL (a schema of its own).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from tests.acceptance.conftest import Backend, Harness, Proc, wait_until


class Pg:
    """The shared database as the test sees it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def synced(self) -> set[int]:
        return {r[0] for r in self.rows("SELECT id FROM users WHERE last_sync IS NOT NULL")}

    def leases_of(self, instance_pid: int) -> set[str]:
        rows = self.rows(
            "SELECT user_key FROM sync_user_state WHERE lease_owner LIKE :owner",
            owner=f"%:{instance_pid}:%",
        )
        return {r[0] for r in rows}


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Pg]:
    database = Pg(postgres_url)
    yield database
    database.engine.dispose()


def prepare(harness: Harness, pg: Pg, users: int) -> None:
    env = harness.env(SYNC_DATABASE_URL=pg.url)
    for args in (["migrate"], ["seed-demo", "--users", str(users)]):
        done = harness.cli(*args, env=env)
        assert done.returncode == 0, done.stdout + done.stderr


def daemon_env(harness: Harness, pg: Pg, backend: Backend, **settings: Any) -> dict[str, str]:
    base: dict[str, Any] = {
        "SYNC_DATABASE_URL": pg.url,
        "SYNC_INTERVAL_SECONDS": 3600,
        "SYNC_JITTER_SECONDS": 0,
        "SYNC_CONCURRENCY": 16,
        "SYNC_CLAIM_BATCH_SIZE": 32,
        "NOTIFY_SOCKET": None,
    }
    return harness.env(backend, **(base | settings))


def succeeded_by(daemons: list[Proc]) -> list[int]:
    return [sum(e["succeeded"] for e in d.events("cycle_finished")) for d in daemons]


@pytest.mark.parametrize("instances", [1, 3])
def test_instances_share_the_users_and_sync_each_exactly_once_without_overlap(
    harness: Harness, pg: Pg, instances: int
) -> None:
    prepare(harness, pg, 3000)
    backend = harness.start_backend(latency_ms=20)
    env = daemon_env(harness, pg, backend)
    began = time.monotonic()
    daemons = [harness.start_daemon(env) for _ in range(instances)]
    wait_until(
        lambda: len(pg.synced()) == 3000,
        timeout=90,
        what="3000 users synced",
        describe=harness.describe,
    )
    wall = time.monotonic() - began
    for daemon in daemons:
        daemon.wait_for_event("cycle_finished")
    stats = backend.stats()
    shares = succeeded_by(daemons)
    print(
        f"\n{instances} instance(s): 3000 users in {wall:.2f}s, shares {shares}, "
        f"successes {stats['successes']}, overlaps {stats['overlaps']}"
    )
    assert stats["successes"] == 3000
    assert set(stats["per_user_successes"].values()) == {1}  # never doubled
    assert stats["overlaps"] == 0  # never two calls for one user at once
    assert sum(shares) == 3000
    assert all(share > 0 for share in shares)
    assert pg.scalar("SELECT count(*) FROM sync_user_state WHERE lease_owner IS NOT NULL") == 0


def test_kill_9_mid_cycle_loses_nothing_and_the_survivor_finishes_within_the_lease_time(
    harness: Harness, pg: Pg
) -> None:
    prepare(harness, pg, 400)
    backend = harness.start_backend(latency_ms=250)
    env = daemon_env(
        harness,
        pg,
        backend,
        SYNC_CONCURRENCY=8,
        SYNC_LEASE_SECONDS=4,
        SYNC_REQUEST_TIMEOUT_SECONDS=2,
        SYNC_INTERVAL_SECONDS=1,
        SYNC_CLAIM_BATCH_SIZE=16,
    )
    victim, survivor = harness.start_daemon(env), harness.start_daemon(env)
    victim.wait_for_event("user_synced", count=20)
    orphaned = pg.leases_of(victim.pid)
    killed = victim.signal(signal.SIGKILL)
    assert victim.wait_exit() == -signal.SIGKILL
    assert orphaned, "the victim held no lease when killed"

    def orphans_done() -> bool:
        keys = ",".join(orphaned)
        done = pg.scalar(
            "SELECT count(*) FROM users WHERE last_sync IS NOT NULL AND CAST(id AS TEXT) IN "
            "(SELECT unnest(string_to_array(:keys, ',')))",
            keys=keys,
        )
        return done == len(orphaned)

    wait_until(
        orphans_done,
        timeout=30,
        what="the victim's users synced by the survivor",
        describe=harness.describe,
    )
    recovery = time.monotonic() - killed
    wait_until(
        lambda: len(pg.synced()) == 400,
        timeout=60,
        what="all 400 synced",
        describe=harness.describe,
    )
    stats = backend.stats()
    doubled = [u for u, n in stats["per_user_successes"].items() if n > 1]
    print(
        f"\nkill -9: {len(orphaned)} orphaned leases, recovered in {recovery:.1f}s "
        f"(lease 4s, takeover every 1s); {len(doubled)} users synced twice, overlaps "
        f"{stats['overlaps']}"
    )
    # lease expiry + one takeover period + calling them (8 at a time, 0.25 s each) + slack
    assert recovery < 4 + 1 + len(orphaned) / 8 * 0.25 + 4
    assert stats["overlaps"] == 0
    assert set(doubled) <= orphaned  # at-least-once: only calls the victim had in flight
    assert survivor.alive


def test_cleanup_records_and_frees_what_a_killed_instance_held(harness: Harness, pg: Pg) -> None:
    prepare(harness, pg, 200)
    backend = harness.start_backend(latency_ms=300)
    env = daemon_env(harness, pg, backend, SYNC_LEASE_SECONDS=3, SYNC_REQUEST_TIMEOUT_SECONDS=2)
    victim = harness.start_daemon(env)
    victim.wait_for_event("user_synced", count=5)
    victim.signal(signal.SIGKILL)
    victim.wait_exit()
    held = len(pg.leases_of(victim.pid))
    time.sleep(3.2)  # let the leases expire: that is what makes them abandoned
    done = harness.cli("cleanup", "--stale-after", "3", env=env)
    assert done.returncode == 0, done.stderr
    assert f"freed {held} expired lease(s)" in done.stdout
    assert "closed 1 abandoned run(s)" in done.stdout
    abandoned = pg.scalar(
        "SELECT count(*) FROM sync_operations WHERE outcome = 'failed' AND error LIKE 'abandoned%'"
    )
    assert abandoned == held
    assert pg.scalar("SELECT count(*) FROM sync_user_state WHERE lease_owner IS NOT NULL") == 0


def test_a_backend_with_5xx_resets_and_429s_never_advances_last_sync_without_a_success(
    harness: Harness, pg: Pg
) -> None:
    prepare(harness, pg, 300)
    backend = harness.start_backend(latency_ms=10)
    backend.set_faults(
        latency_ms=10,
        error_rate=0.15,
        reset_rate=0.1,
        rate_limit_rate=0.05,
        retry_after_seconds=1,
        seed=42,
    )
    env = daemon_env(
        harness,
        pg,
        backend,
        SYNC_MAX_RETRIES=2,
        SYNC_RETRY_DELAY_SECONDS=0.05,
        SYNC_MAX_CONSECUTIVE_FAILURES=1000,
    )
    first = harness.cli("once", env=env, timeout=120)
    second = harness.cli("once", env=env, timeout=120)
    stats = backend.stats()
    succeeded_at_backend = {int(u) for u, n in stats["per_user_successes"].items() if n > 0}
    print(
        f"\nfault mix: exits {first.returncode}/{second.returncode}, backend by status "
        f"{stats['by_status']}, users synced {len(pg.synced())}/300, "
        f"succeeded at backend {len(succeeded_at_backend)}"
    )
    assert first.returncode in (0, 1) and second.returncode in (0, 1)
    assert pg.synced() == succeeded_at_backend  # every success recorded, nothing else
    assert stats["overlaps"] == 0
    assert stats["by_status"].get("reset", 0) > 0 and stats["by_status"].get("429", 0) > 0


def test_pause_holds_for_every_instance_and_across_restarts(harness: Harness, pg: Pg) -> None:
    prepare(harness, pg, 20)
    backend = harness.start_backend(latency_ms=5)
    env = daemon_env(harness, pg, backend, SYNC_INTERVAL_SECONDS=1)
    daemons = [harness.start_daemon(env) for _ in range(2)]
    wait_until(lambda: len(pg.synced()) == 20, what="first 20 synced", describe=harness.describe)

    assert harness.cli("pause", env=env).returncode == 0
    for daemon in daemons:
        daemon.wait_for_event("sync_paused")
    assert harness.cli("seed-demo", "--users", "30", env=env).returncode == 0
    daemons[0].signal(signal.SIGTERM)
    assert daemons[0].wait_exit() == 0
    restarted = harness.start_daemon(env)
    restarted.wait_for_event("sync_paused")  # the pause outlives the process
    restarted.wait_for_event("cycle_skipped", count=2)
    assert len(pg.synced()) == 20
    requests = backend.stats()["requests"]
    status = harness.cli("status", env=env)
    assert "PAUSED by" in status.stdout

    assert harness.cli("resume", env=env).returncode == 0
    wait_until(
        lambda: len(pg.synced()) == 30,
        what="the 10 new users synced after resume",
        describe=harness.describe,
    )
    assert backend.stats()["requests"] == requests + 10


def test_force_starts_a_cycle_on_every_instance(harness: Harness, pg: Pg) -> None:
    prepare(harness, pg, 5)
    backend = harness.start_backend(latency_ms=5)
    env = daemon_env(harness, pg, backend)
    daemons = [harness.start_daemon(env) for _ in range(2)]
    for daemon in daemons:
        daemon.wait_for_event("cycle_finished")
    assert harness.cli("force", env=env).returncode == 0
    for daemon in daemons:
        daemon.wait_for_event("cycle_finished", count=2, timeout=15)
        assert daemon.events("cycle_requested")[-1]["reason"].startswith("force by ")


def _allow_connections(pg: Pg, allowed: bool) -> None:
    name = make_url(pg.url).database
    admin = create_engine(
        make_url(pg.url).set(database="postgres", query={}), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'))
        if not allowed:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
    admin.dispose()


def test_a_database_refusing_connections_degrades_health_and_the_daemon_recovers_alone(
    harness: Harness, pg: Pg
) -> None:
    prepare(harness, pg, 10)
    backend = harness.start_backend(latency_ms=5)
    env = daemon_env(harness, pg, backend, SYNC_INTERVAL_SECONDS=1)
    daemon = harness.start_daemon(env)
    wait_until(lambda: len(pg.synced()) == 10, what="first users synced", describe=daemon.tail)
    pg.engine.dispose()
    _allow_connections(pg, False)
    try:
        daemon.wait_for_event("database_degraded", timeout=30)
        assert harness.status(daemon)["health"] == "degraded"
    finally:
        _allow_connections(pg, True)
    daemon.wait_for_event("database_available", timeout=30)
    assert harness.cli("seed-demo", "--users", "15", env=env).returncode == 0
    wait_until(
        lambda: len(pg.synced()) == 15, what="new users synced after recovery", describe=daemon.tail
    )
    assert daemon.alive
    assert harness.status(daemon)["health"] == "healthy"


def test_a_database_gone_past_the_outage_bound_ends_the_daemon_with_75(
    harness: Harness, pg: Pg
) -> None:
    prepare(harness, pg, 3)
    backend = harness.start_backend(latency_ms=5)
    env = daemon_env(harness, pg, backend, SYNC_INTERVAL_SECONDS=1, SYNC_DATABASE_OUTAGE_SECONDS=3)
    daemon = harness.start_daemon(env)
    daemon.wait_for_event("cycle_finished")
    _allow_connections(pg, False)
    try:
        daemon.wait_for_event("database_outage_limit", timeout=60)
        assert daemon.wait_exit(timeout=30) == 75
    finally:
        _allow_connections(pg, True)
