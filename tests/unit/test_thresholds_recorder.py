"""When an instance rewrites its recorded settings text (daemon.thresholds.Recorder).

The control poll writes the instance row every 2 s, but the settings text only when it
no longer holds: its moments count from its own `as_of`, so a text that names the same
next cycle stays true while the heartbeat moves on.
"""

from __future__ import annotations

import json

from daemon import thresholds
from daemon.settings import Settings

SETTINGS = Settings(database_url="sqlite://", stale_after_seconds=60, quarantine_after=3)


class Clocks:
    """A monotonic and a wall clock that move together unless the wall clock steps."""

    def __init__(self) -> None:
        self.monotonic = 1000.0
        self.wall = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += seconds


def recorder(clocks: Clocks) -> thresholds.Recorder:
    return thresholds.Recorder(monotonic=lambda: clocks.monotonic, wall=lambda: clocks.wall)


def poll(rec: thresholds.Recorder, live: thresholds.Live, settings: Settings = SETTINGS) -> bool:
    """One poll: whether it writes the text (and then the row holds it)."""
    record = rec.record(settings, live)
    if record.changed:
        rec.written(record)
    return record.changed


def test_an_idle_instance_writes_its_text_once_while_the_next_cycle_stays_put() -> None:
    clocks = Clocks()
    rec = recorder(clocks)
    writes = []
    for second in range(0, 58, 2):
        clocks.advance(2)
        writes.append(poll(rec, thresholds.Live(next_cycle_in_s=3000 - second)))
    assert writes == [True] + [False] * (len(writes) - 1)


def test_the_text_is_rewritten_when_a_moment_moves_a_fact_changes_or_the_clock_steps() -> None:
    clocks = Clocks()
    rec = recorder(clocks)
    assert poll(rec, thresholds.Live(next_cycle_in_s=300))
    clocks.advance(2)
    assert not poll(rec, thresholds.Live(next_cycle_in_s=298.5))  # within the tolerance
    assert poll(rec, thresholds.Live(next_cycle_in_s=100))  # rescheduled (reload, force)
    assert not poll(rec, thresholds.Live(next_cycle_in_s=100))
    assert poll(rec, thresholds.Live(next_cycle_in_s=100, probe_in_s=30))  # circuit opened
    assert poll(rec, thresholds.Live(next_cycle_in_s=100, probe_in_s=30, in_flight=2))
    assert poll(
        rec,
        thresholds.Live(next_cycle_in_s=100, probe_in_s=30, in_flight=2),
        Settings(database_url="sqlite://", stale_after_seconds=120, quarantine_after=3),
    )  # reloaded thresholds
    clocks.wall += 30  # the host's clock stepped: the database's (SQLite) did too
    assert poll(
        rec,
        thresholds.Live(next_cycle_in_s=100, probe_in_s=30, in_flight=2),
        Settings(database_url="sqlite://", stale_after_seconds=120, quarantine_after=3),
    )


def test_the_text_is_rewritten_at_least_every_minute_and_after_a_failed_poll() -> None:
    clocks = Clocks()
    rec = recorder(clocks)
    live = thresholds.Live(next_cycle_in_s=None, run_id="r1", in_flight=1)
    assert poll(rec, live)
    clocks.advance(thresholds.REWRITE_AT_LEAST_SECONDS - 1)
    assert not poll(rec, live)
    clocks.advance(1)
    assert poll(rec, live)
    rec.forget()  # a poll failed: what the row holds is unknown
    assert poll(rec, live)


def test_the_text_with_its_as_of_is_json_that_reads_back_with_the_moment_apart() -> None:
    live = thresholds.Live(in_flight=2, next_cycle_in_s=12.34, health_reasons=("a", "b"))
    parts = thresholds.parts(SETTINGS, live)
    text = parts.text("2026-12-01 15:56:22.822787")
    found = thresholds.load(text)
    assert found == thresholds.load(thresholds.dump(SETTINGS, live, "2026-12-01 15:56:22.822787"))
    assert found["stale_after_seconds"] == 60
    assert found["live"]["next_cycle_in_s"] == 12.3
    assert found["live"]["health_reasons"] == ["a", "b"]
    assert thresholds.recorded_at(found) is not None
    assert thresholds.recorded_at(found).isoformat() == "2026-12-01T15:56:22.822787+00:00"
    assert thresholds.recorded_at(json.loads(thresholds.dump(SETTINGS, live))) is None
    assert thresholds.recorded_at({"live": {"as_of": "not a time"}}) is None
