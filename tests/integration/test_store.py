"""Claims, leases and fenced writes against a real SQLite file and PostgreSQL.

Leases and backoff run on the database's clock, so a test lets time pass for them with
`AppDatabase.let_time_pass` (it moves the stored times back), not with a later `now`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from daemon.models import operations, user_state
from daemon.store import Cursor, Store
from daemon.values import Outcome, Result
from tests.conftest import AppDatabase

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
STALE = NOW - timedelta(hours=1)


def claim_all(
    store: Store, *, now: datetime = NOW, page: int = 100, run_id: str | None = None
) -> list:
    """One run's scan; each call is a new run unless `run_id` says otherwise."""
    cursor, claims, run = Cursor(), [], run_id or uuid.uuid4().hex
    while not cursor.done:
        claims += store.claim(cursor, page, run_id=run, now=now, stale_before=STALE)
    return claims


def succeed(store: Store, claims: list, *, at: datetime = NOW) -> list:
    results = [
        Result(c, Outcome.SUCCESS, at, http_status=200, attempts=1, run_id="run1") for c in claims
    ]
    return store.finish(results, now=at, backoff=lambda n: 60.0).lease_lost


def test_never_synced_and_stale_users_are_due_and_fresh_ones_are_not(app_db: AppDatabase) -> None:
    app_db.seed(4)
    app_db.set_last_sync(2, NOW - timedelta(hours=3))
    app_db.set_last_sync(3, NOW - timedelta(minutes=10))  # synced 10 minutes ago
    claims = claim_all(app_db.store())
    assert sorted(c.user_id for c in claims) == [1, 2, 4]


def test_users_are_claimed_oldest_first_never_synced_before_stale(app_db: AppDatabase) -> None:
    app_db.seed(5)
    app_db.set_last_sync(1, NOW - timedelta(hours=2))
    app_db.set_last_sync(2, NOW - timedelta(hours=5))
    app_db.set_last_sync(3, NOW - timedelta(hours=3))
    claims = claim_all(app_db.store(), page=2)
    assert [c.user_id for c in claims] == [4, 5, 2, 3, 1]


def test_paging_visits_every_due_user_exactly_once(app_db: AppDatabase) -> None:
    app_db.seed(1000)
    claims = claim_all(app_db.store(), page=37)
    assert len(claims) == 1000
    assert len({c.user_id for c in claims}) == 1000


def test_a_leased_user_is_not_claimed_by_another_instance(app_db: AppDatabase) -> None:
    app_db.seed(3)
    first = claim_all(app_db.store(instance="a"))
    second = claim_all(app_db.store(instance="b"))
    assert len(first) == 3
    assert second == []


def test_an_expired_lease_is_claimable_at_once(app_db: AppDatabase) -> None:
    app_db.seed(2)
    claim_all(app_db.store(instance="crashed", lease_seconds=60))
    app_db.let_time_pass(61)
    taken = claim_all(app_db.store(instance="survivor"), now=NOW + timedelta(seconds=61))
    assert sorted(c.user_id for c in taken) == [1, 2]


def test_success_advances_last_sync_and_frees_the_lease(app_db: AppDatabase) -> None:
    app_db.seed(2)
    store = app_db.store()
    claims = claim_all(store)
    assert succeed(store, claims) == []
    assert app_db.last_syncs() == {1: NOW, 2: NOW}
    with app_db.db.engine.connect() as conn:
        owners = conn.execute(select(user_state.c.lease_owner)).scalars().all()
        outcomes = conn.execute(select(operations.c.outcome)).scalars().all()
    assert owners == [None, None]
    assert outcomes == ["success", "success"]


def test_a_stale_lease_tokens_write_changes_nothing(app_db: AppDatabase) -> None:
    app_db.seed(1)
    slow = app_db.store(instance="slow", lease_seconds=60)
    (old_claim,) = claim_all(slow)
    later = NOW + timedelta(seconds=90)
    app_db.let_time_pass(90)
    fast = app_db.store(instance="fast", lease_seconds=60)
    (new_claim,) = claim_all(fast, now=later)
    assert new_claim.token != old_claim.token

    lost = succeed(slow, [old_claim], at=later)

    assert [r.claim.token for r in lost] == [old_claim.token]
    assert app_db.last_syncs() == {1: None}
    with app_db.db.engine.connect() as conn:
        state = conn.execute(select(user_state)).one()
        outcome = conn.execute(select(operations.c.outcome)).scalar_one()
    assert (state.lease_owner, state.lease_token) == ("fast", new_claim.token)
    assert outcome == "lease_lost"


def test_failed_call_never_advances_last_sync_and_backs_the_user_off(
    app_db: AppDatabase,
) -> None:
    app_db.seed(1)
    store = app_db.store()
    (claim,) = claim_all(store)
    store.finish(
        [
            Result(
                claim,
                Outcome.FAILED,
                NOW,
                http_status=503,
                attempts=4,
                error="HTTP 503",
                run_id="run1",
            )
        ],
        now=NOW,
        backoff=lambda failures: 600.0 * failures,
    )
    assert app_db.last_syncs() == {1: None}
    with app_db.db.engine.connect() as conn:
        state = conn.execute(select(user_state)).one()
    assert state.consecutive_failures == 1
    assert state.last_error == "HTTP 503"
    assert state.lease_owner is None
    # backing off: not due 5 minutes later, due again after the backoff
    app_db.let_time_pass(300)
    assert claim_all(store, now=NOW + timedelta(minutes=5)) == []
    app_db.let_time_pass(360)
    assert len(claim_all(store, now=NOW + timedelta(minutes=11))) == 1


