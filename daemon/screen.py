"""The human form of `background-sync status`: one screen, freshness first, relative ages.

It renders what `daemon.overview.collect` gathered (the `--json` form) and reads nothing
else: every fact on the screen is in the JSON too, with full ISO times there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from daemon import ages, control, freshness

# Run outcomes that say something went wrong (or was held back), with the run's error.
TROUBLED = frozenset({"failed", "crashed", "interrupted", "paused", "abandoned"})


def render(data: dict[str, Any]) -> str:
    """The human form of `status`: one screen, newest facts first, relative ages."""
    db_now = datetime.fromisoformat(data["database_now"])
    now = datetime.fromisoformat(data["generated_at"])
    verdict_ = data["verdict"]
    head = f"status: {verdict_['state'].upper()} (exit {verdict_['exit_status']})"
    if verdict_["reasons"]:
        head += ": " + "; ".join(verdict_["reasons"])
    database = data["database"]
    lines = [
        _freshness_line(data),
        head,
        f"database: {database['url']}, users table {database['users_table']}",
    ]
    lines.append(_thresholds_line(data["thresholds"]))
    if data["paused"]:
        lines.append(
            f"PAUSED by {data['paused_by'] or 'an operator'} "
            f"{_ago(data['paused_at'], db_now)}; nothing is claimed until `resume`"
        )
    lines.append(
        f"due users: {data['due_users']}, quarantined: {data['quarantined_users']}, "
        f"claimed now (leases held): {data['users_claimed']}"
    )
    lines.append("")
    lines.append("now:")
    if not data["instances"]:
        lines.append("  no instance has ever reported to this database")
    held = {lease["instance"]: lease["leases"] for lease in data["leases"]}
    running = {
        run["instance"]: {**run, "leases_held": held.get(run["instance"], 0)}
        for run in data["running"]
    }
    for inst in data["instances"]:
        lines.append(f"  {inst['instance']}: {_instance_line(inst)}")
        run = running.get(inst["instance"])
        if run is not None:
            lines.append(f"    {_running_line(run)}")
    known = {inst["instance"] for inst in data["instances"]}
    for run in data["running"]:
        if run["instance"] not in known:  # `once` runs a cycle without an instance row
            lines.append(f"  {run['instance']} (no instance row: `once`?):")
            lines.append(f"    {_running_line(run)}")
    if not any(i["live"] for i in data["instances"]):
        lines.append("  (no instance running)")
    lines += _failed_lines(data, db_now, now)
    lines += _next_lines(data, db_now)
    lines.append("")
    lines.append("recent runs:")
    if not data["recent_runs"]:
        lines.append("  (none yet)")
    for run in data["recent_runs"]:
        lines.append(f"  {_run_line(run, now)}")
    return "\n".join(lines)


def _freshness_line(data: dict[str, Any]) -> str:
    """ "99.7 % fresh (objective 99 %), 3 overdue, oldest overdue 3 min, 2 quarantined"."""
    found = data["freshness"]
    line = (
        f"{freshness.percent(found['fresh_ratio'])} fresh "
        f"(objective {freshness.percent(found['objective'])}), {found['overdue']} overdue"
    )
    if found["never_synced"]:
        line += f" ({found['never_synced']} never synced)"
    if found["oldest_overdue_s"] is not None:
        line += f", oldest overdue {ages.span(found['oldest_overdue_s'])}"
    line += f", {found['quarantined']} quarantined"
    line += f"; {found['users']} users, fresh = synced within {ages.span(found['target_s'])}"
    return line


def _thresholds_line(judge: dict[str, Any]) -> str:
    values = judge["values"]
    source = (
        f"thresholds of instance {judge['instance']}"
        if judge["source"] == "instance"
        else "no running instance: this environment's thresholds"
    )
    parts = []
    if "stale_after_seconds" in values:
        parts.append(f"stale after {ages.span(values['stale_after_seconds'])}")
    if "interval_seconds" in values:
        parts.append(f"cycle every {ages.span(values['interval_seconds'])}")
    if "quarantine_after" in values:
        parts.append(f"quarantine after {values['quarantine_after']} failures")
    if "concurrency" in values:
        parts.append(f"concurrency {values['concurrency']}")
    return f"{source}: {', '.join(parts)}"


def _instance_line(inst: dict[str, Any]) -> str:
    age = ages.span(inst["seen_seconds_ago"])
    if inst["last_state"] == control.STOPPED:
        return f"stopped {age} ago"
    if inst["lost"]:
        return (
            f"LOST: silent for {age} (over {control.LOST_AFTER_SECONDS:g} s), "
            f"last said {inst['last_state']}: {inst['status']}"
        )
    health = inst["health"] or "healthy"
    shown = "" if health == "healthy" else f", {health.upper()}"
    status = inst["status"] or ""
    # STATUS= leads with the health and its reasons, which the screen's head already says.
    reasons = f"{health}: {'; '.join(inst['health_reasons'])}; "
    if inst["health_reasons"] and status.startswith(reasons):
        status = status[len(reasons) :]
    return f"{inst['state']}, circuit {inst['circuit']}{shown}, seen {age} ago: {status}"


def _running_line(run: dict[str, Any]) -> str:
    line = f"cycle running {ages.span(run['elapsed_s'])}"
    if run["of"]:
        line += f": {run['done']} of {run['of']} ({run['percent']:g} %)"
    else:
        line += f": {run['done']} done"
    if run["rate_per_s"]:
        line += f", {run['rate_per_s']:g} users/s"
    if run["eta_s"] is not None:
        line += f", ETA {ages.span(run['eta_s'])}"
    if run["failed"]:
        line += f", {run['failed']} failed"
    line += f"; {run['claimed']} claimed so far"
    if run.get("leases_held") is not None:
        line += f", {run['leases_held']} leases held now"
    if run["calls_in_flight"] is not None:
        line += f", {run['calls_in_flight']} call(s) in flight"
        line += _limit_text(run.get("concurrency"))
    return line + f" (counts as of {ages.span(run['counts_age_s'])} ago)"


def _limit_text(limit: Any) -> str:
    """ " (limit 12 of 16: latency above the baseline; baseline 52 ms)", "" when unknown."""
    if not isinstance(limit, dict) or limit.get("limit") is None:
        return ""
    text = f" (limit {limit['limit']} of {limit.get('maximum')}"
    if limit.get("adaptive") is False:
        return text + ", fixed)"
    if limit.get("reason"):
        text += f": {limit['reason']}"
    baseline = limit.get("baseline_s")
    if isinstance(baseline, int | float):
        text += f"; baseline {round(baseline * 1000)} ms"
    return text + ")"


def _failed_lines(data: dict[str, Any], db_now: datetime, now: datetime) -> list[str]:
    lines = []
    latest: dict[str, dict[str, Any]] = {}
    for run in data["recent_runs"]:
        if run["finished_at"] is not None:
            latest.setdefault(run["instance"], run)
    troubled = [run for run in latest.values() if run["outcome"] in TROUBLED]
    failing = data["failing_users"]
    if not troubled and not failing:
        return []
    lines += ["", "failed:"]
    for run in troubled:
        why = run["error"] or _failed_users_text(run)
        lines.append(
            f"  last run of {run['instance']} {run['outcome']} "
            f"{_ago(run['finished_at'], now)}: {why}"
        )
    if failing:
        lines.append(
            f"  failing users ({len(failing)} of {data['failing_users_total']}, "
            "most failures first):"
        )
        for user in failing:
            last = " ".join(str(part) for part in (user["last_status"], user["last_error"]) if part)
            mark = ", QUARANTINED" if user["quarantined"] else ""
            lines.append(
                f"    {user['user_id']}: {user['consecutive_failures']} in a row{mark}, "
                f"last {last or '-'}, {_next_attempt(user, db_now)}"
            )
    return lines


def _failed_users_text(run: dict[str, Any]) -> str:
    if run["outcome"] == "failed" and run["failed"]:
        return f"{run['failed']} of {run['claimed']} claimed user(s) failed"
    return run["outcome"]


def _next_attempt(user: dict[str, Any], db_now: datetime) -> str:
    """ "next attempt in 4 min", or, once the backoff is over, at the next cycle."""
    wait = user["next_attempt_in_s"]
    if wait is None or wait < 1:
        return "next attempt at the next cycle"
    return f"next attempt {_ago(user['next_attempt_at'], db_now)}"


def _next_lines(data: dict[str, Any], db_now: datetime) -> list[str]:
    lines = []
    for inst in data["next"]["instances"]:
        parts = []
        if data["paused"]:
            parts.append("next cycle on `resume`")
        elif inst["next_cycle_at"] is not None:
            parts.append(f"next cycle {_ago(inst['next_cycle_at'], db_now)}")
        if inst["next_probe_at"] is not None:
            parts.append(f"circuit probe {_ago(inst['next_probe_at'], db_now)}")
        if parts:
            lines.append(f"  {inst['instance']}: {', '.join(parts)}")
    if data["next"]["next_attempt_at"] is not None:
        lines.append(
            "  failing users: the first backoff ends "
            f"{_ago(data['next']['next_attempt_at'], db_now)}"
        )
    return ["", "next:", *lines] if lines else []


def _run_line(run: dict[str, Any], now: datetime) -> str:
    counts = (
        f"claimed {run['claimed']} ok {run['succeeded']} failed {run['failed']} "
        f"skipped {run['skipped']}"
    )
    if run["due"] is not None:
        counts = f"due {run['due']} " + counts
    took = f" in {ages.span(run['duration_s'])}" if run["duration_s"] is not None else ""
    when = _ago(run["started_at"], now)
    line = f"{when:>11}  {run['outcome']:<11} {counts}{took}  {run['instance']}"
    if run["error"] and run["outcome"] != "succeeded":
        line += f"  ({run['error']})"
    return line


def _ago(iso: str | None, now: datetime) -> str:
    return ages.ago(datetime.fromisoformat(iso) if iso else None, now)
