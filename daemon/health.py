"""The daemon's health, decided in one place from facts, and its cycle statistics.

Every view (STATUS=, /health, /status, `status` through the instances row, /metrics)
reads the same `Health`, computed by `assess()` from a `Facts` value the app gathers at
that moment. Nothing stores a health string: a state set in several places drifts, and
then /health says "ok" while the circuit is open.

| state | when | /health |
|---|---|---|
| healthy | nothing below | 200 |
| warning | the last one or two cycles could not complete; the circuit is half-open | 200 |
| degraded | the database is unavailable; the circuit is open; 3+ cycles in a row failed | 503 |
| unhealthy | a schema refused (configuration), credentials rejected, a stalled cycle | 503 |
| stopped | shutting down | 503 |

A cycle "fails" when it cannot complete (a database error, the circuit opened, the
credentials were rejected, a bug). Users that fail one by one do not fail the cycle:
they are counted per user, and a backend with a few bad users stays healthy.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from daemon import freshness as freshness_module
from daemon.freshness import Freshness
from daemon.logs import get_logger
from daemon.values import Report

FAILED_CYCLES_DEGRADED = 3
# Below the freshness objective is a warning; degraded when the shortfall is this many
# times the error budget (objective 99 %: below 95 %), or when the share has not risen
# for this many measurements (cycles) in a row while below it.
FRESHNESS_FAR_BELOW = 5.0
FRESHNESS_FALLING_DEGRADED = 3
# /health answers 200 in these states; a load balancer or monitor takes the rest as down.
SERVING = frozenset({"healthy", "warning"})


class HealthState(enum.StrEnum):
    HEALTHY = "healthy"
    WARNING = "warning"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"


_ORDER = list(HealthState)


@dataclass(frozen=True)
class Facts:
    """What the health is decided from; gathered by the app when a view asks."""

    stopping: bool = False
    configuration_problem: str | None = None
    credentials_rejected: bool = False
    database_down_s: float | None = None
    circuit: str = "closed"
    probe_in_s: float = 0.0
    stalled_on: str | None = None
    consecutive_failed_cycles: int = 0
    last_error: str | None = None
    freshness: Freshness | None = None
    freshness_falling: int = 0


@dataclass(frozen=True)
class Health:
    state: HealthState
    reasons: tuple[str, ...] = ()

    @property
    def serving(self) -> bool:
        return self.state.value in SERVING


def assess(facts: Facts) -> Health:
    """The worst state any fact calls for, with every reason that applies."""
    found: list[tuple[HealthState, str]] = []
    if facts.stopping:
        found.append((HealthState.STOPPED, "stopping"))
    if facts.configuration_problem is not None:
        found.append((HealthState.UNHEALTHY, f"configuration: {facts.configuration_problem}"))
    if facts.credentials_rejected:
        found.append((HealthState.UNHEALTHY, "the backend rejected our credentials"))
    if facts.stalled_on is not None:
        found.append((HealthState.UNHEALTHY, f"cycle stalled on {facts.stalled_on}"))
    if facts.database_down_s is not None:
        found.append(
            (HealthState.DEGRADED, f"database unavailable for {round(facts.database_down_s)} s")
        )
    if facts.circuit == "open":
        found.append(
            (
                HealthState.DEGRADED,
                f"circuit open, probe in {math.ceil(max(0.0, facts.probe_in_s))} s",
            )
        )
    elif facts.circuit == "half_open":
        found.append((HealthState.WARNING, "circuit half-open, one probe in flight"))
    failed = facts.consecutive_failed_cycles
    if failed:
        why = f": {facts.last_error}" if facts.last_error else ""
        state = HealthState.DEGRADED if failed >= FAILED_CYCLES_DEGRADED else HealthState.WARNING
        found.append((state, f"{failed} cycle(s) in a row could not complete{why}"))
    if facts.freshness is not None and not facts.freshness.meets_objective:
        found.append(_freshness_verdict(facts.freshness, facts.freshness_falling))
    if not found:
        return Health(HealthState.HEALTHY)
    worst = max((state for state, _ in found), key=_ORDER.index)
    return Health(worst, tuple(reason for _, reason in found))


def _freshness_verdict(found: Freshness, falling: int) -> tuple[HealthState, str]:
    share = freshness_module.percent
    budget = 1.0 - found.objective
    far = (1.0 - found.fresh_ratio) >= FRESHNESS_FAR_BELOW * budget
    long = falling >= FRESHNESS_FALLING_DEGRADED
    reason = (
        f"{share(found.fresh_ratio)} of users fresh, below the objective of "
        f"{share(found.objective)} ({found.overdue} overdue)"
    )
    if long:
        reason += f", not rising for {falling} cycles"
    return (HealthState.DEGRADED if far or long else HealthState.WARNING), reason


def cycle_failed(report: Report) -> bool:
    """A cycle that could not complete; single users failing do not count, nor does an
    operator's pause (its run records why it stopped early, but nothing went wrong)."""
    if report.outcome == "paused":
        return False
    return report.outcome == "crashed" or report.error is not None