def test_one_success_resets_the_failure_count(app_db: AppDatabase) -> None:
    app_db.seed(1)
    store = app_db.store()
    (claim,) = claim_all(store)
    store.finish(
        [Result(claim, Outcome.FAILED, NOW, error="x", run_id="r")], now=NOW, backoff=lambda n: 1
    )
    app_db.let_time_pass(5)
    (claim,) = claim_all(store, now=NOW + timedelta(seconds=5))
    succeed(store, [claim], at=NOW + timedelta(seconds=5))
    with app_db.db.engine.connect() as conn:
        state = conn.execute(select(user_state)).one()
    assert (state.consecutive_failures, state.last_error) == (0, None)


def test_a_conflict_neither_advances_last_sync_nor_counts_as_failure(app_db: AppDatabase) -> None:
    app_db.seed(1)
    store = app_db.store()
    (claim,) = claim_all(store)
    store.finish(
        [Result(claim, Outcome.CONFLICT, NOW, http_status=409, run_id="r")],
        now=NOW,
        backoff=lambda n: 1,
    )
    assert app_db.last_syncs() == {1: None}
    with app_db.db.engine.connect() as conn:
        state = conn.execute(select(user_state)).one()
    assert (state.consecutive_failures, state.lease_owner, state.last_status) == (0, None, 409)


def test_a_user_is_attempted_at_most_once_per_cycle(app_db: AppDatabase) -> None:
    app_db.seed(1)
    store = app_db.store()
    (claim,) = claim_all(store, run_id="run1")
    store.finish([Result(claim, Outcome.CONFLICT, NOW, run_id="r")], now=NOW, backoff=lambda n: 1)
    # the same run scanning again (as after a rescan): the user was attempted already
    again = store.claim(
        Cursor(), 10, run_id="run1", now=NOW + timedelta(seconds=1), stale_before=STALE
    )
    assert again == []
    # a later run may attempt it again
    later = store.claim(
        Cursor(), 10, run_id="run2", now=NOW + timedelta(seconds=2), stale_before=STALE
    )
    assert [c.user_id for c in later] == [1]


def test_heartbeat_renews_live_leases_and_release_gives_them_back(app_db: AppDatabase) -> None:
    app_db.seed(3)
    store = app_db.store(lease_seconds=60)
    store.start_run("run1", now=NOW)
    claim_all(store)
    app_db.let_time_pass(30)
    assert store.heartbeat("run1", now=NOW + timedelta(seconds=30)) == 3
    # renewed to 30 + 60 s: still held at +80 s
    app_db.let_time_pass(50)
    assert claim_all(app_db.store(instance="other"), now=NOW + timedelta(seconds=80)) == []
    assert store.release_all() == 3
    assert len(claim_all(app_db.store(instance="other"), now=NOW + timedelta(seconds=81))) == 3


def test_count_due_matches_what_a_cycle_would_claim(app_db: AppDatabase) -> None:
    app_db.seed(10)
    app_db.set_last_sync(1, NOW)
    store = app_db.store()
    assert store.count_due(now=NOW, stale_before=STALE) == 9


def test_dry_run_page_reads_due_users_without_leasing_them(app_db: AppDatabase) -> None:
    app_db.seed(3)
    store = app_db.store()
    page = store.due_page(Cursor(), 10, now=NOW, stale_before=STALE)
    assert [c.user_id for c in page] == [1, 2, 3]
    with app_db.db.engine.connect() as conn:
        assert conn.execute(select(user_state)).all() == []


def test_runs_are_recorded_and_old_history_is_pruned(app_db: AppDatabase) -> None:
    app_db.seed(1)
    store = app_db.store()
    store.start_run("old", now=NOW - timedelta(days=30))
    store.finish_run(
        "old",
        now=NOW - timedelta(days=30),
        outcome="succeeded",
        claimed=1,
        succeeded=1,
        failed=0,
        skipped=0,
    )
    (claim,) = claim_all(store)
    succeed(store, [claim])
    assert store.prune_history(before=NOW - timedelta(days=14)) == 0
    with app_db.db.engine.connect() as conn:
        from daemon.models import runs

        assert conn.execute(select(runs.c.id)).scalars().all() == []


def test_a_user_synced_between_another_instances_scan_and_its_lease_is_not_claimed_again(
    app_db: AppDatabase,
) -> None:
    """The interleaving two instances produce: B reads the page, A syncs and releases the
    user, then B takes the (free again) lease. B must not get the user: it is not due."""
    app_db.seed(3)
    a, b = app_db.store(instance="a"), app_db.store(instance="b")
    scanned = b.db.transaction(
        lambda s: b._due_rows(s, Cursor(), 10, run_id="run-b", stale_before=STALE), name="scan"
    )
    assert [row[0] for row in scanned] == [1, 2, 3]
    first = a.claim(Cursor(), 1, run_id="run-a", now=NOW, stale_before=STALE)
    assert [c.user_id for c in first] == [1]
    assert succeed(a, first, at=datetime.now(UTC)) == []
    won = b.db.transaction(
        lambda s: b._lease(s, scanned, run_id="run-b", now=NOW, stale_before=STALE),
        name="lease",
    )
    assert sorted(c.user_id for c in won) == [2, 3]
    with app_db.db.engine.connect() as conn:
        state = conn.execute(
            select(user_state.c.lease_owner).where(user_state.c.user_key == "1")
        ).scalar_one()
    assert state is None  # given back at once, not held until it expires
