"""Releasing users from backoff and quarantine, and reading one user, on both databases.

Whole cycles run against the reference backend on 127.0.0.1 with a user that always
fails; `retry.release` / `retry.release_quarantined` and `userview.collect` are what
`background-sync retry` and `status --user` call.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select

from daemon import control, retry, schema, userview
from daemon.database import aware
from daemon.models import instances, operations, user_state
from daemon.store import Cursor, new_run_id
from tests.conftest import AppDatabase, ReferenceBackend, SettingsFactory
from tests.integration.test_cycle import run_cycle, synced

OPERATOR = "alice@ops-host"
# No retries inside a call: one failing cycle is one failure of the user.
ENV = {"SYNC_MAX_RETRIES": "0", "SYNC_QUARANTINE_AFTER": "2"}


def _state(app_db: AppDatabase, key: str) -> Any:
    with app_db.db.engine.connect() as conn:
        return conn.execute(select(user_state).where(user_state.c.user_key == key)).first()


def _users(app_db: AppDatabase) -> schema.UsersTable:
    return schema.inspect_users(app_db.db.engine, app_db.settings)


async def _fail_cycles(
    app_db: AppDatabase,
    make_settings: SettingsFactory,
    backend: ReferenceBackend,
    count: int,
    **env: str,
) -> None:
    """`count` cycles, each followed by an hour on the database's clock (the backoff ends,
    a quarantine probe does not)."""
    for _ in range(count):
        await run_cycle(app_db, make_settings, backend.url, **(ENV | env))
        app_db.let_time_pass(3600)


async def test_a_quarantined_user_is_not_claimed_until_retry_then_the_next_cycle_syncs_it(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(3)
    await backend.faults(fail_users=["1"])
    await _fail_cycles(app_db, make_settings, backend, 2)
    assert _state(app_db, "1").consecutive_failures == 2  # quarantined from 2 on

    await backend.faults()  # the backend recovered
    await run_cycle(app_db, make_settings, backend.url, **ENV)
    assert (await backend.stats())["per_user_calls"]["1"] == 2  # not claimed: quarantined
    assert 1 not in synced(app_db)

    asked_at = datetime.now(UTC)
    done = retry.release(
        app_db.db, _users(app_db), make_settings(**ENV), ["1"], by=OPERATOR, now=asked_at
    )
    assert done.released == ("1",)
    row = _state(app_db, "1")
    assert (row.consecutive_failures, row.next_attempt_at) == (0, None)
    assert row.retry_requested_by == OPERATOR
    assert abs(aware(row.retry_requested_at) - asked_at) < timedelta(milliseconds=1)

    report = await run_cycle(app_db, make_settings, backend.url, **ENV)
    assert (report.succeeded, report.failed) == (1, 0)
    assert (await backend.stats())["per_user_calls"]["1"] == 3
    assert 1 in synced(app_db)
    assert _state(app_db, "1").retry_requested_by == OPERATOR  # the record stays


async def test_retry_quarantined_releases_every_quarantined_user_and_only_them(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(4)
    await backend.faults(fail_users=["1", "2"])
    await _fail_cycles(app_db, make_settings, backend, 1)  # 3 and 4 synced
    app_db.set_last_sync(3, datetime.now(UTC) - timedelta(days=1))
    await backend.faults(fail_users=["1", "2", "3"])
    await _fail_cycles(app_db, make_settings, backend, 1)
    before = {k: _state(app_db, k) for k in "1234"}
    assert [before[k].consecutive_failures for k in "1234"] == [2, 2, 1, 0]

    done = retry.release_quarantined(
        app_db.db, make_settings(**ENV), by=OPERATOR, now=datetime.now(UTC)
    )

    assert sorted(done.released) == ["1", "2"]
    assert done.leased == ()
    after = {k: _state(app_db, k) for k in "1234"}
    assert [after[k].consecutive_failures for k in "1234"] == [0, 0, 1, 0]
    assert [after[k].retry_requested_by for k in "1234"] == [OPERATOR, OPERATOR, None, None]
    assert after["1"].next_attempt_at is None
    assert after["3"].next_attempt_at == before["3"].next_attempt_at  # still backing off


async def test_a_user_whose_lease_is_live_is_left_alone_by_retry_and_retry_quarantined(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    env = {"SYNC_QUARANTINE_AFTER": "1", "SYNC_QUARANTINE_PROBE_SECONDS": "60"}
    app_db.seed(2)
    await backend.faults(fail_users=["1", "2"])
    await _fail_cycles(app_db, make_settings, backend, 1, **env)  # probe time passed too
    store = app_db.store(instance="busy-instance", lease_seconds=120)
    now = datetime.now(UTC)
    claims = store.claim(
        Cursor(), 1, run_id=new_run_id(), now=now, stale_before=now - timedelta(hours=1)
    )
    assert [c.key for c in claims] == ["1"]  # being synced right now
    settings = make_settings(**ENV | env)

    named = retry.release(app_db.db, _users(app_db), settings, ["1"], by=OPERATOR, now=now)
    everyone = retry.release_quarantined(app_db.db, settings, by=OPERATOR, now=now)

    assert (named.released, named.leased) == ((), ("1",))
    assert (everyone.released, everyone.leased) == (("2",), ("1",))
    row = _state(app_db, "1")
    assert (row.consecutive_failures, row.retry_requested_by) == (1, None)
    assert row.lease_owner == "busy-instance"


async def test_retry_reports_unknown_ids_and_users_with_nothing_to_release_and_releases_the_rest(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(3)
    await backend.faults(fail_users=["1"])
    await _fail_cycles(app_db, make_settings, backend, 1)
    app_db.seed(4)  # user 4: no state row yet

    done = retry.release(
        app_db.db,
        _users(app_db),
        make_settings(**ENV),
        ["1", "2", "4", "99", "not-a-number", "001"],
        by=OPERATOR,
        now=datetime.now(UTC),
    )

    assert done.released == ("1",)  # "001" is user 1 again
    assert sorted(done.nothing_to_release) == ["2", "4"]
    assert done.unknown == ("99", "not-a-number")
    assert _state(app_db, "2").retry_requested_by is None  # nothing released, nothing recorded


async def test_status_user_shows_since_when_a_user_is_quarantined_and_its_attempts(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    """Quarantined since the failure that reached SYNC_QUARANTINE_AFTER: not the last one,
    and not counting a crashed instance's abandoned claim, which is no failure of the user."""
    env = {"SYNC_QUARANTINE_PROBE_SECONDS": "60"}
    app_db.seed(2)
    await backend.faults(fail_users=["1"])
    await _fail_cycles(app_db, make_settings, backend, 2, **env)  # 2 reached
    now = datetime.now(UTC)
    crashed = app_db.store(instance="crashed-instance", lease_seconds=60)
    crashed.claim(Cursor(), 1, run_id=new_run_id(), now=now, stale_before=now)
    app_db.let_time_pass(120)  # its lease expires; housekeeping files it as abandoned
    assert control.cleanup(app_db.db, now=now, stale_after=timedelta(hours=1)).leases == 1
    await _fail_cycles(app_db, make_settings, backend, 1, **env)  # probed, failed again
    with app_db.db.engine.connect() as conn:
        ops = conn.execute(
            select(operations.c.finished_at, operations.c.run_id)
            .where(operations.c.user_key == "1")
            .order_by(operations.c.finished_at)
        ).all()
    assert [run_id == "cleanup" for _, run_id in ops] == [False, False, True, False]
    ended = [aware(finished) for finished, run_id in ops if run_id != "cleanup"]

    data = userview.collect(
        app_db.db, _users(app_db), make_settings(**ENV | env), "1", now=datetime.now(UTC)
    )

    assert (data["state"], data["consecutive_failures"], data["quarantined"]) == (
        "quarantined",
        3,
        True,
    )
    assert data["quarantined_since"] == ended[1].isoformat()
    assert [a["outcome"] for a in data["attempts"]] == ["failed"] * 4
    assert [a["http_status"] for a in data["attempts"]] == [500, None, 500, 500]
    assert data["attempts"][0]["finished_at"] == ended[2].isoformat()  # newest first
    assert data["lease"] is None and data["retry_requested_by"] is None
    assert data["next_attempt_in_s"] is not None and data["next_attempt_in_s"] < 0  # probe due
    fresh = userview.collect(
        app_db.db, _users(app_db), make_settings(**ENV), "2", now=datetime.now(UTC)
    )
    assert (fresh["state"], fresh["consecutive_failures"]) == ("fresh", 0)
    assert [a["outcome"] for a in fresh["attempts"]] == ["success"]


