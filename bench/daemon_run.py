"""The daemon as measured: `python -m daemon once`, its JSON log read back.

The work wall time is the cycle's own (`cycle_finished.duration_ms`); the CPU is the
whole process's, from `/usr/bin/time -v`, like every other client's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from bench.procs import daemon_command
from bench.workload import daemon_environment

NAME = "daemon"


def command() -> list[str]:
    return daemon_command("once")


def environment(database_url: str, backend_url: str, concurrency: int) -> dict[str, str]:
    return daemon_environment(database_url, backend_url, concurrency)


def read_log(path: Path) -> dict[str, Any]:
    """What one `once` logged: cycle_finished, and the count of each event and level."""
    events: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    finished: dict[str, Any] = {}
    with path.open(encoding="utf-8", errors="replace") as log:
        for line in log:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                events["<not json>"] += 1
                continue
            if not isinstance(record, dict):
                continue
            event = str(record.get("event"))
            events[event] += 1
            levels[str(record.get("level"))] += 1
            if event == "cycle_finished":
                finished = record
    return {
        "succeeded": finished.get("succeeded"),
        "failed": finished.get("failed"),
        "outcome": finished.get("outcome"),
        "work_wall_s": (finished["duration_ms"] / 1000 if "duration_ms" in finished else None),
        "success_lines": events["user_synced"],
        "events": dict(events),
        "levels": dict(levels),
    }
