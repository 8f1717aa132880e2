"""Prometheus metrics: what a cycle did, what the daemon is doing now, how fresh users are.

Names follow Prometheus' naming conventions (https://prometheus.io/docs/practices/naming/):
one `background_sync_` prefix, base units (seconds, ratios from 0 to 1), `_total` on
counters only, `_timestamp_seconds` for moments (Unix time), and labels only with a small
fixed set of values, each series created at start-up so that rates and alerts see a 0
rather than nothing.

Cost: per-user counters are fed from the cycle's Report, once per cycle. The only
per-call updates are those of BackendCalls (a few integer increments per HTTP attempt,
turned into a histogram and a counter when scraped); what the daemon is doing now (the
circuit, the running cycle's progress, the credentials) is read when Prometheus scrapes,
never pushed from the hot path. Freshness is one immutable measurement per cycle, exposed
as it is by a collector.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from daemon import logsink
from daemon.backend import CallMeter
from daemon.freshness import BUCKETS_S, Freshness
from daemon.health import HealthState
from daemon.limiter import REASONS, Limiter
from daemon.progress import Progress
from daemon.values import Report

# How one HTTP attempt ended (throttled: 429 or 503; client_error: any other 4xx).
CALL_OUTCOMES = (
    "success",
    "client_error",
    "server_error",
    "throttled",
    "redirect",
    "timeout",
    "connection_error",
    "invalid_answer",
)
# "none": no HTTP status (a timeout, a connection error) or one outside 200-599.
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")
CALL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
USER_OUTCOMES = ("success", "failed", "skipped")
CYCLE_OUTCOMES = ("succeeded", "failed", "crashed", "interrupted", "paused")
CIRCUIT_STATES = ("closed", "open", "half_open")
INSTANCE_STATES = ("idle", "syncing", "paused", "starting", "stopping", "lost", "stopped")
# Indexed by status // 100 (0 for no status or one outside 200-599).
_CLASS_OF_HUNDRED = ("none", "none", "2xx", "3xx", "4xx", "5xx")


class BackendCalls(CallMeter):
    """Per HTTP attempt: latency by outcome, count by status class, attempts in flight.

    On the hot path, so counted in plain integers and exposed by `collect()` when
    Prometheus scrapes: an attempt costs a bisect and three increments (about 0.5 us of
    CPU, where prometheus_client's locked Histogram and Counter children cost about
    3 us). No lock is needed: the calls and the status server that scrapes them share
    the daemon's one event loop thread.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        # Per outcome, attempts per bucket (not cumulative); the last one is past 60 s.
        self._buckets = {o: [0] * (len(CALL_BUCKETS_S) + 1) for o in CALL_OUTCOMES}
        self._seconds = dict.fromkeys(CALL_OUTCOMES, 0.0)
        self._by_hundred = [0] * len(_CLASS_OF_HUNDRED)  # index: status // 100

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, outcome: str, status: int | None, seconds: float) -> None:
        self.in_flight -= 1
        self._buckets[outcome][bisect.bisect_left(CALL_BUCKETS_S, seconds)] += 1
        self._seconds[outcome] += seconds
        self._by_hundred[status // 100 if status is not None and 200 <= status < 600 else 0] += 1

    def abandoned(self) -> None:
        self.in_flight -= 1

    def collect(self) -> Iterator[Metric]:
        duration = HistogramMetricFamily(
            "background_sync_backend_request_duration_seconds",
            "Wall time of one HTTP attempt to the backend, by how it ended.",
            labels=["outcome"],
        )
        for outcome in CALL_OUTCOMES:
            cumulative = list(itertools.accumulate(self._buckets[outcome]))
            bounds = [floatToGoString(b) for b in CALL_BUCKETS_S] + ["+Inf"]
            duration.add_metric(
                [outcome], list(zip(bounds, cumulative, strict=True)), self._seconds[outcome]
            )
        yield duration
        requests = CounterMetricFamily(
            "background_sync_backend_requests",
            "HTTP attempts to the backend, by status class (none: no HTTP status).",
            labels=["status_class"],
        )
        counted = dict.fromkeys(STATUS_CLASSES, 0)
        for hundred, count in enumerate(self._by_hundred):
            counted[_CLASS_OF_HUNDRED[hundred]] += count
        for name in STATUS_CLASSES:
            requests.add_metric([name], counted[name])
        yield requests
        yield _gauge(
            "background_sync_backend_requests_in_flight",
            "HTTP attempts to the backend sent and not answered yet.",
            self.in_flight,
        )


class LogLossCollector:
    """Log lines a failed write dropped (daemon.logsink), read when scraped."""

    def __init__(self, lost: Callable[[], int]) -> None:
        self._lost = lost

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "background_sync_log_lines_lost",
            "Log lines dropped because writing them failed (a closed pipe or journal "
            "stream, a full disk).",
            value=self._lost(),
        )