async def test_status_user_of_an_id_not_in_the_users_table_says_so(
    app_db: AppDatabase, make_settings: SettingsFactory
) -> None:
    app_db.seed(1)
    data = userview.collect(app_db.db, _users(app_db), make_settings(), "42", now=datetime.now(UTC))
    assert (data["in_users_table"], data["state"], data["attempts"]) == (False, "unknown", [])


async def test_a_user_is_judged_by_the_thresholds_the_running_instance_recorded(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    """The daemon quarantines from 2 on; a shell whose environment says 10 still sees it."""
    app_db.seed(1)
    await backend.faults(fail_users=["1"])
    await _fail_cycles(app_db, make_settings, backend, 2)
    now = datetime.now(UTC)
    with app_db.db.engine.begin() as conn:
        conn.execute(
            insert(instances).values(
                instance="web1:4242:1a2b3c",
                started_at=now,
                heartbeat_at=now,
                state="idle",
                circuit="closed",
                settings=json.dumps({"quarantine_after": 2, "stale_after_seconds": 3600}),
            )
        )
    shell = make_settings(SYNC_QUARANTINE_AFTER="10")

    data = userview.collect(app_db.db, _users(app_db), shell, "1", now=now)
    done = retry.release_quarantined(app_db.db, shell, by=OPERATOR, now=now)

    assert (data["state"], data["thresholds"]["source"]) == (
        "quarantined",
        "instance web1:4242:1a2b3c",
    )
    assert (done.released, done.quarantine_after) == (("1",), 2)