@dataclass
class CycleStats:
    """Counts over the process's life, as an operator asks for them (seed 002's list)."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    last_duration_s: float | None = None
    durations_s: float = 0.0
    last_error: str | None = None
    last_error_at: datetime | None = None
    credentials_rejected: bool = False
    _users: dict[str, int] = field(default_factory=lambda: {"succeeded": 0, "failed": 0})

    def record(self, report: Report, at: datetime) -> None:
        """Account one finished cycle (`at`: when it finished, wall time)."""
        self.total += 1
        self.last_duration_s = report.duration_s
        self.durations_s += report.duration_s
        self._users["succeeded"] += report.succeeded
        self._users["failed"] += report.failed
        self.credentials_rejected = report.auth_rejected
        if cycle_failed(report):
            self.failed += 1
            self.consecutive_failures += 1
            self.last_error = report.error or report.outcome
            self.last_error_at = at
        else:
            self.succeeded += 1
            self.consecutive_failures = 0

    def snapshot(self, *, uptime_s: float) -> dict[str, Any]:
        return {
            "cycles_total": self.total,
            "cycles_succeeded": self.succeeded,
            "cycles_failed": self.failed,
            "success_rate": round(self.succeeded / self.total, 4) if self.total else None,
            "consecutive_failures": self.consecutive_failures,
            "last_cycle_duration_s": self.last_duration_s,
            "average_cycle_duration_s": round(self.durations_s / self.total, 3)
            if self.total
            else None,
            "users_succeeded": self._users["succeeded"],
            "users_failed": self._users["failed"],
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
            "uptime_s": round(uptime_s, 1),
        }


@dataclass
class FreshnessTrend:
    """The latest freshness measurement and how it has moved.

    The health judges freshness only once this process has run a cycle: what the table
    looked like at start-up is the past's doing, and a restarted daemon must not call
    itself degraded before it has had its chance. `falling` counts the measurements in
    a row below the objective whose share did not rise.
    """

    latest: Freshness | None = None
    falling: int = 0
    after_a_cycle: bool = False

    @property
    def judged(self) -> Freshness | None:
        return self.latest if self.after_a_cycle else None

    def record(self, found: Freshness, *, after_a_cycle: bool) -> str | None:
        """Note a measurement; the event to log when it crosses the objective, if any."""
        previous = self.latest
        self.latest = found
        self.after_a_cycle = self.after_a_cycle or after_a_cycle
        if found.meets_objective:
            self.falling = 0
            met_before = previous is None or previous.meets_objective
            return None if met_before else "freshness_objective_met"
        rising = previous is not None and found.fresh_ratio > previous.fresh_ratio
        self.falling = 0 if rising else self.falling + 1
        below_before = previous is not None and not previous.meets_objective
        return None if below_before else "freshness_below_objective"


class Tracker:
    """The facts the daemon learns over time, kept in one place: since when the database
    has been unavailable, a schema refused, the cycle statistics, the start time.

    Cycles and the control poll both report database health here, so the two never give
    different accounts; the app asks `facts()` and adds what it knows right now.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = CycleStats()
        self.freshness = FreshnessTrend()
        self.schema_problem: str | None = None
        self.database_down_since: float | None = None
        self._clock = clock
        self._started = clock()
        self._log = get_logger(component="health")

    def database(self, ok: bool, *, outage_limit_s: float) -> bool:
        """Note one database unit of work; True once it has been away past the limit."""
        now = self._clock()
        if ok:
            if self.database_down_since is not None:
                down = round(now - self.database_down_since, 1)
                self._log.info("database_available", down_s=down)
            self.database_down_since = None
            return False
        if self.database_down_since is None:
            self.database_down_since = now
            self._log.error("database_degraded", detail="retrying with backoff")
            return False
        return now - self.database_down_since > outage_limit_s

    def facts(
        self,
        *,
        stopping: bool,
        circuit: str,
        probe_in_s: float,
        stalled_on: str | None,
        failing_now: bool,
    ) -> Facts:
        """The facts of the moment; `failing_now`: the running cycle's writes fail."""
        now = self._clock()
        down = self.database_down_since
        if down is None and failing_now:
            down = now
        return Facts(
            stopping=stopping,
            configuration_problem=self.schema_problem,
            credentials_rejected=self.stats.credentials_rejected,
            database_down_s=None if down is None else now - down,
            circuit=circuit,
            probe_in_s=probe_in_s,
            stalled_on=stalled_on,
            consecutive_failed_cycles=self.stats.consecutive_failures,
            last_error=self.stats.last_error,
            freshness=self.freshness.judged,
            freshness_falling=self.freshness.falling,
        )

    def statistics(self) -> dict[str, Any]:
        return self.stats.snapshot(uptime_s=self._clock() - self._started)
