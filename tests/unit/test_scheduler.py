"""The scheduler only asks for cycles; it never runs or queues one itself."""

from __future__ import annotations

import datetime as dt

from daemon.scheduler import Scheduler


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
