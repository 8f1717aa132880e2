"""Long-lived side tasks, named and watched: none may die in silence.

The daemon's side tasks (the watchdog feeder, the control poll) loop until cancelled.
One that raises, or returns although it should loop for ever, is a bug or an unexpected
fault. Left alone it would leave a process that looks alive while pause, force or the
watchdog no longer work (and a later clean exit would report 0). So the supervisor logs
the error with its traceback and restarts the task after a growing delay; a task that
keeps failing (more than `max_restarts` within `window_seconds`) ends the daemon through
`on_fatal`, with a non-zero status, so that systemd restarts a clean process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from daemon import backoff
from daemon.logs import get_logger

RESTART_DELAY_SECONDS = 0.5
RESTART_DELAY_CAP_SECONDS = 30.0


class TaskEnded(RuntimeError):
    """A side task returned although it is meant to run until cancelled."""


@dataclass
class _Watched:
    name: str
    factory: Callable[[], Awaitable[None]]
    task: asyncio.Task[None] | None = None
    failures: list[float] = field(default_factory=list)  # monotonic times, in the window


class Supervisor:
    """Starts side tasks, restarts those that fail, and gives up on those that keep failing."""

    def __init__(
        self,
        on_fatal: Callable[[str, BaseException], None],
        *,
        max_restarts: int = 5,
        window_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._on_fatal = on_fatal
        self._max_restarts = max_restarts
        self._window = window_seconds
        self._clock = clock
        self._sleep = sleep
        self._watched: dict[str, _Watched] = {}
        self._log = get_logger(component="supervisor")

    def start(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """Run `factory()` as the side task `name`, for as long as the supervisor runs."""
        watched = _Watched(name, factory)
        self._watched[name] = watched
        watched.task = asyncio.create_task(self._keep(watched), name=name)

    def restarts(self, name: str) -> int:
        """How many times `name` failed within the current window (for status and tests)."""
        return len(self._watched[name].failures)

    async def _keep(self, watched: _Watched) -> None:
        while True:
            try:
                await watched.factory()
                error: BaseException = TaskEnded(f"{watched.name} ended unexpectedly")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
            now = self._clock()
            watched.failures = [t for t in watched.failures if now - t < self._window]
            watched.failures.append(now)
            count = len(watched.failures)
            if count > self._max_restarts:
                self._log.error(
                    "side_task_gave_up",
                    task=watched.name,
                    error=repr(error),
                    failures=count,
                    window_s=self._window,
                    exc_info=error,
                )
                self._on_fatal(watched.name, error)
                return
            delay = backoff.ceiling(RESTART_DELAY_SECONDS, count, RESTART_DELAY_CAP_SECONDS)
            self._log.error(
                "side_task_failed",
                task=watched.name,
                error=repr(error),
                restart_in_s=round(delay, 2),
                failures=count,
                exc_info=error,
            )
            await self._sleep(delay)
            self._log.info("side_task_restarted", task=watched.name, failures=count)

    async def close(self) -> None:
        """Cancel every side task and wait for them; nothing they raise is lost."""
        tasks = [w.task for w in self._watched.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                continue
            except Exception as exc:  # _keep handles errors itself; this would be a bug
                self._log.error("side_task_failed", task=task.get_name(), error=repr(exc))
        self._watched.clear()
