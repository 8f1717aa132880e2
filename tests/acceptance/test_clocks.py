"""Clocks that are wrong: real daemons under libfaketime (Debian package `faketime`).

A host whose clock is off has a different wall clock and a normal monotonic clock.
libfaketime fakes both by default. For a constant skew that is harmless (a monotonic
clock's origin means nothing, only its rate does), so the skewed daemon keeps it; for a
step, FAKETIME_DONT_FAKE_MONOTONIC=1 keeps the monotonic clock real, as it is when
an operator or NTP steps a real clock. (In libfaketime 0.9.10 that option makes
Python's time.sleep fail with EINVAL; the daemon only sleeps that way between database
retries, which a single daemon on its own SQLite file does not need.)
"""

from __future__ import annotations

import datetime as dt
import glob
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.conftest import Harness, Proc, wait_until
from tests.acceptance.test_instances import Pg, daemon_env, prepare

LEASE_SECONDS = 40
SKEW_SECONDS = 30
CALL_SECONDS = 20  # longer than LEASE_SECONDS - SKEW_SECONDS, shorter than a lease


def libfaketime() -> str:
    """The preload library; missing is an error, never a skip (.ci/run installs it)."""
    for pattern in (
        "/usr/lib/*/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    pytest.fail("libfaketime is required: apt-get install faketime", pytrace=False)


@pytest.fixture
def shared(postgres_url: str) -> Iterator[Pg]:
    database = Pg(postgres_url)
    yield database
    database.engine.dispose()


def logged_at(event: dict[str, object]) -> dt.datetime:
    return dt.datetime.fromisoformat(str(event["timestamp"]))


def test_an_instance_30_s_ahead_never_calls_a_user_in_flight_or_abandons_live_work(
    harness: Harness, shared: Pg
) -> None:
    prepare(harness, shared, 60)
    backend = harness.start_backend(latency_ms=CALL_SECONDS * 1000)
    env = daemon_env(
        harness,
        shared,
        backend,
        SYNC_LEASE_SECONDS=LEASE_SECONDS,
        SYNC_REQUEST_TIMEOUT_SECONDS=CALL_SECONDS + 10,
        SYNC_CONCURRENCY=64,
        SYNC_ADAPTIVE_CONCURRENCY="false",  # all 64 in flight from the first call
        SYNC_CLAIM_BATCH_SIZE=64,
    )
    right = harness.start_daemon(env)
    wait_until(
        lambda: backend.stats()["in_flight"] == 60,
        what="all 60 users in flight from the instance with the right clock",
        describe=harness.describe,
    )
    # Cycles every second, each with its cleanup, scan and takeover: plenty of chances
    # to take leases that look expired to a clock 30 s ahead, 10 s after the claim.
    ahead = harness.start_daemon(
        env
        | {
            "LD_PRELOAD": libfaketime(),
            "FAKETIME": f"+{SKEW_SECONDS}s",
            "SYNC_INTERVAL_SECONDS": "1",
        }
    )
    ready = ahead.wait_for_event("daemon_ready")
    skew = logged_at(ready) - dt.datetime.now(dt.UTC)
    assert skew > dt.timedelta(seconds=SKEW_SECONDS - 5), "faketime did not skew the daemon"

    wait_until(
        lambda: len(shared.synced()) == 60,
        timeout=CALL_SECONDS * 3,
        what="60 users synced",
        describe=harness.describe,
    )
    cycles = len(ahead.events("cycle_finished"))
    ahead.wait_for_event("cycle_finished", count=cycles + 3)  # it goes on, finding nothing
    stats = backend.stats()
    abandoned = shared.scalar("SELECT count(*) FROM sync_operations WHERE error LIKE 'abandoned%'")
    print(
        f"\nclock {SKEW_SECONDS} s ahead, lease {LEASE_SECONDS} s, calls {CALL_SECONDS} s: "
        f"requests {stats['requests']}, overlaps {stats['overlaps']}, abandoned {abandoned}, "
        f"cycles of the skewed instance {len(ahead.events('cycle_finished'))}"
    )
    assert stats["overlaps"] == 0
    assert stats["successes"] == 60
    assert set(stats["per_user_successes"].values()) == {1}
    assert abandoned == 0
    assert ahead.events("abandoned_work_cleaned") == []
    assert ahead.events("orphaned_leases_taken_over") == []
    assert right.events("user_sync_lease_lost") == []
    assert sum(e["succeeded"] for e in right.events("cycle_finished")) == 60


def test_a_wall_clock_stepped_back_an_hour_keeps_cycles_starting_every_interval(
    harness: Harness, tmp_path: Path
) -> None:
    harness.database(5)
    backend = harness.start_backend(latency_ms=5)
    offset = tmp_path / "faketime.rc"
    offset.write_text("+0\n")
    daemon = harness.start_daemon(
        harness.env(
            backend,
            SYNC_INTERVAL_SECONDS=2,
            NOTIFY_SOCKET=None,
            LD_PRELOAD=libfaketime(),
            FAKETIME_TIMESTAMP_FILE=offset,
            FAKETIME_NO_CACHE=1,  # re-read the file on every call: the step lands at once
            FAKETIME_DONT_FAKE_MONOTONIC=1,
        )
    )
    before = daemon.wait_for_event("cycle_requested", count=2, reason="schedule")

    offset.write_text("-1h\n")
    stepped = wait_until(
        lambda: scheduled_after(daemon, before["_at"], count=3),
        what="3 scheduled cycles after the wall clock was stepped back an hour",
        describe=daemon.tail,
    )
    # The step really happened inside the daemon: its log clock went back an hour.
    assert logged_at(before) - logged_at(stepped[-1]) > dt.timedelta(minutes=59)
    assert daemon.events("wall_clock_stepped")
    assert harness.status(daemon)["health"] == "healthy"


def scheduled_after(daemon: Proc, since: float, *, count: int) -> list[dict[str, object]] | None:
    found = [
        e
        for e in daemon.events("cycle_requested", reason="schedule")
        if e["_at"] > since and logged_at(e) < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=59)
    ]
    return found if len(found) >= count else None
