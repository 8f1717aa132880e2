"""What an operator sees of an open circuit: STATUS=, `status`, and a silent backend."""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest

from tests.acceptance.conftest import Harness, wait_until

pytestmark = pytest.mark.skipif(
    not Path("/proc").is_dir() or not hasattr(signal, "SIGUSR1"),
    reason="needs a Linux process model (signals, /proc, unix sockets)",
)

RESET_SECONDS = 120
PROBE_IN = re.compile(r"circuit open, probe in (\d+) s")


def test_status_says_the_circuit_is_open_and_when_it_probes(harness: Harness) -> None:
    harness.database(users=10)
    backend = harness.start_backend(error_rate=1.0)
    env = harness.env(
        backend,
        SYNC_INTERVAL_SECONDS=3600,
        SYNC_CONCURRENCY=1,
        SYNC_MAX_RETRIES=0,
        SYNC_MAX_CONSECUTIVE_FAILURES=2,
        SYNC_CIRCUIT_RESET_SECONDS=RESET_SECONDS,
    )
    daemon = harness.start_daemon(env)
    opened = daemon.wait_for_event("circuit_opened")

    def probe_lines() -> list[tuple[float, int]]:
        return [
            (d.at, int(match.group(1)))
            for d in harness.notify.messages("STATUS", since=opened["_at"])
            if (match := PROBE_IN.search(d.get("STATUS") or ""))
        ]

    first_at, first_n = wait_until(
        lambda: next(iter(probe_lines()), None),
        what="a STATUS= line saying when the circuit probes",
        describe=harness.describe,
    )
    # The circuit opened after the daemon started and the line was sent before the test
    # read it, so the true wait lies between these two bounds.
    assert math.floor(RESET_SECONDS - (first_at - daemon.started)) <= first_n <= RESET_SECONDS
    # It counts down with the time that really passes.
    wait_until(
        lambda: any(n < first_n for _, n in probe_lines()),
        what="the probe countdown to go down",
        describe=harness.notify.dump,
    )

    def instance_row() -> dict[str, str] | None:
        shown = harness.cli("status", "--json", env=env)
        assert shown.returncode in (0, 4), shown.stderr  # healthy, then degraded: circuit open
        [row] = json.loads(shown.stdout)["instances"]
        return row if PROBE_IN.search(row["status"] or "") else None

    row = wait_until(instance_row, what="`status` to show the open circuit", describe=daemon.tail)
    assert row["circuit"] == "open"
    assert backend.stats()["requests"] == 2  # while open, nothing is sent

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
