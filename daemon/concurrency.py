"""The instance's concurrency limit applied to its backend calls: slots, and what feeds them.

One `Concurrency` lives as long as the process, so what a cycle learned about the
backend (the limit, the latency baseline) carries into the next cycle. A cycle's callers
take a slot before each call and give it back with the call's outcome; at most `limit`
slots are out at once. The rule itself is `daemon.limiter.Limiter`, pure and tested on
its own; this module is the asyncio and the reporting around it: a change of the limit
is logged and shown in metrics, never a single call.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from daemon.limiter import Change, Limiter
from daemon.logs import get_logger
from daemon.settings import Settings
from daemon.values import Outcome

# The final answers that say "too much": rate limited or unavailable. A timeout or a
# connection error has no status and counts too (see `dropped`).
DROP_STATUSES = frozenset({429, 503})


def dropped(outcome: Outcome, status: int | None, attempts: int, circuit_open: bool) -> bool:
    """Did this call meet a backend that could not take it: its last answer a 429 or 503,
    or none at all (a timeout, a reset)? Retries alone are not a drop: a user the
    backend fails with 500 is retried on every cycle, and at an 8 % error rate counting
    those pinned the limit at its minimum. An overloaded backend that answers after a
    retry shows in the latency, which the window's median compares with the baseline."""
    if circuit_open:
        return False  # refused by our own breaker: the backend was not asked
    if status in DROP_STATUSES:
        return True
    return status is None and outcome is Outcome.FAILED


class Concurrency:
    """Slots for backend calls, as many as the limiter allows; reports every change."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_change: Callable[[Limiter, Change], None] = lambda limiter, change: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.limiter = Limiter(
            minimum=settings.min_concurrency,
            maximum=settings.concurrency,
            adaptive=settings.adaptive_concurrency,
            now=clock(),
        )
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._on_change = on_change
        self._log = get_logger(component="concurrency")

    @property
    def limit(self) -> int:
        return self.limiter.limit

    def configure(self, settings: Settings) -> None:
        """New settings (SIGHUP): the range and the switch change, the learning stays."""
        change = self.limiter.configure(
            minimum=settings.min_concurrency,
            maximum=settings.concurrency,
            adaptive=settings.adaptive_concurrency,
            now=self._clock(),
        )
        self._changed(change)

    async def acquire(self) -> float:
        """Wait for a free slot; return the monotonic time the call starts at."""
        while self.in_flight >= self.limiter.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake()  # it had been handed a wake-up: pass it on
                raise
        self.in_flight += 1
        return self._clock()

    def release(
        self, started: float, *, dropped: bool | None = None, latency_counts: bool = True
    ) -> None:
        """Give the slot back; `dropped` None means the call has no verdict (cancelled)."""
        in_flight = self.in_flight
        self.in_flight -= 1
        if dropped is not None:
            change = self.limiter.sample(
                started=started,
                finished=self._clock(),
                in_flight=in_flight,
                dropped=dropped,
                latency_counts=latency_counts,
            )
            self._changed(change)
        self._wake()

    def _changed(self, change: Change | None) -> None:
        if change is None:
            return
        self._log.info(
            "concurrency_limit_changed",
            old=change.old,
            new=change.new,
            reason=change.reason,
            baseline_ms=None if change.baseline_s is None else round(change.baseline_s * 1000, 1),
        )
        self._on_change(self.limiter, change)
        self._wake()

    def _wake(self) -> None:
        """Wake as many waiters as there are free slots; each re-checks on waking."""
        free = self.limiter.limit - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def as_dict(self) -> dict[str, object]:
        return {**self.limiter.as_dict(), "in_flight": self.in_flight}
