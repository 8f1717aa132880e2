"""`background-sync status`: what it is doing, what failed and why, since when, what next.

Reads only; works whether or not a daemon is running, and shows every instance that
shares the database, not just the local one.

How long ago an instance was seen is measured on the database's clock, the one its
heartbeat was written with, so a host whose clock is off still reads true ages. An
instance silent past `control.LOST_AFTER_SECONDS` that did not say it stopped is shown
as lost: its last state ("idle", "syncing 190 of 295") is what it was doing when it died.

Due and quarantined users are judged with the thresholds the newest live instance
recorded in its row (daemon.thresholds), not with the caller's environment, which may
say nothing of the daemon's settings; only with no instance running are this
environment's used, and the screen says which.

`collect()` gathers the facts (the `--json` form, with full ISO times); `verdict()`
decides the exit status; daemon.screen renders the human form (relative ages).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, cast, desc, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from daemon import control, dbclock, thresholds
from daemon.database import Database, aware
from daemon.models import instances, runs, user_state
from daemon.schema import IdKind
from daemon.settings import Settings
from daemon.store import Store

RECENT_RUNS = 10
FAILING_USERS = 20

# Exit statuses of `status`, one per state, so that scripts and monitoring can act on
# them. With several instances the worst state wins, in the order of STATES. 2 is left
# to argparse (bad arguments, as for every command), so a typo never reads "degraded";
# 3 is "paused", as for `once` and `force`.
EXIT_HEALTHY = 0
EXIT_WARNING = 1
EXIT_PAUSED = 3
EXIT_DEGRADED = 4
EXIT_UNHEALTHY = 5
EXIT_NOT_RUNNING = 6
# state -> exit status, from best to worst
STATES = {
    "healthy": EXIT_HEALTHY,
    "warning": EXIT_WARNING,
    "paused": EXIT_PAUSED,
    "degraded": EXIT_DEGRADED,
    "unhealthy": EXIT_UNHEALTHY,
    "lost": EXIT_UNHEALTHY,
    "not running": EXIT_NOT_RUNNING,
}


@dataclass(frozen=True)
class Verdict:
    state: str
    exit_status: int
    reasons: tuple[str, ...]


def collect(db: Database, store: Store, settings: Settings, *, now: datetime) -> dict[str, Any]:
    """Everything `status` shows, with full ISO times (the `--json` form).

    `now` is the caller's clock: it dates the screen and measures a running cycle's
    elapsed time against its start (written on the instance's clock). Ages of
    heartbeats, leases and next attempts are the database's clock.
    """

    def unit(session: Session) -> dict[str, Any]:
        db_now = aware(session.execute(select(dbclock.now(db.dialect))).scalar_one())
        assert db_now is not None
        switches = control.read_in(session)
        found = _instances(session, db_now)
        judge = _judge(found, settings)
        quarantine_after = int(thresholds.number(judge["values"], "quarantine_after", 0))
        return {
            "db_now": db_now,
            "paused": switches.paused,
            "paused_by": switches.updated_by if switches.paused else None,
            "paused_at": _iso(switches.paused_at),
            "instances": found,
            "thresholds": judge,
            "quarantined_users": session.execute(
                select(func.count()).where(user_state.c.consecutive_failures >= quarantine_after)
            ).scalar_one(),
            "running": _running(session, found, now=now, db_now=db_now),
            "recent_runs": _recent_runs(session, now),
            "leases": _leases(session),
            **_failing(session, store, db_now, quarantine_after),
            "users_claimed": session.execute(
                select(func.count()).where(
                    user_state.c.lease_owner.is_not(None),
                    user_state.c.lease_expires_at >= dbclock.now(db.dialect),
                )
            ).scalar_one(),
        }

    result = db.transaction(unit, name="status")
    db_now = result.pop("db_now")
    stale_after = thresholds.number(
        result["thresholds"]["values"], "stale_after_seconds", settings.stale_after_seconds
    )
    result["due_users"] = store.count_due(
        now=now, stale_before=now - timedelta(seconds=stale_after)
    )
    result["database"] = {
        "url": make_url(settings.database_url).render_as_string(hide_password=True),
        "dialect": db.dialect,
        "users_table": store.users.qualified_name,
    }
    result["freshness"] = _freshness(store, result["thresholds"]["values"], settings, now)
    result["next"] = _next(result, db_now)
    result["generated_at"] = now.isoformat()
    result["database_now"] = db_now.isoformat()
    found = verdict(result)
    result["verdict"] = {
        "state": found.state,
        "exit_status": found.exit_status,
        "reasons": list(found.reasons),
    }
    return result


def _freshness(
    store: Store, values: dict[str, Any], settings: Settings, now: datetime
) -> dict[str, Any]:
    """The headline, measured now with the thresholds `status` judges by.

    An instance's recorded target is used as it is; without one, the default target
    (stale after + interval) is built from the same instance's values.
    """
    stale = thresholds.number(values, "stale_after_seconds", settings.stale_after_seconds)
    interval = thresholds.number(values, "interval_seconds", settings.interval_seconds)
    found = store.freshness(
        target_s=thresholds.number(values, "freshness_target_seconds", stale + interval),
        objective=thresholds.number(values, "freshness_objective", settings.freshness_objective),
        quarantine_after=int(
            thresholds.number(values, "quarantine_after", settings.quarantine_after)
        ),
        now=now,
    )
    return found.as_dict()


def _instances(session: Session, db_now: datetime) -> list[dict[str, Any]]:
    """Every instance row, with its age and its liveness: `state` is "lost" for one that
    went silent without stopping; `last_state` is what it last reported."""
    rows = session.execute(select(instances).order_by(instances.c.started_at))
    found = []
    for r in rows:
        heartbeat = aware(r.heartbeat_at)
        seen = max(0.0, (db_now - heartbeat).total_seconds()) if heartbeat else None
        lost = r.state != control.STOPPED and (seen is None or seen > control.LOST_AFTER_SECONDS)
        recorded = thresholds.load(r.settings)
        # The seconds in `live` count from the write that stored them, which is older
        # than the heartbeat when the text has not changed since (daemon.thresholds).
        since = thresholds.recorded_at(recorded) or heartbeat
        live = recorded.pop("live", None)
        live = live if isinstance(live, dict) else {}
        found.append(
            {
                "instance": r.instance,
                "state": "lost" if lost else r.state,
                "last_state": r.state,
                "lost": lost,
                "live": not lost and r.state != control.STOPPED,
                "health": r.health,
                "seen_seconds_ago": None if seen is None else round(seen, 1),
                "circuit": r.circuit,
                "status": r.status,
                "started_at": _iso(r.started_at),
                "heartbeat_at": _iso(r.heartbeat_at),
                "version": r.version,
                "settings": recorded,
                "health_reasons": [str(r) for r in live.get("health_reasons") or []],
                "in_flight": live.get("in_flight"),
                "concurrency": live.get("concurrency")
                if isinstance(live.get("concurrency"), dict)
                else None,
                "run_id": live.get("run_id"),
                "next_cycle_at": _after(since, live.get("next_cycle_in_s")),
                "next_probe_at": _after(since, live.get("probe_in_s")),
            }
        )
    return found


def _judge(found: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """The thresholds `status` judges by: the newest live instance's, else this shell's."""
    live = [i for i in found if i["live"] and i["settings"]]
    if live:
        newest = max(live, key=lambda i: i["started_at"] or "")
        return {"source": "instance", "instance": newest["instance"], "values": newest["settings"]}
    return {"source": "environment", "instance": None, "values": thresholds.of_settings(settings)}


def _running(
    session: Session, found: list[dict[str, Any]], *, now: datetime, db_now: datetime
) -> list[dict[str, Any]]:
    """Runs still open, with their progress as of their last heartbeat.

    The counts are those the run heartbeat last wrote (every third of a lease), so the
    rate is measured up to that heartbeat: elapsed time minus the counts' age, which
    takes each difference on one clock only.
    """
    in_flight = {i["run_id"]: i["in_flight"] for i in found if i["live"] and i["run_id"]}
    limits = {i["run_id"]: i["concurrency"] for i in found if i["live"] and i["run_id"]}
    gone = {i["instance"] for i in found if not i["live"]}
    rows = session.execute(
        select(runs).where(runs.c.outcome == "running").order_by(desc(runs.c.started_at))
    )
    shown = []
    for r in rows:
        if r.instance in gone:
            continue  # a lost or stopped instance's open run: `cleanup` closes it
        started = aware(r.started_at)
        heartbeat = aware(r.heartbeat_at)
        elapsed = max(0.0, (now - started).total_seconds()) if started else 0.0
        counts_age = max(0.0, (db_now - heartbeat).total_seconds()) if heartbeat else 0.0
        done = r.succeeded + r.failed + r.skipped
        due = r.due if r.due is not None else None
        total = max(due or 0, r.claimed) or None
        measured = elapsed - counts_age
        rate = done / measured if done and measured > 0 else None
        left = (total - done) if total is not None else None
        shown.append(
            {
                "run_id": r.id,
                "instance": r.instance,
                "started_at": _iso(r.started_at),
                "elapsed_s": round(elapsed, 1),
                "due": due,
                "claimed": r.claimed,
                "done": done,
                "succeeded": r.succeeded,
                "failed": r.failed,
                "skipped": r.skipped,
                "of": total,
                "percent": round(100 * done / total, 1) if total else None,
                "rate_per_s": round(rate, 2) if rate else None,
                "eta_s": round(left / rate, 1) if rate and left is not None else None,
                "counts_at": _iso(r.heartbeat_at),
                "counts_age_s": round(counts_age, 1),
                "calls_in_flight": in_flight.get(r.id),
                "concurrency": limits.get(r.id),
            }
        )
    return shown


def _recent_runs(session: Session, now: datetime) -> list[dict[str, Any]]:
    rows = session.execute(select(runs).order_by(desc(runs.c.started_at)).limit(RECENT_RUNS))
    found = []
    for r in rows:
        started, finished = aware(r.started_at), aware(r.finished_at)
        found.append(
            {
                "run_id": r.id,
                "instance": r.instance,
                "started_at": _iso(started),
                "finished_at": _iso(finished),
                "duration_s": round((finished - started).total_seconds(), 1)
                if started and finished
                else None,
                "outcome": r.outcome,
                "due": r.due,
                "claimed": r.claimed,
                "succeeded": r.succeeded,
                "failed": r.failed,
                "skipped": r.skipped,
                "error": r.error,
            }
        )
    return found


def _leases(session: Session) -> list[dict[str, Any]]:
    """Live leases (users claimed), judged on the database's clock like the claims."""
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


def _failing(
    session: Session, store: Store, db_now: datetime, quarantine_after: int
) -> dict[str, Any]:
    """Users whose last attempts failed: most failures first, then by id in the id's own
    order (numeric for integer ids, although the state table keeps every key as text)."""
    s = user_state.c
    numeric = store.users.id_kind is IdKind.NUMBER
    key_order = cast(s.user_key, BigInteger) if numeric else s.user_key
    rows = session.execute(
        select(s.user_key, s.consecutive_failures, s.last_status, s.last_error, s.next_attempt_at)
        .where(s.consecutive_failures > 0)
        .order_by(desc(s.consecutive_failures), key_order)
        .limit(FAILING_USERS)
    )
    users = []
    for key, failures, status, error, next_at in rows:
        next_at = aware(next_at)
        users.append(
            {
                "user_id": int(key) if numeric else key,
                "consecutive_failures": failures,
                "quarantined": bool(quarantine_after) and failures >= quarantine_after,
                "last_status": status,
                "last_error": error,
                "next_attempt_at": _iso(next_at),
                "next_attempt_in_s": None
                if next_at is None
                else round((next_at - db_now).total_seconds(), 1),
            }
        )
    total = session.execute(select(func.count()).where(s.consecutive_failures > 0)).scalar_one()
    return {"failing_users": users, "failing_users_total": total}


def _next(data: dict[str, Any], db_now: datetime) -> dict[str, Any]:
    """What happens next: per live instance its next cycle and probe, and the first
    failing user's next attempt (all as moments on the database's clock)."""
    per_instance = [
        {
            "instance": inst["instance"],
            "next_cycle_at": inst["next_cycle_at"],
            "next_probe_at": inst["next_probe_at"],
        }
        for inst in data["instances"]
        if inst["live"]
    ]
    attempts = [
        u["next_attempt_at"]
        for u in data["failing_users"]
        if u["next_attempt_at"] is not None and (u["next_attempt_in_s"] or 0) >= 1
    ]
    return {"instances": per_instance, "next_attempt_at": min(attempts) if attempts else None}


def verdict(data: dict[str, Any]) -> Verdict:
    """The state `status` exits with: the worst live instance's recorded health, paused
    when an operator's pause holds, lost or not running when no instance is live."""
    live = [i for i in data["instances"] if i["live"]]
    if not live:
        lost = [i["instance"] for i in data["instances"] if i["lost"]]
        if lost:
            return Verdict("lost", STATES["lost"], tuple(f"{name} is lost" for name in lost))
        return Verdict("not running", EXIT_NOT_RUNNING, ("no instance is running",))
    found: list[tuple[str, str]] = []
    for inst in live:
        state = inst["health"] or "healthy"
        if state not in STATES:  # "stopped": shutting down, nothing to judge yet
            state = "warning"
        if state != "healthy":
            why = "; ".join(inst["health_reasons"]) or inst["status"]
            found.append((state, f"{inst['instance']}: {why}"))
    if data["paused"]:
        found.append(("paused", f"paused by {data['paused_by'] or 'an operator'}"))
    if not found:
        return Verdict("healthy", EXIT_HEALTHY, ())
    order = list(STATES)
    worst = max((state for state, _ in found), key=order.index)
    return Verdict(worst, STATES[worst], tuple(reason for _, reason in found))


def pause_text(switches: control.Control) -> str:
    """ "paused by who since when": the one wording of STATUS=, `once` and `force`."""
    since = aware(switches.paused_at)
    when = f" since {since.astimezone(UTC):%Y-%m-%d %H:%M} UTC" if since else ""
    return f"paused by {switches.updated_by or 'an operator'}{when}"


def _iso(value: datetime | None) -> str | None:
    value = aware(value)
    return value.isoformat() if value else None


def _after(moment: datetime | None, seconds: Any) -> str | None:
    if moment is None or not isinstance(seconds, int | float):
        return None
    return (moment + timedelta(seconds=float(seconds))).isoformat()


def render(data: dict[str, Any]) -> str:
    """The human form of `status` (daemon.screen)."""
    from daemon import screen

    return screen.render(data)
