"""The monitoring shipped in docs/monitoring/ works against the metrics the daemon exposes.

The alerting rules are checked and unit-tested with promtool (Debian's prometheus
package; CI installs it), the dashboard's queries are valid PromQL, and every
`background_sync_*` name that the rules or the dashboard query is one the daemon exposes.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from daemon import freshness
from daemon.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
RULES = MONITORING / "rules.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yml"))

# The metric names of the shared specification (the daemon's documented interface).
SPECIFIED = frozenset(
    {
        "background_sync_users_total",
        "background_sync_cycles_total",
        "background_sync_cycle_duration_seconds",
        "background_sync_ticks_skipped_total",
        "background_sync_cycle_running",
        "background_sync_database_up",
        "background_sync_health",
        "background_sync_paused",
        "background_sync_last_successful_cycle_timestamp_seconds",
        "background_sync_backend_request_duration_seconds",
        "background_sync_backend_requests_total",
        "background_sync_backend_requests_in_flight",
        "background_sync_backend_credentials_rejected",
        "background_sync_circuit_state",
        "background_sync_table_users",
        "background_sync_users_due",
        "background_sync_users_overdue",
        "background_sync_users_never_synced",
        "background_sync_users_quarantined",
        "background_sync_fresh_ratio",
        "background_sync_freshness_objective_ratio",
        "background_sync_freshness_target_seconds",
        "background_sync_oldest_overdue_age_seconds",
        "background_sync_user_staleness_seconds",
        "background_sync_freshness_measured_timestamp_seconds",
        "background_sync_cycle_users_due",
        "background_sync_cycle_users_done",
        "background_sync_cycle_started_timestamp_seconds",
        "background_sync_instances",
        "background_sync_concurrency_limit",
        "background_sync_concurrency_max",
        "background_sync_backend_latency_baseline_seconds",
        "background_sync_concurrency_limit_changes_total",
    }
)
# What a family's samples add to its name: histograms, counters, gauge histograms.
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created", "_gcount", "_gsum")
_NAME = re.compile(r"\bbackground_sync_[a-z0-9_]+")
_RECORDED = re.compile(r"\bbackground_sync:[a-z0-9_:]+")


def promtool() -> str:
    found = shutil.which("promtool", path=f"{os.environ.get('PATH', '')}:/usr/bin")
    if found is None:
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run installs it)")
    return found


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


@functools.cache
def exposed_names() -> frozenset[str]:
    """Family and sample names that /metrics serves once freshness has been measured."""
    metrics = Metrics()
    # Freshness is exposed from the first measurement on (none before: a ratio of 0 that
    # nobody measured would page someone).
    staleness = tuple(range(1, len(freshness.BUCKETS_S) + 1))
    measured = freshness.Freshness(
        measured_at=datetime(2026, 12, 1, tzinfo=UTC),
        target_s=3900.0,
        objective=0.99,
        users=12,
        fresh=10,
        never_synced=1,
        quarantined=1,
        oldest_overdue_s=4000.0,
        staleness=staleness,
    )
    metrics.show_freshness(measured)
    metrics.show_due(2)
    text = generate_latest(metrics.registry).decode()
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.MULTILINE)}
    names |= {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.MULTILINE)}
    return frozenset(names)


def is_exposed(name: str, names: frozenset[str]) -> bool:
    return name in names or any(
        name.endswith(s) and name.removesuffix(s) in names for s in SUFFIXES
    )


def specified(name: str) -> bool:
    return name in SPECIFIED or any(
        name.endswith(s) and name.removesuffix(s) in SPECIFIED for s in SUFFIXES
    )


def queried_names() -> set[str]:
    return set(_NAME.findall(RULES.read_text())) | {
        n for q in dashboard_queries() for n in _NAME.findall(q)
    }


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_passes_its_promtool_unit_tests() -> None:
    assert RULE_TESTS, "no rule tests in docs/monitoring/tests"
    done = subprocess.run(
        [promtool(), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_and_has_a_runbook() -> None:
    rules = RULES.read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)$", rules, re.MULTILINE)
    tests = "".join(path.read_text() for path in RULE_TESTS)
    runbooks = (MONITORING.parent / "monitoring.md").read_text()
    assert alerts
    for alert in alerts:
        assert f"alertname: {alert}\n" in tests, f"{alert} has no promtool test"
        assert f"### {alert}\n" in runbooks, f"{alert} has no runbook in docs/monitoring.md"


def test_the_dashboard_queries_are_valid_promql() -> None:
    """promtool parses each query as a recording rule, Grafana's $__ intervals replaced."""
    rules = "groups:\n  - name: dashboard\n    rules:\n"
    for i, expr in enumerate(dashboard_queries()):
        expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
        rules += f"      - record: dashboard_query_{i}\n        expr: {json.dumps(expr)}\n"
    done = subprocess.run(
        [promtool(), "check", "rules", "/dev/stdin"],
        input=rules,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_is_a_grafana_import_with_the_datasource_as_a_variable() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        for target in panel["targets"]:
            expr = target["expr"]
            assert _NAME.search(expr) or _RECORDED.search(expr) or expr.startswith("up{"), expr


def test_recorded_series_the_dashboard_reads_are_recorded_by_the_rules() -> None:
    recorded = set(re.findall(r"^\s*- record: (\S+)$", RULES.read_text(), re.MULTILINE))
    used = {n for q in dashboard_queries() for n in _RECORDED.findall(q)}
    assert used <= recorded, used - recorded


def test_every_queried_name_is_in_the_metrics_specification() -> None:
    assert {name for name in queried_names() if not specified(name)} == set()


@pytest.mark.parametrize("name", sorted(queried_names()))
def test_every_queried_metric_is_exposed_by_the_daemon(name: str) -> None:
    assert is_exposed(name, exposed_names()), f"{name} is not exposed by daemon.metrics"
