"""The thresholds a running instance judges by, as it records them for `status`.

`status` runs in whatever shell an operator has: its environment may say nothing of the
daemon's SYNC_STALE_AFTER_SECONDS or SYNC_QUARANTINE_AFTER, so counting due or
quarantined users with it would give another answer than the daemon's (5 due in one
shell, 0 in the other, on the same database). Each instance therefore writes the values
it uses into its row (`sync_instances.settings`, JSON) at every control poll, with what
it knows of the moment (`live`: calls in flight, seconds to the next cycle and to the
next probe), and `status` judges with the newest live instance's.

The thresholds sit at the top level under their Settings names, so any reader can take
`json.loads(row.settings)["quarantine_after"]`; the moment's facts sit under `live`.
Times in `live` are seconds from the row's heartbeat, which is the database's clock, so
a host whose clock is off still records true moments.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.settings import Settings

# The settings that decide what `status` shows: who is due, quarantined, fresh, how
# fast a cycle may go. Names absent from this build's Settings are left out.
NAMES = (
    "interval_seconds",
    "stale_after_seconds",
    "quarantine_after",
    "quarantine_probe_seconds",
    "freshness_target_seconds",
    "freshness_objective",
    "concurrency",
    "min_concurrency",
    "lease_seconds",
    "request_timeout_seconds",
    "max_retries",
    "max_consecutive_failures",
    "circuit_reset_seconds",
)


@dataclass(frozen=True)
class Live:
    """What an instance knows at the moment it writes its row. `in_flight` counts the
    backend calls holding a concurrency slot, not the users claimed."""

    in_flight: int = 0
    run_id: str | None = None
    next_cycle_in_s: float | None = None
    probe_in_s: float | None = None
    health_reasons: tuple[str, ...] = ()
    # The adaptive concurrency limit, its last reason and the latency baseline
    # (daemon.limiter.Limiter.as_dict).
    concurrency: Mapping[str, Any] | None = None


def dump(settings: Settings, live: Live) -> str:
    """The JSON text of an instance's `settings` column."""
    found: dict[str, Any] = {
        name: getattr(settings, name) for name in NAMES if hasattr(settings, name)
    }
    found["live"] = {
        "in_flight": live.in_flight,
        "run_id": live.run_id,
        "next_cycle_in_s": _seconds(live.next_cycle_in_s),
        "probe_in_s": _seconds(live.probe_in_s),
        "health_reasons": list(live.health_reasons),
        "concurrency": None if live.concurrency is None else dict(live.concurrency),
    }
    return json.dumps(found, sort_keys=True)


def load(text: str | None) -> dict[str, Any]:
    """An instance row's settings as a dict; {} for none or for text that is not JSON."""
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def of_settings(settings: Settings) -> dict[str, Any]:
    """This environment's thresholds, in the same form, when no instance runs."""
    return {name: getattr(settings, name) for name in NAMES if hasattr(settings, name)}


def number(found: Mapping[str, Any], name: str, default: float) -> float:
    """A threshold from a recorded dict, or `default` when missing or not a number."""
    value = found.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return default
    return float(value)


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(max(0.0, value), 1)
