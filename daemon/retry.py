"""`background-sync retry`: release users from their backoff or quarantine, on record.

A quarantined user is only probed every SYNC_QUARANTINE_PROBE_SECONDS (a day by
default), so after the backend recovers it would stay unsynced for up to that long.
Releasing it sets consecutive_failures to 0 and next_attempt_at to NULL: the claim's
eligibility test (lease free, no backoff pending) then passes, and the next cycle takes
the user if its last_sync is stale, like any other due user. Who asked and when is kept
in the user's state row (retry_requested_by / retry_requested_at) for `status --user`.

A user whose lease is live is never touched: an instance is calling it right now, and
the outcome it is about to record decides its history. Whether a lease is live is judged
on the database's clock, as the claims judge it; the rows are locked while they are
judged and written (PostgreSQL `FOR UPDATE`, SQLite's `BEGIN IMMEDIATE`), so no claim
slips in between.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, and_, cast, or_, select, update
from sqlalchemy.orm import Session

from daemon import dbclock, userview
from daemon.database import Database
from daemon.models import user_state
from daemon.schema import IdKind, UsersTable
from daemon.settings import Settings

# Keys per statement: well under SQLite's bound-parameter limit.
CHUNK = 500


@dataclass(frozen=True)
class Retried:
    """What a `retry` did, user by user (keys as the state table holds them)."""

    released: tuple[str, ...] = ()  # backoff or quarantine cleared
    nothing_to_release: tuple[str, ...] = ()  # known, but neither failing nor backing off
    leased: tuple[str, ...] = ()  # a live lease: left alone
    unknown: tuple[str, ...] = ()  # not in the users table
    quarantine_after: int = 0


def release(
    db: Database,
    users: UsersTable,
    settings: Settings,
    given: Sequence[str],
    *,
    by: str,
    now: datetime,
) -> Retried:
    """Release the named users; unknown and leased ones are reported, not an error."""
    keys = list(dict.fromkeys(userview.user_key(users, g) for g in given))

    def unit(session: Session) -> Retried:
        limit = userview.thresholds(session, settings).quarantine_after
        known = _in_users_table(session, users, keys)
        rows = _lock_states(session, db.dialect, [k for k in keys if k in known])
        free = [k for k, (live, _) in rows.items() if not live]
        holding = {k for k, (live, held) in rows.items() if not live and held}
        released = _clear(session, db.dialect, [k for k in free if k in holding], by, now)
        return Retried(
            released=tuple(k for k in keys if k in released),
            nothing_to_release=tuple(k for k in keys if k in known and k not in rows)
            + tuple(k for k in free if k not in holding),
            leased=tuple(k for k, (live, _) in rows.items() if live),
            unknown=tuple(k for k in keys if k not in known),
            quarantine_after=limit,
        )

    return db.transaction(unit, name="retry")


def release_quarantined(db: Database, settings: Settings, *, by: str, now: datetime) -> Retried:
    """Release every quarantined user (consecutive failures at the daemon's threshold)."""

    def unit(session: Session) -> Retried:
        limit = userview.thresholds(session, settings).quarantine_after
        if limit <= 0:
            return Retried(quarantine_after=limit)
        s = user_state.c
        rows = _locked(
            session,
            db.dialect,
            select(s.user_key, _live(db.dialect)).where(s.consecutive_failures >= limit),
        )
        free = [key for key, live in rows if not live]
        released = _clear(session, db.dialect, free, by, now)
        return Retried(
            released=tuple(k for k in free if k in released),
            leased=tuple(key for key, live in rows if live),
            quarantine_after=limit,
        )

    return db.transaction(unit, name="retry_quarantined")


def report(done: Retried, *, quarantined: bool, now: bool, forced: bool) -> list[str]:
    """What `retry` prints: who was released, and who was not and why."""
    shown = 20
    names = ", ".join(done.released[:shown]) + (" ..." if len(done.released) > shown else "")
    lines = []
    if quarantined and not done.released and not done.leased:
        lines.append(f"no quarantined users ({done.quarantine_after} failures in a row or more)")
    else:
        what = "quarantined user(s)" if quarantined else "user(s)"
        lines.append(f"released {len(done.released)} {what}" + (f": {names}" if names else ""))
    if done.nothing_to_release:
        lines.append(f"nothing to release (not failing): {', '.join(done.nothing_to_release)}")
    if done.leased:
        lines.append(
            f"left alone, being synced right now (live lease): {', '.join(done.leased)}; "
            "that call decides, retry again if it fails"
        )
    if done.unknown:
        lines.append(f"not in the users table: {', '.join(done.unknown)}")
    if forced:
        lines.append("cycle requested: every running instance starts one within a few seconds")
    elif done.released and not now:
        lines.append(
            "they are claimed at the next cycle if their last_sync is stale (--now: at once)"
        )
    return lines


def _live(dialect: str) -> Any:
    """Whether the row's lease is held and not expired, on the database's clock."""
    s = user_state.c
    return and_(
        s.lease_owner.is_not(None),
        s.lease_expires_at.is_not(None),
        s.lease_expires_at >= dbclock.now(dialect),
    )


def _locked(session: Session, dialect: str, query: Any) -> list[Any]:
    # PostgreSQL: hold the rows until the update, so a claim cannot win one in between.
    if dialect == "postgresql":
        query = query.with_for_update(of=user_state)
    return list(session.execute(query).all())


def _in_users_table(session: Session, users: UsersTable, keys: Sequence[str]) -> set[str]:
    id_col = users.table.c[users.id_column]
    found: set[str] = set()
    for part in _chunks(keys):
        if users.id_kind is IdKind.NUMBER:
            numbers = [int(k) for k in part if _is_int(k)]
            if not numbers:
                continue
            query = select(cast(id_col, String)).where(id_col.in_(numbers))
        else:
            query = select(cast(id_col, String)).where(cast(id_col, String).in_(list(part)))
        found.update(str(k) for k in session.scalars(query))
    return found


def _lock_states(
    session: Session, dialect: str, keys: Sequence[str]
) -> dict[str, tuple[bool, bool]]:
    """key -> (lease live, anything to release) for the users that have a state row."""
    s = user_state.c
    holds = or_(s.consecutive_failures > 0, s.next_attempt_at.is_not(None))
    found: dict[str, tuple[bool, bool]] = {}
    for part in _chunks(keys):
        query = select(s.user_key, _live(dialect), holds).where(s.user_key.in_(list(part)))
        for key, live, held in _locked(session, dialect, query):
            found[key] = (bool(live), bool(held))
    return found


def _clear(session: Session, dialect: str, keys: Sequence[str], by: str, now: datetime) -> set[str]:
    """Reset the failure history of these users; the lease test is repeated in the write."""
    s = user_state.c
    done: set[str] = set()
    for part in _chunks(keys):
        written = session.execute(
            update(user_state)
            .where(s.user_key.in_(list(part)), ~_live(dialect))
            .values(
                consecutive_failures=0,
                next_attempt_at=None,
                retry_requested_by=by[:128],
                retry_requested_at=now,
            )
        ).rowcount  # type: ignore[attr-defined]
        if written == len(part):
            done.update(part)
        else:  # a lease became live between the look and the write (it cannot, locked)
            done.update(
                session.scalars(
                    select(s.user_key).where(
                        s.user_key.in_(list(part)), s.retry_requested_at == now
                    )
                )
            )
    return done


def _chunks(keys: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(keys), CHUNK):
        yield keys[start : start + CHUNK]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
