"""The cycle timetable, on `schedule`: it decides when a cycle is due, never runs one.

A tick only asks the app for a cycle. Whether one starts is the app's decision, so a
tick that arrives while a cycle runs is skipped and logged, never queued or overlapped.
"""

from __future__ import annotations

from collections.abc import Callable

import schedule


class Scheduler:
    """Ticks every `interval` seconds; `poll()` is called from the app's loop."""

    def __init__(self, interval: float, on_tick: Callable[[], None]) -> None:
        self._on_tick = on_tick
        self._schedule = schedule.Scheduler()
        self.interval = interval
        self._arm()

    def _arm(self) -> None:
        self._schedule.clear()
        # `schedule` is annotated for whole seconds but computes with timedelta, so a
        # fractional interval works as expected.
        self._schedule.every(self.interval).seconds.do(self._on_tick)  # type: ignore[arg-type]

    def reschedule(self, interval: float) -> None:
        """Apply a new interval (SIGHUP), counting from now."""
        self.interval = interval
        self._arm()

    def poll(self) -> None:
        """Fire the tick if it is due."""
        self._schedule.run_pending()

    def seconds_until_next(self) -> float:
        idle = self._schedule.idle_seconds
        return max(0.0, idle) if idle is not None else self.interval
