"""`background-sync status --user ID`: one user's story, read from the database.

What an operator asks about a user who "never syncs": is it due, backing off, quarantined
or being called right now (and by whom, until when), when was it last synced, what did
the last attempts answer, when is the next one, since when is it quarantined, and did
someone already ask for a retry. Reads only; works whether or not a daemon is running.

Lease expiry and the next attempt are judged on the database's clock (they were written
with it, `daemon.dbclock`); last_sync and the operations are dated by the instances'
own clocks and are read against the caller's.

Quarantine is not a stored flag: a user is quarantined while consecutive_failures is at
or above SYNC_QUARANTINE_AFTER. When it got there is derived from the operations
history rather than recorded: each failure counted in consecutive_failures is exactly
one `failed` operation (the cleanup's "abandoned" records are not counted, and a
success or a `retry` resets the count), so of the N newest counted failures the
(N - SYNC_QUARANTINE_AFTER + 1)-th is the one that crossed the threshold. That needs no
schema change and no extra write on the daemon's hot path; once the history is pruned
(SYNC_HISTORY_DAYS) the moment is only known to be earlier than what is kept.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import String, cast, desc, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from daemon import ages, dbclock
from daemon.database import Database, aware
from daemon.models import instances, operations, user_state
from daemon.schema import IdKind, Storage, UsersTable
from daemon.settings import Settings

RECENT_ATTEMPTS = 10
# Operations `cleanup` files for an expired lease: they never count as a user's failure.
CLEANUP_RUN_ID = "cleanup"


class State(enum.StrEnum):
    """What the daemon would do with the user now; decided by `state_of` only."""

    UNKNOWN = "unknown"  # not in the users table
    LEASED = "leased"  # an instance is calling it right now
    QUARANTINED = "quarantined"
    BACKOFF = "backoff"
    DUE = "due"  # the next cycle claims it
    FRESH = "fresh"  # synced within SYNC_STALE_AFTER_SECONDS: not due yet


def state_of(
    *,
    in_users_table: bool,
    lease_live: bool,
    failures: int,
    quarantine_after: int,
    backing_off: bool,
    stale: bool,
) -> State:
    """One decision from the facts, in the order the daemon's claim applies them."""
    if not in_users_table:
        return State.UNKNOWN
    if lease_live:
        return State.LEASED
    if quarantine_after and failures >= quarantine_after:
        return State.QUARANTINED
    if backing_off:
        return State.BACKOFF
    return State.DUE if stale else State.FRESH


@dataclass(frozen=True)
class Thresholds:
    """The thresholds a user is judged by, and where they came from."""

    stale_after_seconds: float
    quarantine_after: int
    source: str


def thresholds(session: Session, settings: Settings) -> Thresholds:
    """Those of the most recently seen instance that recorded them, else this shell's.

    The running daemon decides due and quarantine by its own settings; a shell with
    another environment must not make a user look quarantined that the daemon calls.
    """
    rows = session.execute(
        select(instances.c.instance, instances.c.settings)
        .where(instances.c.settings.is_not(None))
        .order_by(desc(instances.c.heartbeat_at))
        .limit(1)
    ).all()
    stale, quarantine = settings.stale_after_seconds, settings.quarantine_after
    for name, text in rows:
        try:
            recorded = json.loads(text)
            stale = float(recorded.get("stale_after_seconds", stale))
            quarantine = int(recorded.get("quarantine_after", quarantine))
        except (ValueError, TypeError, AttributeError):
            break  # unreadable: judge by this shell's settings
        return Thresholds(stale, quarantine, f"instance {name}")
    return Thresholds(stale, quarantine, "this shell's environment")


def user_key(users: UsersTable, given: str) -> str:
    """The state table's key for an id typed on the command line ("007" is user 7)."""
    if users.id_kind is IdKind.NUMBER:
        try:
            return str(int(given))
        except ValueError:
            return given
    return given


def _users_row(session: Session, users: UsersTable, key: str, stale_before: datetime) -> Any:
    """(last_sync as stored, stale?) of the user, or None when it is not in the table."""
    table = users.table
    id_col = table.c[users.id_column]
    last_sync = table.c[users.last_sync_column]
    naive = not getattr(last_sync.type, "timezone", False)
    threshold = stale_before.replace(tzinfo=None) if naive else stale_before
    stale = or_(last_sync.is_(None), last_sync < threshold)
    query = select(last_sync, stale)
    if users.id_kind is IdKind.NUMBER:
        try:
            query = query.where(id_col == int(key))  # uses the primary key's index
        except ValueError:
            return None
    else:
        query = query.where(cast(id_col, String) == key)
    return session.execute(query.limit(1)).first()


