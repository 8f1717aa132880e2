"""Freshness measured from the users table, in every storage last_sync may have."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from daemon import freshness, schema
from daemon import settings as settings_module
from daemon.database import Database, migrate
from daemon.freshness import BUCKETS_S
from daemon.store import Store
from tests.conftest import AppDatabase

NOW = datetime.now(UTC)


def measure(
    store: Store, *, target_s: float = 3900, quarantine_after: int = 10
) -> freshness.Freshness:
    return store.freshness(
        target_s=target_s, objective=0.99, quarantine_after=quarantine_after, now=NOW
    )


def test_fresh_overdue_never_synced_and_the_oldest_are_counted(app_db: AppDatabase) -> None:
    app_db.seed(6)
    ages_min = {1: 1, 2: 30, 3: 64, 4: 70, 5: 600}
    for user_id, minutes in ages_min.items():
        app_db.set_last_sync(user_id, NOW - timedelta(minutes=minutes))
    found = measure(app_db.store())
    assert (found.users, found.fresh, found.overdue, found.never_synced) == (6, 3, 3, 1)
    assert round(found.fresh_ratio, 3) == 0.5
    assert found.oldest_overdue_s is not None and abs(found.oldest_overdue_s - 36000) < 5
    by_bound = dict(zip(BUCKETS_S, found.staleness, strict=True))
    assert by_bound[300] == 1 and by_bound[3600] == 2 and by_bound[7200] == 4
    assert by_bound[43200] == 5 and by_bound[604800] == 5


def test_an_all_fresh_table_has_no_oldest_overdue_and_reads_100_percent(
    app_db: AppDatabase,
) -> None:
    app_db.seed(3, last_sync=NOW - timedelta(minutes=5))
    found = measure(app_db.store())
    assert (found.fresh_ratio, found.overdue, found.oldest_overdue_s) == (1.0, 0, None)
    assert freshness.headline(found) == "100 % fresh"


def test_an_empty_table_is_entirely_fresh(app_db: AppDatabase) -> None:
    found = measure(app_db.store())
    assert (found.users, found.fresh_ratio, found.staleness) == (0, 1.0, (0,) * len(BUCKETS_S))


def test_quarantined_users_are_counted_not_hidden(app_db: AppDatabase) -> None:
    app_db.seed(4)
    with app_db.db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO sync_user_state (user_key, consecutive_failures) "
                "VALUES ('1', 12), ('2', 10), ('3', 2)"
            )
        )
    found = measure(app_db.store(), quarantine_after=10)
    assert (found.quarantined, found.overdue) == (2, 4)
    assert "2 quarantined" in freshness.headline(found)


def test_unix_epoch_and_iso_text_last_sync_are_measured_in_their_own_form(tmp_path: Path) -> None:
    """SQLite tables keep last_sync as integers or ISO text; ages come out the same."""
    for column, value in (
        ("INTEGER", lambda d: str(int(d.timestamp()))),
        ("TEXT", lambda d: "'" + d.strftime("%Y-%m-%dT%H:%M:%SZ") + "'"),
    ):
        url = f"sqlite:///{tmp_path / (column + '.db')}"
        engine = create_engine(url)
        migrate(engine)
        rows = ", ".join(
            f"({i}, 'u{i}@x', {value(NOW - timedelta(minutes=m))})"
            for i, m in enumerate((2, 40, 120), start=1)
        )
        with engine.begin() as conn:
            conn.execute(
                text(f"CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, last_sync {column})")
            )
            conn.execute(text(f"INSERT INTO users VALUES {rows}"))
        settings = settings_module.load({"SYNC_DATABASE_URL": url})
        db = Database(engine)
        try:
            store = Store(
                db, schema.inspect_users(engine, settings), instance="t", lease_seconds=60
            )
            found = measure(store)
        finally:
            db.dispose()
        assert (found.fresh, found.overdue) == (2, 1), column
        assert found.oldest_overdue_s is not None and abs(found.oldest_overdue_s - 7200) < 5, column


def test_the_share_is_floored_so_one_overdue_user_never_reads_100_percent() -> None:
    assert freshness.percent(0.99999) == "99.9 %"
    assert freshness.percent(1.0) == "100 %"
    assert freshness.percent(0.5) == "50 %"


def test_range_counts_and_one_pass_agree_whichever_end_they_count_from(
    app_db: AppDatabase,
) -> None:
    """The index path counts each bound from the end that was smaller last time."""
    app_db.seed(40)
    for user_id in range(1, 40):
        app_db.set_last_sync(user_id, NOW - timedelta(minutes=user_id * 17))
    store = app_db.store()
    column = store.users.table.c[store.users.last_sync_column]

    def run(range_counts: bool, hint: freshness.Freshness | None) -> freshness.Freshness:
        with app_db.db.engine.connect() as conn, Session(bind=conn) as session:
            return freshness.measure(
                session,
                column,
                range_counts=range_counts,
                in_column_form=store._app_time,
                as_instant=lambda value: schema.as_instant(value, store.users.storage),
                target_s=3900,
                objective=0.99,
                quarantine_after=10,
                now=NOW,
                hint=hint,
            )

    one_pass = run(False, None)
    assert run(True, None) == one_pass
    assert run(True, one_pass) == one_pass
    assert (one_pass.fresh, one_pass.never_synced) == (3, 1)
