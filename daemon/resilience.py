"""Protecting the backend: a circuit breaker, an instance-wide slow-down, a rate limit.

A sick backend must not be hammered harder by its own clients. Three rules, all applied
before each HTTP attempt by the one Gate every call of the instance passes:

- Circuit breaker: SYNC_MAX_CONSECUTIVE_FAILURES transport errors or 5xx in a row open
  it; while open nothing is sent; after SYNC_CIRCUIT_RESET_SECONDS exactly one probe is
  let through (half-open); its success closes the circuit, its failure re-opens it.
- Retry-After on a 429 or 503 slows every call of the instance, not just that user's.
- SYNC_MAX_REQUESTS_PER_SECOND, when set, is a token bucket over all calls.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable

from daemon.backend import Gate, GateClosed
from daemon.logs import get_logger


class CircuitOpen(GateClosed):
    """The circuit breaker is open: the backend is not being called."""


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """The circuit breaker's state machine; pure, with time passed in."""

    def __init__(self, threshold: int, reset_seconds: float) -> None:
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self.state = State.CLOSED
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    def allow(self, now: float) -> bool:
        """May a call go out now? In half-open state only the one probe may."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if self.opened_at is not None and now - self.opened_at >= self.reset_seconds:
                self.state = State.HALF_OPEN
                self.probing = False
            else:
                return False
        if self.probing:
            return False
        self.probing = True
        return True

    def record(self, healthy: bool, now: float) -> State | None:
        """Account one attempt; return the new state if it changed."""
        before = self.state
        if healthy:
            self.failures = 0
            self.state = State.CLOSED
            self.probing = False
        else:
            self.failures += 1
            if self.state is State.HALF_OPEN or self.failures >= self.threshold:
                self.state = State.OPEN
                self.opened_at = now
                self.probing = False
        return self.state if self.state is not before else None

    def reopens_in(self, now: float) -> float:
        if self.state is not State.OPEN or self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.reset_seconds - now)


class TokenBucket:
    """At most `rate` calls per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.tokens = self.burst
        self.updated: float | None = None

    def delay(self, now: float) -> float:
        """Take a token; return how long the caller must wait before using it."""
        if self.updated is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class BackendGate(Gate):
    """The Gate of a running daemon: breaker, slow-down and rate limit together."""

    def __init__(
        self,
        *,
        threshold: int,
        reset_seconds: float,
        max_per_second: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.breaker = Breaker(threshold, reset_seconds)
        self.bucket = TokenBucket(max_per_second) if max_per_second else None
        self.paused_until = 0.0
        self._clock = clock
        self._sleep = sleep
        self._probe_done = asyncio.Event()
        self._log = get_logger(component="circuit")

    @property
    def state(self) -> State:
        return self.breaker.state

    def configure(
        self, *, threshold: int, reset_seconds: float, max_per_second: float | None
    ) -> None:
        """New settings (SIGHUP) without forgetting the circuit's current state."""
        self.breaker.threshold = threshold
        self.breaker.reset_seconds = reset_seconds
        if not max_per_second:
            self.bucket = None
        elif self.bucket is None or self.bucket.rate != max_per_second:
            self.bucket = TokenBucket(max_per_second)

    async def wait(self) -> None:
        """Return when a call may go out; raise CircuitOpen when none may."""
        while True:
            now = self._clock()
            if not self.breaker.allow(now):
                if self.breaker.state is State.HALF_OPEN:
                    # Someone else is probing: wait for its verdict, then ask again.
                    self._probe_done.clear()
                    await self._probe_done.wait()
                    continue
                raise CircuitOpen(
                    f"circuit open, next probe in {self.breaker.reopens_in(now):.0f}s"
                )
            if self.breaker.state is State.HALF_OPEN:
                self._log.info("circuit_half_open", detail="sending one probe")
            pause = self.paused_until - now
            if pause > 0:
                await self._sleep(pause)
            if self.bucket is not None:
                delay = self.bucket.delay(self._clock())
                if delay > 0:
                    await self._sleep(delay)
            return

    def abandon(self) -> None:
        if self.breaker.probing:
            self.breaker.probing = False
            self._probe_done.set()

    def record(self, healthy: bool, retry_after: float | None) -> None:
        now = self._clock()
        if retry_after:
            until = now + retry_after
            if until > self.paused_until:
                self.paused_until = until
                self._log.warning("backend_slow_down", pause_s=round(retry_after, 3))
        changed = self.breaker.record(healthy, now)
        self._probe_done.set()
        if changed is State.OPEN:
            self._log.error(
                "circuit_opened",
                consecutive_failures=self.breaker.failures,
                reset_s=self.breaker.reset_seconds,
            )
        elif changed is State.CLOSED:
            self._log.info("circuit_closed")