def collect(
    db: Database, users: UsersTable, settings: Settings, given: str, *, now: datetime
) -> dict[str, Any]:
    """Everything `status --user` shows, as plain data (the `--json` form)."""
    key = user_key(users, given)
    s = user_state.c

    def unit(session: Session) -> dict[str, Any]:
        limits = thresholds(session, settings)
        db_now = aware(session.execute(select(dbclock.now(db.dialect))).scalar_one())
        assert db_now is not None
        row = _users_row(session, users, key, now - timedelta(seconds=limits.stale_after_seconds))
        state = session.execute(select(user_state).where(s.user_key == key)).first()
        attempts = _attempts(session, key)
        since = None
        failures = state.consecutive_failures if state else 0
        if limits.quarantine_after and failures >= limits.quarantine_after:
            since = _quarantined_since(session, key, failures, limits.quarantine_after)
        return _assemble(key, users, row, state, attempts, since, limits, now=now, db_now=db_now)

    data = db.transaction(unit, name="status_user")
    data["database"] = make_url(settings.database_url).render_as_string(hide_password=True)
    return data


def _attempts(session: Session, key: str) -> list[dict[str, Any]]:
    o = operations.c
    rows = session.execute(
        select(operations)
        .where(o.user_key == key)
        .order_by(desc(o.started_at), desc(o.finished_at))
        .limit(RECENT_ATTEMPTS)
    )
    return [
        {
            "started_at": _iso(r.started_at),
            "finished_at": _iso(r.finished_at),
            "outcome": r.outcome or "running",
            "http_status": r.http_status,
            "attempts": r.attempts,
            "error": r.error,
            "duration_ms": r.duration_ms,
            "run_id": r.run_id,
            "instance": r.instance,
        }
        for r in rows
    ]


def _quarantined_since(session: Session, key: str, failures: int, after: int) -> datetime | None:
    """When the failure that reached `after` in a row was recorded (None: pruned since)."""
    o = operations.c
    moment = session.execute(
        select(o.finished_at)
        .where(o.user_key == key, o.outcome == "failed", o.run_id != CLEANUP_RUN_ID)
        .order_by(desc(o.finished_at), desc(o.id))
        .offset(failures - after)
        .limit(1)
    ).scalar()
    return aware(moment)


def _assemble(
    key: str,
    users: UsersTable,
    row: Any,
    state: Any,
    attempts: list[dict[str, Any]],
    since: datetime | None,
    limits: Thresholds,
    *,
    now: datetime,
    db_now: datetime,
) -> dict[str, Any]:
    last_sync = _as_time(row[0], users.storage) if row is not None else None
    expires = aware(state.lease_expires_at) if state else None
    lease_live = bool(state and state.lease_owner and expires and expires >= db_now)
    next_at = aware(state.next_attempt_at) if state else None
    failures = state.consecutive_failures if state else 0
    quarantined = bool(limits.quarantine_after and failures >= limits.quarantine_after)
    decided = state_of(
        in_users_table=row is not None,
        lease_live=lease_live,
        failures=failures,
        quarantine_after=limits.quarantine_after,
        backing_off=next_at is not None and next_at > db_now,
        stale=bool(row[1]) if row is not None else False,
    )
    due_at = last_sync + timedelta(seconds=limits.stale_after_seconds) if last_sync else None
    return {
        "user_id": key,
        "in_users_table": row is not None,
        "state": decided.value,
        "last_sync": _iso(last_sync),
        "last_sync_age_s": _seconds(now - last_sync) if last_sync else None,
        "due_at": _iso(due_at),
        "lease": None
        if not (state and state.lease_owner)
        else {
            "instance": state.lease_owner,
            "expires_at": _iso(expires),
            "expires_in_s": _seconds(expires - db_now) if expires else None,
            "live": lease_live,
        },
        "consecutive_failures": failures,
        "quarantined": quarantined,
        "quarantined_since": _iso(since) if quarantined else None,
        "next_attempt_at": _iso(next_at),
        "next_attempt_in_s": _seconds(next_at - db_now) if next_at else None,
        "last_attempt_at": _iso(state.last_attempt_at) if state else None,
        "last_success_at": _iso(state.last_success_at) if state else None,
        "last_status": state.last_status if state else None,
        "last_error": state.last_error if state else None,
        "retry_requested_by": state.retry_requested_by if state else None,
        "retry_requested_at": _iso(state.retry_requested_at) if state else None,
        "attempts": attempts,
        "thresholds": {
            "stale_after_seconds": limits.stale_after_seconds,
            "quarantine_after": limits.quarantine_after,
            "source": limits.source,
        },
        "measured_at": now.isoformat(),
        "database_now": db_now.isoformat(),
    }


