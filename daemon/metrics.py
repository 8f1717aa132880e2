"""Prometheus metrics, updated once per cycle and per state change, never per request.

Per-user counters are fed from the cycle's Report, so a 20,000-user cycle costs a few
metric updates rather than 20,000 lock round-trips on the hot path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from daemon.freshness import Freshness
from daemon.health import HealthState
from daemon.values import Report


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.users = Counter(
            "background_sync_users_total",
            "Users processed, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.cycles = Counter(
            "background_sync_cycles_total",
            "Cycles run, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
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
            "When the last cycle without failures finished (Unix time).",
            registry=self.registry,
        )

        self.fresh_ratio = Gauge(
            "background_sync_fresh_ratio",
            "Share of users synced within the freshness target (0 to 1).",
            registry=self.registry,
        )
        self.users_overdue = Gauge(
            "background_sync_users_overdue",
            "Users not synced within the freshness target, never-synced ones included.",
            registry=self.registry,
        )
        self.oldest_overdue = Gauge(
            "background_sync_oldest_overdue_age_seconds",
            "Age of the oldest overdue user's last_sync (0 when none is overdue).",
            registry=self.registry,
        )

    def show_freshness(self, found: Freshness) -> None:
        self.fresh_ratio.set(found.fresh_ratio)
        self.users_overdue.set(found.overdue)
        self.oldest_overdue.set(found.oldest_overdue_s or 0.0)

    def show_health(self, state: str) -> None:
        """One series per state, 1 for the current one (so alerts can match on the label)."""
        for name in HealthState:
            self.health.labels(name.value).set(1 if name.value == state else 0)

    def record(self, report: Report, finished_at: float) -> None:
        self.cycles.labels(report.outcome).inc()
        self.cycle_seconds.observe(report.duration_s)
        self.users.labels("success").inc(report.succeeded)
        self.users.labels("failed").inc(report.failed)
        self.users.labels("skipped").inc(report.skipped)
        if report.outcome == "succeeded":
            self.last_success.set(finished_at)
