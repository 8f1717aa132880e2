"""`background-sync status`: what it is doing, what failed, since when, from the database.

Reads only; works whether or not a daemon is running, and shows every instance that
shares the database, not just the local one.

How long ago an instance was seen is measured on the database's clock, the one its
heartbeat was written with, so a host whose clock is off still reads true ages. An
instance silent past `control.LOST_AFTER_SECONDS` that did not say it stopped is shown
as lost: its last state ("idle", "syncing 190 of 295") is what it was doing when it died.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import desc, func, select
from sqlalchemy.orm import Session

from daemon import control, dbclock
from daemon.database import Database, aware
from daemon.models import instances, runs, user_state
from daemon.settings import Settings
from daemon.store import Store

RECENT_RUNS = 10
FAILING_USERS = 20


def collect(db: Database, store: Store, settings: Settings, *, now: datetime) -> dict[str, Any]:
    stale_before = now - timedelta(seconds=settings.stale_after_seconds)

    def unit(session: Session) -> dict[str, Any]:
        switches = control.read_in(session)
        return {
            "paused": switches.paused,
            "paused_by": switches.updated_by if switches.paused else None,
            "paused_at": _iso(switches.paused_at),
            "instances": _instances(session, db.dialect),
            "quarantined_users": session.execute(
                select(func.count()).where(
                    user_state.c.consecutive_failures >= settings.quarantine_after
                )
            ).scalar_one(),
            "recent_runs": _recent_runs(session),
            "leases": _leases(session),
            "failing_users": _failing_users(session),
            "users_in_flight": session.execute(
                select(func.count()).where(
                    user_state.c.lease_owner.is_not(None),
                    user_state.c.lease_expires_at >= dbclock.now(db.dialect),
                )
            ).scalar_one(),
        }

    result = db.transaction(unit, name="status")
    result["due_users"] = store.count_due(now=now, stale_before=stale_before)
    result["generated_at"] = now.isoformat()
    return result


def _instances(session: Session, dialect: str) -> list[dict[str, Any]]:
    """Every instance row, with its age and its liveness: `state` is "lost" for one that
    went silent without stopping; `last_state` is what it last reported."""
    db_now = aware(session.execute(select(dbclock.now(dialect))).scalar_one())
    assert db_now is not None
    rows = session.execute(select(instances).order_by(instances.c.started_at))
    found = []
    for r in rows:
        heartbeat = aware(r.heartbeat_at)
        seen = max(0.0, (db_now - heartbeat).total_seconds()) if heartbeat else None
        lost = r.state != control.STOPPED and (seen is None or seen > control.LOST_AFTER_SECONDS)
        found.append(
            {
                "instance": r.instance,
                "state": "lost" if lost else r.state,
                "last_state": r.state,
                "lost": lost,
                "seen_seconds_ago": None if seen is None else round(seen, 1),
                "circuit": r.circuit,
                "status": r.status,
                "started_at": _iso(r.started_at),
                "heartbeat_at": _iso(r.heartbeat_at),
                "version": r.version,
            }
        )
    return found


def _recent_runs(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(select(runs).order_by(desc(runs.c.started_at)).limit(RECENT_RUNS))
    return [
        {
            "run_id": r.id,
            "instance": r.instance,
            "started_at": _iso(r.started_at),
            "finished_at": _iso(r.finished_at),
            "outcome": r.outcome,
            "claimed": r.claimed,
            "succeeded": r.succeeded,
            "failed": r.failed,
            "skipped": r.skipped,
            "error": r.error,
        }
        for r in rows
    ]


def _leases(session: Session) -> list[dict[str, Any]]:
    """Live leases, judged on the database's clock like the claims themselves."""
    s = user_state.c
    live = s.lease_expires_at >= dbclock.now(session.get_bind().dialect.name)
    rows = session.execute(
        select(s.lease_owner, func.count(), func.max(s.lease_expires_at))
        .where(s.lease_owner.is_not(None), live)
        .group_by(s.lease_owner)
    )
    return [
        {"instance": owner, "leases": count, "latest_expiry": _iso(latest)}
        for owner, count, latest in rows
    ]


def _failing_users(session: Session) -> list[dict[str, Any]]:
    s = user_state.c
    rows = session.execute(
        select(s.user_key, s.consecutive_failures, s.last_status, s.last_error, s.next_attempt_at)
        .where(s.consecutive_failures > 0)
        .order_by(desc(s.consecutive_failures), s.user_key)
        .limit(FAILING_USERS)
    )
    return [
        {
            "user_id": key,
            "consecutive_failures": failures,
            "last_status": status,
            "last_error": error,
            "next_attempt_at": _iso(next_at),
        }
        for key, failures, status, error, next_at in rows
    ]


def pause_text(switches: control.Control) -> str:
    """ "paused by who since when": the one wording of STATUS=, `once` and `force`."""
    since = aware(switches.paused_at)
    when = f" since {since.astimezone(UTC):%Y-%m-%d %H:%M} UTC" if since else ""
    return f"paused by {switches.updated_by or 'an operator'}{when}"


def _iso(value: datetime | None) -> str | None:
    value = aware(value)
    return value.isoformat() if value else None


def _age(seconds: float | None) -> str:
    """A duration an operator reads at a glance: 5 s, 3 min, 2 h, 4 d."""
    if seconds is None:
        return "ever"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _instance_line(inst: dict[str, Any]) -> str:
    age = _age(inst["seen_seconds_ago"])
    if inst["last_state"] == control.STOPPED:
        return f"stopped {age} ago"
    if inst["lost"]:
        return (
            f"LOST: silent for {age} (over {control.LOST_AFTER_SECONDS:g} s), "
            f"last said {inst['last_state']}: {inst['status']}"
        )
    return f"{inst['state']}, circuit {inst['circuit']}, seen {age} ago: {inst['status']}"


def render(data: dict[str, Any]) -> str:
    """The human form of `status`."""
    lines = []
    if data["paused"]:
        lines.append(f"PAUSED by {data['paused_by']} since {data['paused_at']}")
    lines.append(f"due users: {data['due_users']}")
    lines.append(f"quarantined users: {data['quarantined_users']}")
    lines.append("instances:")
    if not data["instances"]:
        lines.append("  (none running)")
    lines += [f"  {inst['instance']}: {_instance_line(inst)}" for inst in data["instances"]]
    lines.append(f"users in flight: {data['users_in_flight']}")
    if data["leases"]:
        lines.append("leases held:")
        lines += [f"  {lease['instance']}: {lease['leases']}" for lease in data["leases"]]
    lines.append("recent runs:")
    if not data["recent_runs"]:
        lines.append("  (none yet)")
    for run in data["recent_runs"]:
        lines.append(
            f"  {run['started_at']}  {run['outcome']:<11} claimed={run['claimed']} "
            f"ok={run['succeeded']} failed={run['failed']} skipped={run['skipped']}  "
            f"{run['instance']}"
        )
    if data["failing_users"]:
        lines.append("failing users:")
        for user in data["failing_users"]:
            lines.append(
                f"  {user['user_id']}: {user['consecutive_failures']} in a row, "
                f"last {user['last_status'] or '-'} {user['last_error'] or ''}".rstrip()
            )
    return "\n".join(lines)
