"""The health model: one verdict from facts, the worst state wins, every reason is kept."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from daemon.freshness import BUCKETS_S, Freshness
from daemon.health import CycleStats, Facts, FreshnessTrend, HealthState, assess
from daemon.values import Report


def report(outcome: str = "succeeded", error: str | None = None, **kw: object) -> Report:
    fields: dict[str, object] = {
        "run_id": "r",
        "outcome": outcome,
        "claimed": 10,
        "succeeded": 10,
        "failed": 0,
        "skipped": 0,
        "duration_s": 2.0,
        "error": error,
    }
    return Report(**(fields | kw))  # type: ignore[arg-type]


def test_nothing_wrong_is_healthy_with_no_reasons() -> None:
    verdict = assess(Facts())
    assert (verdict.state, verdict.reasons, verdict.serving) == (HealthState.HEALTHY, (), True)


@pytest.mark.parametrize(
    ("facts", "state", "reason"),
    [
        (Facts(circuit="open", probe_in_s=41.6), "degraded", "circuit open, probe in 42 s"),
        (Facts(circuit="half_open"), "warning", "circuit half-open, one probe in flight"),
        (Facts(database_down_s=12.2), "degraded", "database unavailable for 12 s"),
        (Facts(credentials_rejected=True), "unhealthy", "the backend rejected our credentials"),
        (Facts(configuration_problem="finish: x"), "unhealthy", "configuration: finish: x"),
        (Facts(stalled_on="backend call"), "unhealthy", "cycle stalled on backend call"),
        (Facts(stopping=True), "stopped", "stopping"),
        (
            Facts(consecutive_failed_cycles=1, last_error="circuit open: the backend is failing"),
            "warning",
            "1 cycle(s) in a row could not complete: circuit open: the backend is failing",
        ),
        (Facts(consecutive_failed_cycles=3), "degraded", "3 cycle(s) in a row could not complete"),
    ],
)
def test_each_fact_gives_its_state_and_reason(facts: Facts, state: str, reason: str) -> None:
    verdict = assess(facts)
    assert (verdict.state.value, verdict.reasons) == (state, (reason,))
    assert verdict.serving is (state in ("healthy", "warning"))


def test_the_worst_state_wins_and_every_reason_is_kept() -> None:
    verdict = assess(Facts(circuit="open", probe_in_s=5, credentials_rejected=True))
    assert verdict.state is HealthState.UNHEALTHY
    assert verdict.reasons == (
        "the backend rejected our credentials",
        "circuit open, probe in 5 s",
    )


def test_users_failing_one_by_one_do_not_fail_the_cycle() -> None:
    stats = CycleStats()
    stats.record(report("failed", succeeded=92, failed=8), datetime.now(UTC))
    assert (stats.failed, stats.consecutive_failures) == (0, 0)
    assert assess(Facts(consecutive_failed_cycles=stats.consecutive_failures)).state == "healthy"


def test_a_cycle_an_operator_paused_is_not_a_cycle_that_could_not_complete() -> None:
    stats = CycleStats()
    paused = report("paused", "paused by an operator; 359 claimed user(s) released")
    stats.record(paused, datetime.now(UTC))
    assert (stats.failed, stats.consecutive_failures) == (0, 0)


def test_statistics_count_cycles_rates_durations_and_the_last_error() -> None:
    stats = CycleStats()
    at = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    stats.record(report(duration_s=2.0), at)
    stats.record(report("crashed", "claim: connection refused", duration_s=4.0), at)
    stats.record(report("failed", "circuit open: the backend is failing", duration_s=6.0), at)
    shown = stats.snapshot(uptime_s=90.04)
    assert shown == {
        "cycles_total": 3,
        "cycles_succeeded": 1,
        "cycles_failed": 2,
        "success_rate": 0.3333,
        "consecutive_failures": 2,
        "last_cycle_duration_s": 6.0,
        "average_cycle_duration_s": 4.0,
        "users_succeeded": 30,
        "users_failed": 0,
        "last_error": "circuit open: the backend is failing",
        "last_error_at": "2026-12-01T03:00:00+00:00",
        "uptime_s": 90.0,
    }
    stats.record(report(), at)
    assert stats.consecutive_failures == 0
    assert stats.last_error == "circuit open: the backend is failing"  # kept, with its time


def test_rejected_credentials_last_until_a_cycle_gets_through() -> None:
    stats = CycleStats()
    stats.record(
        report("failed", "the backend rejected our credentials", auth_rejected=True),
        datetime.now(UTC),
    )
    assert stats.credentials_rejected
    stats.record(report(), datetime.now(UTC))
    assert not stats.credentials_rejected


def _measured(fresh: int, users: int = 1000, objective: float = 0.99) -> Freshness:
    return Freshness(
        measured_at=datetime(2026, 12, 1, tzinfo=UTC),
        target_s=3900,
        objective=objective,
        users=users,
        fresh=fresh,
        never_synced=0,
        quarantined=0,
        oldest_overdue_s=None if fresh == users else 7200.0,
        staleness=(0,) * len(BUCKETS_S),
    )


def test_freshness_at_or_above_the_objective_is_healthy() -> None:
    assert assess(Facts(freshness=_measured(990))).state is HealthState.HEALTHY


def test_freshness_below_the_objective_warns_with_the_share_and_the_objective() -> None:
    verdict = assess(Facts(freshness=_measured(980)))
    assert verdict.state is HealthState.WARNING
    assert verdict.reasons == ("98 % of users fresh, below the objective of 99 % (20 overdue)",)
    assert verdict.serving


def test_freshness_far_below_the_objective_is_degraded() -> None:
    # a shortfall of five error budgets: 95 % against 99 %
    assert assess(Facts(freshness=_measured(951))).state is HealthState.WARNING
    assert assess(Facts(freshness=_measured(950))).state is HealthState.DEGRADED


def test_freshness_not_rising_for_three_cycles_below_the_objective_is_degraded() -> None:
    verdict = assess(Facts(freshness=_measured(980), freshness_falling=3))
    assert verdict.state is HealthState.DEGRADED
    assert verdict.reasons[0].endswith("not rising for 3 cycles")


def test_freshness_is_not_judged_before_the_first_cycle() -> None:
    trend = FreshnessTrend()
    assert trend.record(_measured(0), after_a_cycle=False) == "freshness_below_objective"
    assert trend.judged is None
    trend.record(_measured(10), after_a_cycle=True)
    assert trend.judged is not None and trend.judged.fresh == 10


def test_the_trend_counts_measurements_below_the_objective_that_did_not_rise() -> None:
    trend = FreshnessTrend()
    for fresh, falling in ((980, 1), (975, 2), (975, 3), (985, 0), (970, 1)):
        trend.record(_measured(fresh), after_a_cycle=True)
        assert trend.falling == falling, fresh
    assert trend.record(_measured(995), after_a_cycle=True) == "freshness_objective_met"
    assert trend.falling == 0
    assert trend.record(_measured(999), after_a_cycle=True) is None
