"""What /metrics says: which cycle counts as completed, how a backend call is classified,
and that every series reads what the daemon knows, when Prometheus scrapes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from prometheus_client import generate_latest

from daemon.backend import _Attempt, call_outcome
from daemon.freshness import BUCKETS_S, Freshness
from daemon.metrics import CALL_OUTCOMES, INSTANCE_STATES, Metrics
from daemon.progress import Progress
from daemon.values import Outcome, Report, Result

MEASURED_AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def report(**fields: object) -> Report:
    base = Report(
        run_id="r1",
        outcome="succeeded",
        claimed=100,
        succeeded=100,
        failed=0,
        skipped=0,
        duration_s=1.0,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- which cycle is "successful": the one that completed ---------------------------------


def test_a_cycle_whose_users_failed_one_by_one_still_completed() -> None:
    assert report(outcome="failed", succeeded=92, failed=8).completed


def test_a_cycle_without_failures_completed() -> None:
    assert report().completed
    assert report(claimed=0, succeeded=0).completed


@pytest.mark.parametrize(
    "fields",
    [
        {"outcome": "failed", "error": "circuit open: the backend is failing", "succeeded": 40},
        {"outcome": "failed", "error": "the backend rejected our credentials", "succeeded": 0},
        {"outcome": "crashed", "error": "database is locked"},
        {"outcome": "interrupted", "succeeded": 30},
        {"outcome": "paused", "error": "paused by an operator; 70 claimed user(s) released"},
        {"outcome": "failed", "succeeded": 60},  # claimed users left unattempted
    ],
    ids=["circuit", "credentials", "crashed", "interrupted", "paused", "unattempted"],
)
def test_a_cycle_that_did_not_run_through_its_due_list_never_completed(
    fields: dict[str, object],
) -> None:
    assert not report(**fields).completed


def test_a_cycle_whose_results_the_database_did_not_take_did_not_complete() -> None:
    left = Result(None, Outcome.SUCCESS, MEASURED_AT, run_id="r1")  # type: ignore[arg-type]
    assert not report(outcome="failed", unrecorded=(left,)).completed


def test_the_last_successful_cycle_timestamp_moves_on_a_completed_cycle_only() -> None:
    metrics = Metrics()
    metrics.record(report(outcome="failed", succeeded=92, failed=8), finished_at=1000.0)
    metrics.record(report(outcome="crashed", error="database is locked"), finished_at=2000.0)
    assert value(metrics, "background_sync_last_successful_cycle_timestamp_seconds") == 1000.0
    assert value(metrics, "background_sync_cycles_total", outcome="failed") == 1
    assert value(metrics, "background_sync_users_total", outcome="failed") == 8


# -- one backend call, classified -----------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (_Attempt(Outcome.SUCCESS, 200), "success"),
        (_Attempt(Outcome.SUCCESS, 204), "success"),
        (_Attempt(Outcome.FAILED, 202, progress_url="http://127.0.0.1/p/1"), "success"),
        (_Attempt(Outcome.FAILED, 202, "202 without a progress URL"), "invalid_answer"),
        (_Attempt(Outcome.FAILED, 200, "response body is not a JSON object"), "invalid_answer"),
        (_Attempt(Outcome.FAILED, 302, "redirected"), "redirect"),
        (_Attempt(Outcome.FAILED, 429, retryable=True), "throttled"),
        (_Attempt(Outcome.FAILED, 503, retryable=True), "throttled"),
        (_Attempt(Outcome.FAILED, 500, retryable=True), "server_error"),
        (_Attempt(Outcome.FAILED, 504, retryable=True), "server_error"),
        (_Attempt(Outcome.FAILED, 401), "client_error"),
        (_Attempt(Outcome.FAILED, 403), "client_error"),
        (_Attempt(Outcome.FAILED, 404), "client_error"),
        (_Attempt(Outcome.CONFLICT, 409), "client_error"),
        (_Attempt(Outcome.FAILED, None, "timed out", timed_out=True), "timeout"),
        (_Attempt(Outcome.FAILED, None, "ClientConnectorError"), "connection_error"),
        (_Attempt(Outcome.FAILED, 699), "invalid_answer"),
    ],
)
def test_each_http_attempt_is_classified_by_how_it_ended(attempt: _Attempt, expected: str) -> None:
    assert call_outcome(attempt) == expected
    assert expected in CALL_OUTCOMES


def test_requests_are_counted_by_status_class_and_timed_by_outcome() -> None:
    metrics = Metrics()
    calls = metrics.calls
    for status, outcome in [(200, "success"), (204, "success"), (503, "throttled")]:
        calls.started()
        calls.finished(outcome, status, 0.02)
    calls.started()
    calls.finished("timeout", None, 30.0)
    calls.started()
    calls.finished("invalid_answer", 699, 0.01)
    calls.started()  # still waiting for its answer
    counted = {
        c: value(metrics, "background_sync_backend_requests_total", status_class=c)
        for c in ("2xx", "3xx", "4xx", "5xx", "none")
    }
    assert counted == {"2xx": 2, "3xx": 0, "4xx": 0, "5xx": 1, "none": 2}
    name = "background_sync_backend_request_duration_seconds"
    assert value(metrics, f"{name}_count", outcome="success") == 2
    assert value(metrics, f"{name}_bucket", outcome="success", le="0.025") == 2
    assert value(metrics, f"{name}_bucket", outcome="timeout", le="10.0") == 0
    assert value(metrics, f"{name}_bucket", outcome="timeout", le="30.0") == 1
    assert value(metrics, "background_sync_backend_requests_in_flight") == 1
    calls.abandoned()
    assert value(metrics, "background_sync_backend_requests_in_flight") == 0


# -- what the daemon is doing, read at scrape time -------------------------------------------


def test_circuit_credentials_and_cycle_progress_are_read_when_scraped() -> None:
    metrics = Metrics()
    circuit = ["closed"]
    rejected = [False]
    running: list[Progress | None] = [None]
    metrics.follow(
        circuit=lambda: circuit[0],
        credentials_rejected=lambda: rejected[0],
        progress=lambda: running[0],
    )
    assert value(metrics, "background_sync_circuit_state", state="closed") == 1
    assert value(metrics, "background_sync_cycle_users_due") == 0
    circuit[0], rejected[0] = "half_open", True
    running[0] = Progress(total=295, done=190)
    assert [
        value(metrics, "background_sync_circuit_state", state=s)
        for s in ("closed", "open", "half_open")
    ] == [0, 0, 1]
    assert value(metrics, "background_sync_backend_credentials_rejected") == 1
    assert value(metrics, "background_sync_cycle_users_due") == 295
    assert value(metrics, "background_sync_cycle_users_done") == 190


def test_a_starting_cycle_sets_the_running_gauge_and_its_start_time() -> None:
    metrics = Metrics()
    metrics.cycle_starting(MEASURED_AT)
    assert value(metrics, "background_sync_cycle_running") == 1
    started = value(metrics, "background_sync_cycle_started_timestamp_seconds")
    assert started == MEASURED_AT.timestamp()


def test_every_instance_state_has_a_series_even_when_no_instance_is_in_it() -> None:
    metrics = Metrics()
    metrics.show_instances({"idle": 2, "lost": 1})
    shown = {s: value(metrics, "background_sync_instances", state=s) for s in INSTANCE_STATES}
    assert shown == {s: {"idle": 2, "lost": 1}.get(s, 0) for s in INSTANCE_STATES}
    metrics.show_instances({"idle": 3})
    assert value(metrics, "background_sync_instances", state="lost") == 0


# -- freshness, as measured ------------------------------------------------------------------


def measured(**fields: object) -> Freshness:
    base = Freshness(
        measured_at=MEASURED_AT,
        target_s=3900.0,
        objective=0.99,
        users=1000,
        fresh=990,
        never_synced=4,
        quarantined=2,
        oldest_overdue_s=7260.5,
        staleness=(500, 700, 900, 980, 990, 994, 996, 996, 996, 996),
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def test_nothing_about_freshness_is_exposed_before_it_is_measured() -> None:
    text = generate_latest(Metrics().registry).decode()
    assert "background_sync_fresh_ratio" not in text
    assert "background_sync_table_users " not in text


def test_freshness_gauges_show_the_measurement_as_it_is() -> None:
    metrics = Metrics()
    metrics.show_freshness(measured())
    metrics.show_due(7)
    assert {
        name: value(metrics, f"background_sync_{name}")
        for name in (
            "table_users",
            "users_due",
            "users_overdue",
            "users_never_synced",
            "users_quarantined",
            "fresh_ratio",
            "freshness_objective_ratio",
            "freshness_target_seconds",
            "oldest_overdue_age_seconds",
            "freshness_measured_timestamp_seconds",
        )
    } == {
        "table_users": 1000,
        "users_due": 7,
        "users_overdue": 10,
        "users_never_synced": 4,
        "users_quarantined": 2,
        "fresh_ratio": 0.99,
        "freshness_objective_ratio": 0.99,
        "freshness_target_seconds": 3900.0,
        "oldest_overdue_age_seconds": 7260.5,
        "freshness_measured_timestamp_seconds": MEASURED_AT.timestamp(),
    }


def test_no_overdue_user_reads_as_an_oldest_overdue_age_of_zero() -> None:
    metrics = Metrics()
    metrics.show_freshness(measured(fresh=1000, oldest_overdue_s=None))
    assert value(metrics, "background_sync_oldest_overdue_age_seconds") == 0
    assert value(metrics, "background_sync_fresh_ratio") == 1


def test_staleness_is_a_gauge_histogram_whose_last_bucket_counts_every_user() -> None:
    metrics = Metrics()
    metrics.show_freshness(measured())
    name = "background_sync_user_staleness_seconds"
    buckets = [value(metrics, f"{name}_bucket", le=str(float(b))) for b in BUCKETS_S]
    assert buckets == [500, 700, 900, 980, 990, 994, 996, 996, 996, 996]
    assert value(metrics, f"{name}_bucket", le="+Inf") == 1000  # never-synced ones too
    assert value(metrics, f"{name}_gcount") == 1000
    text = generate_latest(metrics.registry).decode()
    assert f"# TYPE {name} histogram" in text
    assert f"{name}_gsum" not in text  # the measurement does not add ages up