class FreshnessCollector:
    """The latest freshness measurement, exposed as it is when Prometheus scrapes.

    Nothing is exposed before the first measurement: a fresh ratio of 0 that nobody
    measured would page someone. The rows of the table are `background_sync_table_users`:
    `background_sync_users` would share its base name with the counter
    `background_sync_users_total`, one family name in OpenMetrics. `describe()` is empty
    because which series exist depends on whether a measurement has been taken.
    """

    def __init__(self) -> None:
        self.latest: Freshness | None = None
        self.due: int | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        f = self.latest
        if f is None:
            return
        yield _gauge("background_sync_table_users", "Rows in the users table.", f.users)
        if self.due is not None:
            yield _gauge(
                "background_sync_users_due",
                "Users a cycle would claim now: stale and not waiting out a backoff.",
                self.due,
            )
        yield _gauge(
            "background_sync_users_overdue",
            "Users not synced within the freshness target, never-synced ones included.",
            f.overdue,
        )
        yield _gauge(
            "background_sync_users_never_synced", "Users whose last_sync is NULL.", f.never_synced
        )
        yield _gauge(
            "background_sync_users_quarantined",
            "Users failing SYNC_QUARANTINE_AFTER times in a row, only probed rarely.",
            f.quarantined,
        )
        yield _gauge(
            "background_sync_fresh_ratio",
            "Share of users synced within the freshness target (0 to 1).",
            f.fresh_ratio,
        )
        yield _gauge(
            "background_sync_freshness_objective_ratio",
            "The share of users that should be fresh (SYNC_FRESHNESS_OBJECTIVE).",
            f.objective,
        )
        yield _gauge(
            "background_sync_freshness_target_seconds",
            "A user is fresh when synced within this long (SYNC_FRESHNESS_TARGET_SECONDS).",
            f.target_s,
        )
        yield _gauge(
            "background_sync_oldest_overdue_age_seconds",
            "Age of the oldest overdue user's last_sync (0 when none is overdue).",
            f.oldest_overdue_s or 0.0,
        )
        yield _staleness(f)
        yield _gauge(
            "background_sync_freshness_measured_timestamp_seconds",
            "When freshness was last measured (Unix time).",
            f.measured_at.astimezone(UTC).timestamp(),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _staleness(f: Freshness) -> Metric:
    """The users by age of their last_sync, as a gauge histogram (cumulative buckets).

    The +Inf bucket is every user, never-synced ones included. There is no `_gsum`: the
    measurement does not add the ages up, and a made-up sum would mislead.
    """
    name = "background_sync_user_staleness_seconds"
    metric = Metric(
        name, "Users by the age of their last_sync (never synced: +Inf).", "gaugehistogram"
    )
    for bound, count in zip(BUCKETS_S, f.staleness, strict=True):
        metric.add_sample(f"{name}_bucket", {"le": floatToGoString(bound)}, count)
    metric.add_sample(f"{name}_bucket", {"le": "+Inf"}, f.users)
    metric.add_sample(f"{name}_gcount", {}, f.users)
    return metric


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.users = Counter(
            "background_sync_users_total",
            "Users processed, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in USER_OUTCOMES:
            self.users.labels(outcome)
        self.cycles = Counter(
            "background_sync_cycles_total",
            "Cycles run, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in CYCLE_OUTCOMES:
            self.cycles.labels(outcome)
        self.cycle_seconds = Histogram(
            "background_sync_cycle_duration_seconds",
            "Wall time of one cycle.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
        self.ticks_skipped = Counter(
            "background_sync_ticks_skipped_total",
            "Scheduler ticks skipped because a cycle was still running.",
            registry=self.registry,
        )
        self.in_cycle = Gauge(
            "background_sync_cycle_running",
            "1 while a cycle runs.",
            registry=self.registry,
        )
        self.database_up = Gauge(
            "background_sync_database_up",
            "1 when the last database unit of work succeeded.",
            registry=self.registry,
        )
        self.health = Gauge(
            "background_sync_health",
            "1 for the daemon's current health state (healthy, warning, degraded, ...).",
            ["state"],
            registry=self.registry,
        )
        self.show_health("healthy")
        self.paused = Gauge(
            "background_sync_paused",
            "1 while an operator's pause holds (read from the database every 2 s).",
            registry=self.registry,
        )
        self.last_success = Gauge(
            "background_sync_last_successful_cycle_timestamp_seconds",
            "When the last cycle that ran through its due list finished (Unix time); "
            "users failing one by one do not keep it from counting.",
            registry=self.registry,
        )
        self.calls = BackendCalls()
        self.registry.register(self.calls)
        self._circuit = Gauge(
            "background_sync_circuit_state",
            "1 for the circuit breaker's current state (closed, open, half_open).",
            ["state"],
            registry=self.registry,
        )
        self._credentials = Gauge(
            "background_sync_backend_credentials_rejected",
            "1 while the backend rejects our credentials (401/403 in the last cycle).",
            registry=self.registry,
        )
        self._cycle_due = Gauge(
            "background_sync_cycle_users_due",
            "Users due when the running cycle started (0 while idle).",
            registry=self.registry,
        )
        self._cycle_done = Gauge(
            "background_sync_cycle_users_done",
            "Users the running cycle has finished with, whatever the outcome (0 while idle).",
            registry=self.registry,
        )
        self.cycle_started = Gauge(
            "background_sync_cycle_started_timestamp_seconds",
            "When the running or last cycle started (Unix time).",
            registry=self.registry,
        )
        self.instances = Gauge(
            "background_sync_instances",
            "Instances sharing the database, by state (lost: silent without stopping).",
            ["state"],
            registry=self.registry,
        )
        self.show_instances({})
        self.concurrency_limit = Gauge(
            "background_sync_concurrency_limit",
            "Backend calls this instance lets be in flight at once now (adaptive).",
            registry=self.registry,
        )
        self.concurrency_max = Gauge(
            "background_sync_concurrency_max",
            "The most backend calls in flight at once (SYNC_CONCURRENCY).",
            registry=self.registry,
        )
        self.latency_baseline = Gauge(
            "background_sync_backend_latency_baseline_seconds",
            "The backend's unloaded latency as the concurrency limit measures it.",
            registry=self.registry,
        )
        self.limit_changes = Counter(
            "background_sync_concurrency_limit_changes_total",
            "Changes of the concurrency limit, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REASONS:
            self.limit_changes.labels(reason)
        self._freshness = FreshnessCollector()
        self.registry.register(self._freshness)
        self.registry.register(LogLossCollector(logsink.lines_lost))
        self.follow(circuit=lambda: "closed", credentials_rejected=bool, progress=lambda: None)

    def follow(
        self,
        *,
        circuit: Callable[[], str],
        credentials_rejected: Callable[[], bool],
        progress: Callable[[], Progress | None],
    ) -> None:
        """Read these when Prometheus scrapes: the circuit's state, whether the backend
        rejects our credentials, and the running cycle's progress (None while idle)."""
        for state in CIRCUIT_STATES:
            self._circuit.labels(state).set_function(_is_now(circuit, state))
        self._credentials.set_function(lambda: float(credentials_rejected()))
        self._cycle_due.set_function(lambda: _counter(progress(), "total"))
        self._cycle_done.set_function(lambda: _counter(progress(), "done"))

    def show_freshness(self, f: Freshness) -> None:
        """A new freshness measurement (once per cycle and at start-up)."""
        self._freshness.latest = f

    def show_due(self, due: int) -> None:
        """Users due now, counted with the freshness measurement."""
        self._freshness.due = due

    def show_instances(self, counts: Mapping[str, int]) -> None:
        """Instances by state, from the sync_instances table (every control poll)."""
        for state in (*INSTANCE_STATES, *counts):
            self.instances.labels(state).set(counts.get(state, 0))

    def show_concurrency(self, limiter: Limiter, reason: str | None = None) -> None:
        """Set at start and at each change of the limit (never per call)."""
        self.concurrency_limit.set(limiter.limit)
        self.concurrency_max.set(limiter.maximum)
        if limiter.baseline_s is not None:
            self.latency_baseline.set(limiter.baseline_s)
        if reason is not None:
            self.limit_changes.labels(reason).inc()

    def show_health(self, state: str) -> None:
        """One series per state, 1 for the current one (so alerts can match on the label)."""
        for name in HealthState:
            self.health.labels(name.value).set(1 if name.value == state else 0)

    def cycle_starting(self, at: datetime) -> None:
        self.in_cycle.set(1)
        self.cycle_started.set(at.timestamp())

    def record(self, report: Report, finished_at: float) -> None:
        self.cycles.labels(report.outcome).inc()
        self.cycle_seconds.observe(report.duration_s)
        self.users.labels("success").inc(report.succeeded)
        self.users.labels("failed").inc(report.failed)
        self.users.labels("skipped").inc(report.skipped)
        if report.completed:
            self.last_success.set(finished_at)


def _is_now(current: Callable[[], str], state: str) -> Callable[[], float]:
    return lambda: float(current() == state)


def _counter(progress: Progress | None, name: str) -> float:
    return 0.0 if progress is None else float(getattr(progress, name))
