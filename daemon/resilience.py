"""Protecting the backend: a circuit breaker, an instance-wide slow-down, a rate limit.

A sick backend must not be hammered harder by its own clients. Three rules, all applied
before each HTTP attempt by the one Gate every call of the instance passes:

- Circuit breaker: SYNC_MAX_CONSECUTIVE_FAILURES transport errors or 5xx in a row open
  it; while open nothing is sent; after SYNC_CIRCUIT_RESET_SECONDS exactly one probe is
  let through (half-open); its success closes the circuit, its failure re-opens it.
  Only answers to calls started in the breaker's current state count (see Breaker).
- Retry-After on a 429 or 503 slows every call of the instance, not just that user's.
- SYNC_MAX_REQUESTS_PER_SECOND, when set, is a token bucket over all calls.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Awaitable, Callable

from daemon.backend import Gate, GateClosed, Ticket
from daemon.logs import get_logger


class CircuitOpen(GateClosed):
    """The circuit breaker is open: the backend is not being called."""


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """The circuit breaker's state machine; pure, with time passed in.

    closed --threshold failures in a row--> open --reset time passed, one caller
    admitted as the probe--> half-open --probe healthy--> closed
                                        --probe failed or abandoned--> open (timer anew)

    Every change of state starts a new epoch, and each admitted call carries the epoch
    it was admitted in (its Ticket). An answer counts only if its ticket is of the
    current epoch: a call started while closed that answers after the circuit opened
    (or after it closed again) says nothing about the backend's health now, so a late
    success cannot close an open circuit and a late failure cannot re-open a fresh one.
    While open no ticket is handed out; while half-open only the probe holds one, so
    only the probe's answer decides.
    """

    def __init__(self, threshold: int, reset_seconds: float) -> None:
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self.state = State.CLOSED
        self.epoch = 0
        self.failures = 0
        self.opened_at: float | None = None

    def admit(self, now: float) -> Ticket | None:
        """A ticket for a call that may go out now, or None when none may.

        The first caller after the reset time turns the circuit half-open and gets the
        probe ticket; while that probe is out, everyone else gets None.
        """
        if self.state is State.CLOSED:
            return Ticket(self.epoch)
        if self.state is State.OPEN and self.reopens_in(now) <= 0:
            self._enter(State.HALF_OPEN)
            return Ticket(self.epoch, probe=True)
        return None

    def current(self, ticket: Ticket) -> bool:
        """Was this ticket handed out in the present state (so its answer counts)?"""
        return ticket.epoch == self.epoch

    def record(self, ticket: Ticket, healthy: bool, now: float) -> State | None:
        """Account one answer; return the new state if it changed.

        Answers to calls admitted in an earlier state are ignored.
        """
        if not self.current(ticket):
            return None
        if self.state is State.HALF_OPEN and healthy:
            return self._enter(State.CLOSED)
        if healthy:
            self.failures = 0
            return None
        self.failures += 1
        if self.state is State.HALF_OPEN or self.failures >= self.threshold:
            return self._open(now)
        return None

    def abandon(self, ticket: Ticket, now: float) -> State | None:
        """A call ended without an answer (cancelled). A lost probe re-opens the circuit,
        with a fresh reset time, instead of leaving it half-open with no probe out."""
        if ticket.probe and self.current(ticket) and self.state is State.HALF_OPEN:
            return self._open(now)
        return None

    def reopens_in(self, now: float) -> float:
        """Seconds until the next probe may go out; 0 unless open."""
        if self.state is not State.OPEN or self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.reset_seconds - now)

    def _open(self, now: float) -> State:
        self.opened_at = now
        return self._enter(State.OPEN)

    def _enter(self, state: State) -> State:
        self.state = state
        self.epoch += 1
        if state is State.CLOSED:
            self.failures = 0
        return state


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
        self.stale_answers = 0  # answers from an earlier state, ignored by the breaker
        self._clock = clock
        self._sleep = sleep
        self._changed = asyncio.Event()  # set (and replaced) at every change of state
        self._log = get_logger(component="circuit")

    @property
    def state(self) -> State:
        return self.breaker.state

    def probe_in(self) -> float | None:
        """Seconds until the next probe (0 when it is due) while open; None otherwise."""
        if self.breaker.state is not State.OPEN:
            return None
        return self.breaker.reopens_in(self._clock())

    def describe(self) -> str | None:
        """The circuit's part of STATUS= and `status`, or None while it is closed."""
        wait = self.probe_in()
        if wait is not None:
            return f"circuit open, probe in {math.ceil(wait)} s"
        if self.breaker.state is State.HALF_OPEN:
            return "circuit half-open, one probe in flight"
        return None

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

    async def wait(self) -> Ticket:
        """Return a ticket when a call may go out; raise CircuitOpen when none may.

        While a probe is out, callers wait for its verdict (bounded by the probe's own
        request timeout, as declared in BackendClient), then go on if it closed the
        circuit or get CircuitOpen if it re-opened it.
        """
        while True:
            now = self._clock()
            ticket = self.breaker.admit(now)
            if ticket is None:
                if self.breaker.state is State.HALF_OPEN:
                    await self._changed.wait()
                    continue
                raise CircuitOpen(
                    f"circuit open, probe in {math.ceil(self.breaker.reopens_in(now))} s"
                )
            if ticket.probe:
                self._changed_state()
                self._log.info("circuit_half_open", detail="sending one probe")
            try:
                await self._take_turn(now)
            except BaseException:
                self.abandon(ticket)  # a probe cancelled here must not leave it half-open
                raise
            if self.breaker.current(ticket):
                return ticket
            # The circuit changed state while this call waited for its turn: ask again.

    async def _take_turn(self, now: float) -> None:
        """Wait out a Retry-After pause of the instance, then the rate limit."""
        pause = self.paused_until - now
        if pause > 0:
            await self._sleep(pause)
        if self.bucket is not None:
            delay = self.bucket.delay(self._clock())
            if delay > 0:
                await self._sleep(delay)

    def abandon(self, ticket: Ticket) -> None:
        if self.breaker.abandon(ticket, self._clock()) is State.OPEN:
            self._changed_state()
            self._log.warning(
                "circuit_probe_abandoned",
                detail="the probe ended without an answer; the circuit is open again",
                reset_s=self.breaker.reset_seconds,
            )

    def record(self, ticket: Ticket, healthy: bool, retry_after: float | None) -> None:
        now = self._clock()
        if retry_after:
            until = now + retry_after
            if until > self.paused_until:
                self.paused_until = until
                self._log.warning("backend_slow_down", pause_s=round(retry_after, 3))
        if not self.breaker.current(ticket):
            self.stale_answers += 1
            self._log.debug(
                "circuit_stale_answer_ignored",
                healthy=healthy,
                circuit=self.breaker.state.value,
                detail="the call was started before the circuit last changed state",
            )
            return
        changed = self.breaker.record(ticket, healthy, now)
        if changed is None:
            return
        self._changed_state()
        if changed is State.OPEN:
            self._log.error(
                "circuit_opened",
                consecutive_failures=self.breaker.failures,
                probe=ticket.probe,
                reset_s=self.breaker.reset_seconds,
            )
        elif changed is State.CLOSED:
            self._log.info("circuit_closed")

    def _changed_state(self) -> None:
        """Wake everyone waiting for the probe's verdict; later waiters wait anew."""
        self._changed.set()
        self._changed = asyncio.Event()
