"""The cycle timetable, on `schedule`: it decides when a cycle is due, never runs one.

A tick only asks the app for a cycle. Whether one starts is the app's decision, so a
tick that arrives while a cycle runs is skipped and logged, never queued or overlapped.

`schedule` keeps its timetable in wall-clock time (naive local `datetime.now()`), so a
clock stepped back an hour would hold every tick back an hour, and a clock stepped
forward would fire one at once. The interval is elapsed time, so ticks follow the
monotonic clock instead: every poll compares wall minus monotonic time with the last
poll's; when that offset moved, the wall clock was stepped (by NTP, an operator, a
daylight-saving change), and every job's `next_run` moves by the same step. Between
two polls the tick then stays exactly `interval` of monotonic time after the last one.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

import schedule

from daemon.logs import get_logger

# Smaller changes of the offset are slewing or the time between reading the two clocks.
STEP_TOLERANCE = dt.timedelta(seconds=1)
# The longest an idle main loop sleeps without a look, whatever the timetable says.
IDLE_LOOK_SECONDS = 60.0


class Scheduler:
    """Ticks every `interval` seconds; `poll()` is called from the app's loop.

    `wall` must be the clock `schedule` reads (the default); tests inject both clocks.
    """

    def __init__(
        self,
        interval: float,
        on_tick: Callable[[], None],
        *,
        wall: Callable[[], dt.datetime] = dt.datetime.now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_tick = on_tick
        self._wall = wall
        self._monotonic = monotonic
        self._schedule = schedule.Scheduler()
        self._log = get_logger(component="scheduler")
        self.interval = interval
        self._offset = self._read_offset()
        self._arm()

    def _arm(self) -> None:
        self._schedule.clear()
        # `schedule` is annotated for whole seconds but computes with timedelta, so a
        # fractional interval works as expected.
        self._schedule.every(self.interval).seconds.do(self._on_tick)  # type: ignore[arg-type]
        self._offset = self._read_offset()

    def _read_offset(self) -> dt.datetime:
        """Wall minus monotonic time: constant while the wall clock only runs."""
        return self._wall() - dt.timedelta(seconds=self._monotonic())

    def _follow_steps(self) -> None:
        """Move the timetable by any step of the wall clock since the last look."""
        offset = self._read_offset()
        step = offset - self._offset
        self._offset = offset
        if abs(step) <= STEP_TOLERANCE:
            return
        for job in self._schedule.jobs:
            if job.next_run is not None:
                job.next_run += step
        self._log.warning(
            "wall_clock_stepped",
            step_s=round(step.total_seconds(), 3),
            detail="cycle timetable moved with it; ticks keep their interval",
        )

    def reschedule(self, interval: float) -> None:
        """Apply a new interval (SIGHUP), counting from now."""
        self.interval = interval
        self._arm()

    def poll(self) -> None:
        """Fire the tick if it is due."""
        self._follow_steps()
        self._schedule.run_pending()

    def seconds_until_next(self) -> float:
        self._follow_steps()
        idle = self._schedule.idle_seconds
        return max(0.0, idle) if idle is not None else self.interval


def loop_wait(*, cycle_running: bool, until_tick: float | None, busy_every: float) -> float:
    """How long the app's main loop may sleep before it must look again.

    While a cycle runs, every `busy_every` seconds (its progress goes to STATUS=).
    Between cycles, until the next tick and not longer than IDLE_LOOK_SECONDS: every
    other reason to look (a signal, force, pause, a probe or retry timer, the end of a
    cycle, the control poll) wakes the loop itself, so an idle daemon does not spin.
    """
    if cycle_running:
        return busy_every
    if until_tick is None:
        return IDLE_LOOK_SECONDS
    return min(max(until_tick, 0.0), IDLE_LOOK_SECONDS)