def _as_time(value: Any, storage: Storage) -> datetime | None:
    """last_sync as stored (a timestamp, text, or unix seconds or milliseconds) in UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return aware(value)
    if isinstance(value, int | float):
        seconds = value / 1000 if storage is Storage.UNIX_MILLISECONDS else value
        return datetime.fromtimestamp(seconds, UTC)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return aware(parsed)


def _seconds(delta: timedelta) -> float:
    return round(delta.total_seconds(), 1)


def _iso(value: datetime | None) -> str | None:
    value = aware(value)
    return value.isoformat() if value else None


# -- the screen ---------------------------------------------------------------------------


def _when(text: str | None, now: datetime) -> str:
    """ "2026-12-01 12:40:03 UTC (3 min ago)": whole seconds, and how long ago or ahead."""
    moment = aware(datetime.fromisoformat(text)) if text else None
    if moment is None:
        return "never"
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({ages.ago(moment, now)})"


def _in(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"in {ages.span(seconds)}" if seconds > 0 else f"{ages.span(-seconds)} ago"


def _headline(data: dict[str, Any], now: datetime) -> str:
    state = State(data["state"])
    failures = data["consecutive_failures"]
    limit = data["thresholds"]["quarantine_after"]
    if state is State.UNKNOWN:
        return "NOT IN THE USERS TABLE"
    if state is State.LEASED:
        lease = data["lease"]
        return (
            f"being synced: leased by {lease['instance']} until {_when(lease['expires_at'], now)}"
        )
    if state is State.QUARANTINED:
        since = data["quarantined_since"]
        when = _when(since, now) if since else "before the oldest operation kept"
        return f"QUARANTINED since {when}: {failures} failures in a row (from {limit} on)"
    if state is State.BACKOFF:
        wait = _in(data["next_attempt_in_s"])
        return f"in backoff after {failures} failure(s) in a row, next attempt {wait}"
    if state is State.DUE:
        again = f" (retrying after {failures} failure(s))" if failures else ""
        return f"due: the next cycle claims it{again}"
    due = aware(datetime.fromisoformat(data["due_at"])) if data["due_at"] else None
    return f"fresh: due again {ages.ago(due, now)}"


def render(data: dict[str, Any], *, now: datetime) -> str:
    """The human form of `status --user ID`."""
    lines = [f"user {data['user_id']}: {_headline(data, now)}"]
    limits = data["thresholds"]
    lines.append(f"  database: {data['database']}")
    lines.append(
        f"  judged by: due after {ages.span(limits['stale_after_seconds'])}, quarantined from "
        f"{limits['quarantine_after']} failures in a row ({limits['source']})"
    )
    if not data["in_users_table"] and data["lease"] is None and not data["attempts"]:
        return "\n".join(lines[:2])  # nothing at all is known of this id
    lines.append(f"  last sync: {_when(data['last_sync'], now)}")
    lease = data["lease"]
    if lease is None:
        lines.append("  lease: none")
    else:
        ends = _in(lease["expires_in_s"])
        held = f"held, expires {ends}" if lease["live"] else f"expired {ends}"
        lines.append(f"  lease: {lease['instance']}, {held}")
    lines.append(f"  consecutive failures: {data['consecutive_failures']}")
    wait = data["next_attempt_in_s"]
    if wait is not None:
        lines.append(
            f"  next attempt: {_in(wait)}" if wait > 0 else "  next attempt: at the next cycle"
        )
    if data["last_error"] or data["last_status"]:
        answer = f"{data['last_status'] or '-'}: {data['last_error'] or 'ok'}"
        lines.append(f"  last answer: {answer}")
    if data["retry_requested_by"]:
        lines.append(
            f"  retry requested by {data['retry_requested_by']} "
            f"{_when(data['retry_requested_at'], now)}"
        )
    else:
        lines.append("  retry requested: never")
    lines.append(f"  last attempts (newest first, up to {RECENT_ATTEMPTS}):")
    if not data["attempts"]:
        lines.append("    (none recorded)")
        return "\n".join(lines)
    lines.append(
        f"    {'started (UTC)':<19}  {'outcome':<10}  {'HTTP':>4}  {'tries':>5}  "
        f"{'took':>8}  {'run':<8}  instance"
    )
    for a in data["attempts"]:
        started = aware(datetime.fromisoformat(a["started_at"]))
        assert started is not None
        took = "-" if a["duration_ms"] is None else f"{a['duration_ms']} ms"
        lines.append(
            f"    {started.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {a['outcome']:<10}  "
            f"{a['http_status'] or '-':>4}  {a['attempts']:>5}  {took:>8}  "
            f"{a['run_id'][:8]:<8}  {a['instance']}"
        )
        if a["error"]:
            lines.append(f"    {'':<19}  {a['error']}")
    return "\n".join(lines)
