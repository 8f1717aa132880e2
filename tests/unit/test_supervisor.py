"""The side-task supervisor: no side task dies in silence, none is restarted for ever."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from daemon.supervisor import Supervisor


class FakeTime:
    """A clock that only moves when the supervisor sleeps: restarts cost no real time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def supervisor(
    time: FakeTime,
    fatal: list[tuple[str, BaseException]],
    *,
    max_restarts: int = 5,
    window_seconds: float = 300.0,
) -> Supervisor:
    return Supervisor(
        lambda name, error: fatal.append((name, error)),
        max_restarts=max_restarts,
        window_seconds=window_seconds,
        clock=time.clock,
        sleep=time.sleep,
    )


async def wait_for(condition: object, *, turns: int = 1000) -> None:
    for _ in range(turns):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_a_side_task_that_raises_is_logged_and_restarted_with_growing_delays() -> None:
    time, fatal = FakeTime(), []
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) <= 3:
            raise RuntimeError(f"poll failed #{len(runs)}")
        await asyncio.Event().wait()  # the fourth run works and keeps running

    side = supervisor(time, fatal)
    with capture_logs() as logs:
        side.start("control", flaky)
        await wait_for(lambda: len(runs) == 4)
        await side.close()
    failed = [e for e in logs if e["event"] == "side_task_failed"]
    assert [e["error"] for e in failed] == [
        "RuntimeError('poll failed #1')",
        "RuntimeError('poll failed #2')",
        "RuntimeError('poll failed #3')",
    ]
    assert all(e["task"] == "control" for e in failed)
    assert time.sleeps == sorted(time.sleeps) and time.sleeps[0] < time.sleeps[-1]
    assert fatal == []


async def test_a_side_task_that_returns_counts_as_a_failure() -> None:
    time, fatal = FakeTime(), []
    calls: list[int] = []

    async def returns() -> None:
        calls.append(1)
        if len(calls) > 1:
            await asyncio.Event().wait()

    side = supervisor(time, fatal)
    with capture_logs() as logs:
        side.start("watchdog", returns)
        await wait_for(lambda: len(calls) == 2)
        await side.close()
    (failed,) = [e for e in logs if e["event"] == "side_task_failed"]
    assert failed["error"] == "TaskEnded('watchdog ended unexpectedly')"


async def test_a_side_task_that_keeps_failing_ends_the_daemon_through_on_fatal() -> None:
    time, fatal = FakeTime(), []

    async def broken() -> None:
        raise ValueError("always")

    side = supervisor(time, fatal, max_restarts=3, window_seconds=3600)
    with capture_logs() as logs:
        side.start("control", broken)
        await wait_for(lambda: bool(fatal))
        await side.close()
    assert [name for name, _ in fatal] == ["control"]
    assert isinstance(fatal[0][1], ValueError)
    assert len([e for e in logs if e["event"] == "side_task_failed"]) == 3
    assert [e["task"] for e in logs if e["event"] == "side_task_gave_up"] == ["control"]


async def test_failures_spread_wider_than_the_window_never_add_up() -> None:
    time, fatal = FakeTime(), []
    runs: list[int] = []

    async def fails_now_and_then() -> None:
        runs.append(1)
        time.now += 1000  # each run lasts longer than the window before it fails
        raise RuntimeError("occasional")

    side = supervisor(time, fatal, max_restarts=2, window_seconds=60)
    side.start("control", fails_now_and_then)
    await wait_for(lambda: len(runs) >= 10)
    await side.close()
    assert fatal == []
    assert side_restarts_stay_low(time)


def side_restarts_stay_low(time: FakeTime) -> bool:
    """Every restart waited the first, shortest delay: the count never grew."""
    return len(set(time.sleeps)) == 1


async def test_close_cancels_every_side_task() -> None:
    time, fatal = FakeTime(), []
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    side = supervisor(time, fatal)
    side.start("control", forever)
    await asyncio.sleep(0)
    await side.close()
    assert cancelled.is_set()
