"""/metrics of a running daemon, as Prometheus' own tools read it.

The daemon runs as a subprocess against an SQLite file and a reference backend that fails
8 % of the calls; once a cycle has run (so every series exists, the per-call ones
included), its live /metrics is checked with `promtool check metrics`, and scraped by a
real Prometheus server (Debian's `prometheus` package) on a free loopback port, whose
HTTP API must answer what the daemon's /status says.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.conftest import Harness, Proc, wait_until

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

pytestmark = pytest.mark.skipif(
    not Path("/proc").is_dir(), reason="needs a Linux process model (signals, /proc)"
)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


def _daemon_after_a_cycle(harness: Harness) -> str:
    """The status URL of a daemon that has run one cycle with failures and measured
    freshness after it."""
    harness.database(users=60)
    backend = harness.start_backend(latency_ms=5, error_rate=0.08, seed=8)
    env = harness.env(backend, SYNC_INTERVAL_SECONDS="3600", SYNC_MAX_RETRIES="0")
    daemon = harness.start_daemon(env)
    daemon.wait_for_event("cycle_finished")
    daemon.wait_for_event("freshness_measured", count=2)  # at start-up, and after the cycle
    return harness.status_url(daemon)


def test_live_metrics_pass_promtool_check_metrics(harness: Harness) -> None:
    """Prometheus' own linter finds nothing to say about a live /metrics."""
    base = _daemon_after_a_cycle(harness)
    text = _get(base + "/metrics")
    for name in (
        "background_sync_backend_request_duration_seconds_bucket",
        "background_sync_user_staleness_seconds_bucket",
        "background_sync_circuit_state",
        "background_sync_instances",
        "background_sync_fresh_ratio",
        "background_sync_users_due",
    ):
        assert name.encode() in text, f"{name} missing from /metrics"
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False
    )
    problems = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0 and not problems.strip(), problems


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _query(api: str, expression: str) -> list[dict[str, Any]]:
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    answer = json.loads(_get(url))
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def _value(api: str, expression: str) -> float | None:
    """The one sample's value, or None while Prometheus has none."""
    result = _query(api, expression)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_a_prometheus_server_scrapes_the_daemon_and_answers_what_status_says(
    harness: Harness,
) -> None:
    base = _daemon_after_a_cycle(harness)
    target = base.removeprefix("http://")
    tsdb = Path(tempfile.mkdtemp(prefix="bs-prometheus-"))
    config = harness.tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: background-sync\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = _free_port()
    prometheus = Proc(
        "prometheus",
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tsdb}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        env={"PATH": "/usr/bin:/bin"},
        cwd=harness.tmp,
    )
    harness.procs.append(prometheus)
    api = f"http://127.0.0.1:{port}"
    try:

        def target_up() -> bool:
            with contextlib.suppress(OSError, ValueError):
                targets = json.loads(_get(api + "/api/v1/targets"))["data"]["activeTargets"]
                return any(t["health"] == "up" for t in targets)
            assert prometheus.alive, prometheus.tail()
            return False

        wait_until(target_up, what="Prometheus to scrape the daemon", describe=prometheus.tail)
        status = json.loads(_get(base + "/status"))
        stats, freshness = status["statistics"], status["freshness"]
        expected = {
            'background_sync_users_total{outcome="success"}': stats["users_succeeded"],
            'background_sync_users_total{outcome="failed"}': stats["users_failed"],
            "background_sync_table_users": freshness["users"],
            f'background_sync_health{{state="{status["health"]}"}}': 1.0,
            "sum(background_sync_health)": 1.0,
            'background_sync_circuit_state{state="closed"}': 1.0,
            "sum(background_sync_instances)": 1.0,  # this daemon, from the database
        }
        for expression, wanted in expected.items():
            wait_until(
                lambda e=expression, w=wanted: _value(api, e) == w,  # type: ignore[misc]
                what=f"Prometheus to answer {expression} = {wanted}",
                describe=lambda e=expression: f"it answers {_query(api, e)}",  # type: ignore[misc]
            )
        ratio = _value(api, "background_sync_fresh_ratio")
        assert ratio == pytest.approx(freshness["fresh_ratio"], abs=1e-6)
        assert stats["users_failed"] > 0  # the backend's errors reached the metrics too
    finally:
        if prometheus.alive:
            prometheus.signal(signal.SIGTERM)
            prometheus.wait_exit()
        shutil.rmtree(tsdb, ignore_errors=True)
