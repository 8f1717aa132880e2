"""`background-sync status`: what it is doing, what failed, since when, from the database.

Reads only; works whether or not a daemon is running, and shows every instance that
shares the database, not just the local one.
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
            "instances": _instances(session),
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


def _instances(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(select(instances).order_by(instances.c.started_at))
    return [
        {
            "instance": r.instance,
            "state": r.state,
            "circuit": r.circuit,
            "status": r.status,
            "started_at": _iso(r.started_at),
            "heartbeat_at": _iso(r.heartbeat_at),
            "version": r.version,
        }
        for r in rows
    ]


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
    for inst in data["instances"]:
        lines.append(
            f"  {inst['instance']}: {inst['state']}, circuit {inst['circuit']}, "
            f"last seen {inst['heartbeat_at']}: {inst['status']}"
        )
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
