"""What `status` reads from the database: a running cycle's progress, the thresholds of
the daemon rather than the caller's, failing users in the ids' own order, what is next.

On a SQLite file and on PostgreSQL; instances are written as the daemon writes them
(control.report_instance with its thresholds.dump), runs as a cycle writes them.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update

from daemon import control, overview, screen, thresholds
from daemon.database import utcnow
from daemon.models import instances, user_state
from daemon.pollconn import PollConnection
from daemon.store import Cursor, RunCounts
from tests.conftest import AppDatabase, SettingsFactory


def report(
    app_db: AppDatabase,
    instance: str,
    *,
    env: dict[str, str] | None = None,
    health: str = "healthy",
    live: thresholds.Live | None = None,
    state: str = "idle",
    make_settings: SettingsFactory | None = None,
) -> None:
    """An instance row as a daemon running with `env` writes it at its control poll."""
    settings = make_settings(**(env or {})) if make_settings else app_db.settings
    control.report_instance(
        app_db.db,
        instance=instance,
        started_at=utcnow(),
        now=utcnow(),
        state=state,
        circuit="closed",
        status=state,
        settings=thresholds.record(settings, live or thresholds.Live()),
        health=health,
    )


def collect(app_db: AppDatabase, settings: Any = None) -> dict[str, Any]:
    store = app_db.store(instance="status-reader")
    return overview.collect(app_db.db, store, settings or app_db.settings, now=utcnow())


def fail(app_db: AppDatabase, failures: dict[str, int], *, backoff_s: float = 0) -> None:
    with app_db.db.engine.begin() as conn:
        conn.execute(
            insert(user_state),
            [
                {
                    "user_key": key,
                    "consecutive_failures": count,
                    "last_status": 500,
                    "last_error": "HTTP 500",
                    "next_attempt_at": utcnow() + timedelta(seconds=backoff_s)
                    if backoff_s
                    else None,
                }
                for key, count in failures.items()
            ],
        )


def test_due_and_quarantined_are_judged_with_the_running_daemons_thresholds_not_the_callers(
    app_db: AppDatabase, make_settings: SettingsFactory
) -> None:
    app_db.seed(5, last_sync=utcnow() - timedelta(hours=2))
    fail(app_db, {"1": 3})
    report(
        app_db,
        "daemon",
        env={"SYNC_STALE_AFTER_SECONDS": "3600", "SYNC_QUARANTINE_AFTER": "3"},
        make_settings=make_settings,
    )
    shell = make_settings(SYNC_STALE_AFTER_SECONDS="86400", SYNC_QUARANTINE_AFTER="10")

    data = collect(app_db, shell)

    assert data["thresholds"]["source"] == "instance"
    assert data["thresholds"]["instance"] == "daemon"
    assert data["thresholds"]["values"]["stale_after_seconds"] == 3600
    assert (data["due_users"], data["quarantined_users"]) == (5, 1)
    # Fresh = synced within the daemon's stale-after + interval (3600 + 300 s), not 1 day.
    assert data["freshness"]["target_s"] == 3900
    assert (data["freshness"]["fresh"], data["freshness"]["overdue"]) == (0, 5)
    assert data["freshness"]["quarantined"] == 1
    text = screen.render(data)
    assert "thresholds of instance daemon: stale after 60 min" in text
    assert text.startswith(
        "0 % fresh (objective 99 %), 5 overdue, oldest overdue 2 h, 1 quarantined; "
    )


def test_with_no_instance_running_the_callers_thresholds_are_used_and_said_to_be(
    app_db: AppDatabase, make_settings: SettingsFactory
) -> None:
    app_db.seed(5, last_sync=utcnow() - timedelta(hours=2))
    report(app_db, "daemon", env={"SYNC_STALE_AFTER_SECONDS": "3600"}, make_settings=make_settings)
    control.mark_stopped(app_db.db, instance="daemon")

    data = collect(app_db, make_settings(SYNC_STALE_AFTER_SECONDS="86400"))

    assert data["thresholds"]["source"] == "environment"
    assert data["due_users"] == 0
    assert "no running instance: this environment's thresholds" in screen.render(data)
    assert data["verdict"]["exit_status"] == overview.EXIT_NOT_RUNNING


def test_a_running_cycle_shows_the_progress_its_heartbeat_wrote(app_db: AppDatabase) -> None:
    app_db.seed(10)
    store = app_db.store(instance="daemon")
    limit = {"adaptive": True, "limit": 3, "maximum": 4, "reason": "drop", "baseline_s": 0.052}
    live = thresholds.Live(in_flight=3, run_id="run1", concurrency=limit)
    report(app_db, "daemon", live=live, state="syncing")
    now = utcnow()
    store.start_run("run1", now=now - timedelta(seconds=20), due=10)
    claimed = store.claim(
        Cursor(), 6, run_id="run1", now=now, stale_before=now - timedelta(hours=1)
    )
    assert len(claimed) == 6
    store.heartbeat(
        "run1", now=now, counts=RunCounts(due=10, claimed=6, succeeded=4, failed=1, skipped=0)
    )

    data = collect(app_db)

    [run] = data["running"]
    assert (run["run_id"], run["due"], run["claimed"], run["done"], run["of"]) == (
        "run1",
        10,
        6,
        5,
        10,
    )
    assert run["percent"] == 50.0
    assert run["calls_in_flight"] == 3
    assert run["rate_per_s"] is not None and run["rate_per_s"] > 0
    assert run["eta_s"] is not None and run["eta_s"] > 0
    assert data["users_claimed"] == 6
    text = screen.render(data)
    assert "cycle running 20 s: 5 of 10 (50 %)" in text
    assert "6 claimed so far, 6 leases held now, 3 call(s) in flight" in text
    assert "in flight (limit 3 of 4: drop; baseline 52 ms)" in text


def test_failing_users_come_most_failures_first_then_in_numeric_id_order(
    app_db: AppDatabase,
) -> None:
    app_db.seed(12)
    fail(app_db, {"10": 2, "9": 2, "2": 2, "11": 5, "1": 1}, backoff_s=240)

    data = collect(app_db)

    assert [u["user_id"] for u in data["failing_users"]] == [11, 2, 9, 10, 1]
    assert data["failing_users_total"] == 5
    assert all(230 < u["next_attempt_in_s"] <= 240 for u in data["failing_users"])
    text = screen.render(data)
    assert "    11: 5 in a row, last 500 HTTP 500, next attempt in 3 min" in text


def test_the_instances_recorded_health_decides_the_verdict_and_a_pause_shows(
    app_db: AppDatabase,
) -> None:
    report(
        app_db,
        "a",
        health="degraded",
        live=thresholds.Live(health_reasons=("circuit open, probe in 42 s",), probe_in_s=42),
    )
    report(app_db, "b")
    control.set_paused(app_db.db, True, by="ops@host", now=utcnow())

    data = collect(app_db)

    assert data["verdict"]["state"] == "degraded"
    assert data["verdict"]["exit_status"] == overview.EXIT_DEGRADED
    assert "a: circuit open, probe in 42 s" in data["verdict"]["reasons"]
    assert "paused by ops@host" in data["verdict"]["reasons"]
    [a] = [n for n in data["next"]["instances"] if n["instance"] == "a"]
    assert a["next_probe_at"] is not None
    text = screen.render(data)
    assert text.splitlines()[1].startswith(
        "status: DEGRADED (exit 4): a: circuit open, probe in 42 s"
    )
    assert "circuit probe in 4" in text  # 42 s from the row's heartbeat
    assert "PAUSED by ops@host 0 s ago" in text or "PAUSED by ops@host 1 s ago" in text


def test_the_screen_names_the_database_without_its_password(
    app_db: AppDatabase,
) -> None:
    data = collect(app_db)
    assert data["database"]["users_table"] == "users"
    assert "users table users" in screen.render(data)


def test_a_settings_text_kept_across_polls_counts_its_moments_from_when_it_was_written(
    app_db: AppDatabase,
) -> None:
    """The poll rewrites the text only when it changes; the heartbeat moves on every poll.
    `status` must then count the next cycle from the text's own `as_of`, not from the
    heartbeat, and still show the instance as seen a moment ago."""
    recorder = thresholds.Recorder()
    kept = PollConnection(app_db.db.engine)  # as the daemon polls: the first one inserts

    def poll(next_cycle_in_s: float) -> control.Reported:
        record = recorder.record(app_db.settings, thresholds.Live(next_cycle_in_s=next_cycle_in_s))
        reported = control.report_instance(
            app_db.db,
            instance="daemon",
            started_at=utcnow(),
            now=utcnow(),
            state="idle",
            circuit="closed",
            status="idle",
            settings=record,
            health="healthy",
            connection=kept,
        )
        if reported.settings_written:
            recorder.written(record)
        return reported

    assert poll(600).settings_written
    first = collect(app_db)
    [row] = first["instances"]
    assert row["next_cycle_at"] is not None
    # As if the instance reported again 100 s later, its next cycle unchanged: 500 s away.
    # The text is kept, the heartbeat is the database's time of this poll.
    shift = timedelta(seconds=100)
    with app_db.db.engine.begin() as conn:
        text = conn.execute(select(instances.c.settings)).scalar_one()
        written = thresholds.load(text)["live"]["as_of"]
        earlier = (datetime.fromisoformat(written) - shift).isoformat(sep=" ")
        conn.execute(update(instances).values(settings=text.replace(written, earlier)))
    assert not poll(600 - 0.5).settings_written  # same moment within the tolerance

    later = collect(app_db)
    [row] = later["instances"]
    assert row["seen_seconds_ago"] is not None and row["seen_seconds_ago"] < 2
    at = datetime.fromisoformat(row["next_cycle_at"])
    assert abs((at - datetime.fromisoformat(later["database_now"])).total_seconds() - 500) < 3
    assert "next cycle in 8 min" in screen.render(later)
    kept.close()
