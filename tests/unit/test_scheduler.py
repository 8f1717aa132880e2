"""The scheduler only asks for cycles; it never runs or queues one itself."""

from __future__ import annotations

import datetime as dt
import types

import pytest
import schedule

from daemon.scheduler import IDLE_LOOK_SECONDS, Scheduler, loop_wait


def test_a_due_tick_calls_back_once_and_rearms() -> None:
    ticks: list[int] = []
    scheduler = Scheduler(300, lambda: ticks.append(1))
    scheduler.poll()
    assert ticks == []
    job = scheduler._schedule.jobs[0]
    job.next_run = dt.datetime.now() - dt.timedelta(seconds=1)
    scheduler.poll()
    scheduler.poll()
    assert ticks == [1]
    assert 295 <= scheduler.seconds_until_next() <= 300


def test_reschedule_applies_the_new_interval_from_now() -> None:
    scheduler = Scheduler(300, lambda: None)
    scheduler.reschedule(5)
    assert scheduler.seconds_until_next() <= 5
    assert len(scheduler._schedule.jobs) == 1


class Clocks:
    """A wall clock that can be stepped and a monotonic clock that only runs."""

    def __init__(self) -> None:
        self.wall = dt.datetime(2026, 12, 1, 12, 0)  # naive local time, as `schedule` keeps
        self.mono = 5000.0

    def run(self, seconds: float) -> None:
        """Time passes: both clocks move on."""
        self.wall += dt.timedelta(seconds=seconds)
        self.mono += seconds

    def step_wall(self, seconds: float) -> None:
        """Someone sets the wall clock; no time passes."""
        self.wall += dt.timedelta(seconds=seconds)


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> Clocks:
    """Fake clocks, and `schedule` made to read the same wall clock as the Scheduler."""
    clocks = Clocks()

    class Wall(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
            assert tz is None
            return clocks.wall

    seen_by_schedule = types.ModuleType("datetime")
    seen_by_schedule.__dict__.update(vars(dt))
    seen_by_schedule.datetime = Wall  # type: ignore[attr-defined]
    monkeypatch.setattr(schedule, "datetime", seen_by_schedule)
    return clocks


def ticking(clocks: Clocks, interval: float) -> tuple[Scheduler, list[float]]:
    ticks: list[float] = []
    scheduler = Scheduler(
        interval,
        lambda: ticks.append(clocks.mono),
        wall=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
    )
    return scheduler, ticks


def test_ticks_keep_their_interval_on_unstepped_clocks(clocks: Clocks) -> None:
    scheduler, ticks = ticking(clocks, 300)
    start = clocks.mono
    for _ in range(900):
        clocks.run(1)
        scheduler.poll()
    assert ticks == [start + 300, start + 600, start + 900]


def test_a_wall_clock_stepped_back_an_hour_does_not_hold_the_next_tick_back(
    clocks: Clocks,
) -> None:
    scheduler, ticks = ticking(clocks, 300)
    start = clocks.mono
    clocks.run(100)
    scheduler.poll()
    clocks.step_wall(-3600)
    scheduler.poll()
    assert ticks == []
    assert scheduler.seconds_until_next() == 200
    clocks.run(199)
    scheduler.poll()
    assert ticks == []
    assert scheduler.seconds_until_next() == 1
    clocks.run(1)
    scheduler.poll()
    assert ticks == [start + 300]
    assert scheduler.seconds_until_next() == 300
    for _ in range(300):
        clocks.run(1)
        scheduler.poll()
    assert ticks == [start + 300, start + 600]


def test_a_wall_clock_stepped_forward_an_hour_does_not_fire_the_next_tick_early(
    clocks: Clocks,
) -> None:
    scheduler, ticks = ticking(clocks, 300)
    start = clocks.mono
    clocks.run(100)
    clocks.step_wall(3600)
    scheduler.poll()
    assert ticks == []
    assert scheduler.seconds_until_next() == 200
    clocks.run(200)
    scheduler.poll()
    scheduler.poll()
    assert ticks == [start + 300]
    assert scheduler.seconds_until_next() == 300


def test_a_step_seen_first_by_the_status_line_still_moves_the_timetable(
    clocks: Clocks,
) -> None:
    scheduler, ticks = ticking(clocks, 300)
    clocks.run(100)
    clocks.step_wall(-3600)
    assert scheduler.seconds_until_next() == 200
    clocks.run(200)
    scheduler.poll()
    assert len(ticks) == 1


def test_drift_below_the_tolerance_is_not_taken_for_a_step(clocks: Clocks) -> None:
    scheduler, ticks = ticking(clocks, 300)
    clocks.run(100)
    clocks.step_wall(0.5)  # NTP slewing or reading the two clocks a moment apart
    scheduler.poll()
    assert scheduler.seconds_until_next() == 199.5
    clocks.run(199.5)
    scheduler.poll()
    assert len(ticks) == 1


def test_an_idle_loop_sleeps_until_the_next_tick_not_a_second_at_a_time() -> None:
    assert loop_wait(cycle_running=False, until_tick=42.5, busy_every=1.0) == 42.5


def test_a_running_cycle_keeps_the_loop_looking_every_busy_period() -> None:
    assert loop_wait(cycle_running=True, until_tick=42.5, busy_every=1.0) == 1.0


def test_an_idle_loop_never_sleeps_past_the_idle_bound_or_below_zero() -> None:
    assert loop_wait(cycle_running=False, until_tick=3600, busy_every=1.0) == IDLE_LOOK_SECONDS
    assert loop_wait(cycle_running=False, until_tick=None, busy_every=1.0) == IDLE_LOOK_SECONDS
    assert loop_wait(cycle_running=False, until_tick=-0.2, busy_every=1.0) == 0.0
