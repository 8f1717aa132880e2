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
Times in `live` are seconds from `live.as_of`, the database's time of the write that
stored the text (the row's heartbeat at that moment; rows without it count from the
heartbeat), so a host whose clock is off still records true moments.

The text is not rewritten at every poll (`Recorder`): only when something in it changes,
when a moment it names (the next cycle, the next probe) moves by more than
REWRITE_TOLERANCE_SECONDS, when this host's clock steps, and at least every
REWRITE_AT_LEAST_SECONDS. Between rewrites the heartbeat moves on and the text stays
true, because its times count from its own `as_of`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
# The key of the database time, within `live`, that the seconds in `live` count from.
AS_OF = "as_of"
# A recorded moment that moved by more than this, or this host's clock stepping by more,
# rewrites the text; `status` shows these moments to the second.
REWRITE_TOLERANCE_SECONDS = 1.0
# Rewritten at least this often anyway: a step of the database server's clock, which this
# process cannot see, misplaces the recorded moments for no longer than this.
REWRITE_AT_LEAST_SECONDS = 60.0


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


def dump(settings: Settings, live: Live, as_of: str | None = None) -> str:
    """The JSON text of an instance's `settings` column, with `as_of` if given."""
    if as_of is None:
        found = of_settings(settings)
        found["live"] = _live(live)
        return json.dumps(found, sort_keys=True)
    return parts(settings, live).text(as_of)


@dataclass(frozen=True)
class Parts:
    """The JSON text around `live.as_of`: the statement that writes it puts the database's
    time between `head` and `tail` (daemon.control), the same instant as the heartbeat."""

    head: str
    tail: str

    def text(self, as_of: str) -> str:
        return self.head + as_of + self.tail


def parts(settings: Settings, live: Live) -> Parts:
    found = json.dumps(of_settings(settings), sort_keys=True)
    moment = json.dumps(_live(live), sort_keys=True)
    # '{...' + ', "live": {...' + ', "as_of": "' <time> '"}}'
    head = _opened(found) + '"live": ' + _opened(moment) + f'"{AS_OF}": "'
    return Parts(head=head, tail='"}}')


def _opened(obj: str) -> str:
    """A JSON object's text without its closing brace, ready for one more member."""
    return obj[:-1] + (", " if obj != "{}" else "")


def _live(live: Live) -> dict[str, Any]:
    return {
        "in_flight": live.in_flight,
        "run_id": live.run_id,
        "next_cycle_in_s": _seconds(live.next_cycle_in_s),
        "probe_in_s": _seconds(live.probe_in_s),
        "health_reasons": list(live.health_reasons),
        "concurrency": None if live.concurrency is None else dict(live.concurrency),
    }


@dataclass(frozen=True)
class _Moment:
    """What a recorded text says, in a form that does not move while it stays true: the
    moments as this process's monotonic time."""

    values: tuple[Any, ...]
    facts: tuple[Any, ...]
    next_cycle_at: float | None
    probe_at: float | None
    clock_offset: float  # wall clock minus monotonic clock: moves when the clock steps
    at: float  # monotonic


@dataclass
class Record:
    """This poll's settings text, built only if it is written (`parts`)."""

    settings: Settings
    live: Live
    changed: bool  # the row's text no longer holds: the poll's UPDATE must write it
    moment: _Moment
    _parts: Parts | None = field(default=None, repr=False)

    def parts(self) -> Parts:
        if self._parts is None:
            self._parts = parts(self.settings, self.live)
        return self._parts


def record(settings: Settings, live: Live) -> Record:
    """A text to write in any case (for one-off reports)."""
    return Recorder().record(settings, live)


class Recorder:
    """Decides at each poll whether the row's settings text has to be rewritten."""

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._written: _Moment | None = None
        self._settings: Settings | None = None
        self._values: tuple[Any, ...] = ()

    def record(self, settings: Settings, live: Live) -> Record:
        now = self._monotonic()
        if settings is not self._settings:  # a reload replaces the object
            self._settings = settings
            self._values = tuple(getattr(settings, n) for n in NAMES if hasattr(settings, n))
        concurrency = live.concurrency
        moment = _Moment(
            values=self._values,
            facts=(
                live.in_flight,
                live.run_id,
                tuple(live.health_reasons),
                None if concurrency is None else tuple(concurrency.items()),
            ),
            next_cycle_at=_at(now, live.next_cycle_in_s),
            probe_at=_at(now, live.probe_in_s),
            clock_offset=self._wall() - now,
            at=now,
        )
        written = self._written
        changed = (
            written is None
            or moment.values != written.values
            or moment.facts != written.facts
            or _moved(moment.next_cycle_at, written.next_cycle_at)
            or _moved(moment.probe_at, written.probe_at)
            or abs(moment.clock_offset - written.clock_offset) > REWRITE_TOLERANCE_SECONDS
            or moment.at - written.at >= REWRITE_AT_LEAST_SECONDS
        )
        return Record(settings, live, changed, moment)

    def written(self, done: Record) -> None:
        """`done`'s text is in the row now."""
        self._written = done.moment

    def forget(self) -> None:
        """What the row holds is unknown (a failed poll): the next poll rewrites it."""
        self._written = None


def _at(now: float, seconds: float | None) -> float | None:
    return None if seconds is None else now + max(0.0, seconds)


def _moved(now: float | None, then: float | None) -> bool:
    if now is None or then is None:
        return (now is None) != (then is None)
    return abs(now - then) > REWRITE_TOLERANCE_SECONDS


def load(text: str | None) -> dict[str, Any]:
    """An instance row's settings as a dict; {} for none or for text that is not JSON."""
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def recorded_at(recorded: Mapping[str, Any]) -> datetime | None:
    """The database time `live`'s seconds count from (UTC), None if not recorded."""
    live = recorded.get("live")
    value = live.get(AS_OF) if isinstance(live, Mapping) else None
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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
