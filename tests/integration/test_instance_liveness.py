"""Who is alive: a clean stop says so, a silent instance is lost, and `cleanup` never
takes live work for abandoned, whatever threshold it is given.

Ages are set on the database's clock (the one heartbeats are written with), on a SQLite
file and on PostgreSQL.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from daemon import control, dbclock, overview
from daemon.database import utcnow
from daemon.models import instances, runs, user_state
from daemon.store import Cursor, Store
from tests.conftest import AppDatabase

LEASE = 60.0


def report(app_db: AppDatabase, instance: str, state: str = "idle") -> None:
    control.report_instance(
        app_db.db,
        instance=instance,
        started_at=utcnow(),
        now=utcnow(),
        state=state,
        circuit="closed",
        status=state,
    )


def age(app_db: AppDatabase, table: Any, seconds: float) -> None:
    """As if the rows of `table` had last been heard of `seconds` ago."""
    with app_db.db.engine.begin() as conn:
        conn.execute(update(table).values(heartbeat_at=dbclock.after(app_db.db.dialect, -seconds)))


def claim_all(store: Store, run_id: str) -> int:
    now, cursor, count = utcnow(), Cursor(), 0
    while not cursor.done:
        count += len(
            store.claim(cursor, 100, run_id=run_id, now=now, stale_before=now - timedelta(hours=1))
        )
    return count


def listed(app_db: AppDatabase) -> dict[str, dict[str, Any]]:
    store = app_db.store(instance="status-reader")
    data = overview.collect(app_db.db, store, app_db.settings, now=utcnow())
    return {inst["instance"]: inst for inst in data["instances"]}


def test_status_says_how_long_ago_each_instance_was_seen_and_calls_a_silent_one_lost(
    app_db: AppDatabase,
) -> None:
    for name in ("fresh", "silent", "stopped"):
        report(app_db, name)
    control.mark_stopped(app_db.db, instance="stopped")
    with app_db.db.engine.begin() as conn:
        conn.execute(
            update(instances)
            .where(instances.c.instance.in_(["silent", "stopped"]))
            .values(
                heartbeat_at=dbclock.after(app_db.db.dialect, -(control.LOST_AFTER_SECONDS + 5))
            )
        )
    shown = listed(app_db)
    assert (shown["fresh"]["state"], shown["fresh"]["lost"]) == ("idle", False)
    assert shown["fresh"]["seen_seconds_ago"] < control.LOST_AFTER_SECONDS
    assert (shown["silent"]["state"], shown["silent"]["last_state"]) == ("lost", "idle")
    assert shown["silent"]["seen_seconds_ago"] >= control.LOST_AFTER_SECONDS + 5
    # Stopped is an answer: however long ago, it is never lost.
    assert (shown["stopped"]["state"], shown["stopped"]["lost"]) == ("stopped", False)
    text = overview.render(
        overview.collect(app_db.db, app_db.store(), app_db.settings, now=utcnow())
    )
    assert re.search(r"^  silent: LOST: silent for 3\d s .*, last said idle", text, re.M)
    assert re.search(r"^  stopped: stopped 3\d s ago$", text, re.M)
    assert re.search(r"^  fresh: idle, circuit closed, seen \d+ s ago: idle$", text, re.M)


def test_a_clean_stop_marks_the_instance_stopped_and_keeps_its_row(app_db: AppDatabase) -> None:
    report(app_db, "worker", state="syncing")
    assert control.mark_stopped(app_db.db, instance="worker") is True
    assert control.mark_stopped(app_db.db, instance="never-reported") is False
    assert listed(app_db)["worker"]["state"] == "stopped"
    assert set(listed(app_db)) == {"worker"}


def test_cleanup_never_closes_a_run_whose_instance_still_holds_live_leases(
    app_db: AppDatabase,
) -> None:
    app_db.seed(3)
    worker = app_db.store(instance="worker", lease_seconds=LEASE)
    run_id = uuid.uuid4().hex
    worker.start_run(run_id, now=utcnow())
    assert claim_all(worker, run_id) == 3
    report(app_db, "worker", state="syncing")
    # Its heartbeats were held up (a slow database), but its leases are live.
    age(app_db, runs, 3600)
    age(app_db, instances, 3600)
    cleaned = control.cleanup(app_db.db, now=utcnow(), stale_after=timedelta(seconds=LEASE))
    assert cleaned == control.Cleaned(leases=0, runs=0, instances=0)
    with app_db.db.engine.connect() as conn:
        assert conn.execute(select(runs.c.outcome)).scalar_one() == "running"
        assert conn.execute(select(instances.c.instance)).scalar_one() == "worker"
        owners = conn.execute(select(user_state.c.lease_owner)).scalars().all()
    assert owners == ["worker"] * 3


def test_cleanup_forgets_a_silent_instance_only_once_status_would_call_it_lost(
    app_db: AppDatabase,
) -> None:
    report(app_db, "quiet")
    report(app_db, "stopped")
    control.mark_stopped(app_db.db, instance="stopped")
    age(app_db, instances, control.LOST_AFTER_SECONDS - 10)
    cleaned = control.cleanup(app_db.db, now=utcnow(), stale_after=timedelta(seconds=5))
    # A stopped instance is forgotten at the threshold; a silent one waits for "lost".
    assert cleaned.instances == 1
    assert set(listed(app_db)) == {"quiet"}
    age(app_db, instances, control.LOST_AFTER_SECONDS + 5)
    assert control.cleanup(app_db.db, now=utcnow(), stale_after=timedelta(seconds=5)).instances == 1
    assert listed(app_db) == {}


@pytest.mark.parametrize("seconds", [0, -1])
def test_cleanup_refuses_a_threshold_that_is_not_positive(
    app_db: AppDatabase, seconds: float
) -> None:
    with pytest.raises(ValueError, match="stale_after must be positive"):
        control.cleanup(app_db.db, now=utcnow(), stale_after=timedelta(seconds=seconds))
