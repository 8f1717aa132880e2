"""Circuit breaker, slow-down and rate limit: pure state machines with time injected."""

from __future__ import annotations

import asyncio

import pytest

from daemon.resilience import BackendGate, Breaker, CircuitOpen, State, TokenBucket


def test_consecutive_failures_open_the_circuit_and_a_success_resets_the_count() -> None:
    breaker = Breaker(threshold=3, reset_seconds=60)
    breaker.record(False, now=0)
    breaker.record(False, now=1)
    breaker.record(True, now=2)
    breaker.record(False, now=3)
    breaker.record(False, now=4)
    assert breaker.state is State.CLOSED
    assert breaker.record(False, now=5) is State.OPEN
    assert not breaker.allow(now=6)


def test_after_the_reset_time_exactly_one_probe_goes_out() -> None:
    breaker = Breaker(threshold=1, reset_seconds=60)
    breaker.record(False, now=0)
    assert not breaker.allow(now=59)
    assert breaker.allow(now=60)
    assert breaker.state is State.HALF_OPEN
    assert not breaker.allow(now=60.1)  # a second caller waits for the probe


def test_a_failed_probe_reopens_and_a_successful_one_closes() -> None:
    breaker = Breaker(threshold=1, reset_seconds=10)
    breaker.record(False, now=0)
    assert breaker.allow(now=10)
    assert breaker.record(False, now=11) is State.OPEN
    assert breaker.reopens_in(now=12) == pytest.approx(9)
    assert breaker.allow(now=21)
    assert breaker.record(True, now=22) is State.CLOSED
    assert breaker.allow(now=22)


def test_token_bucket_spaces_calls_to_the_rate() -> None:
    bucket = TokenBucket(rate=10)
    delays = [bucket.delay(now=0.0) for _ in range(15)]
    assert delays[:10] == [0.0] * 10  # the burst
    assert delays[10:] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert bucket.delay(now=10.0) == 0.0  # refilled


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_retry_after_slows_every_caller_of_the_instance() -> None:
    time = FakeTime()
    gate = BackendGate(
        threshold=5, reset_seconds=60, max_per_second=None, clock=time.clock, sleep=time.sleep
    )
    gate.record(True, retry_after=7)
    await gate.wait()
    await gate.wait()
    assert time.slept == [7]  # the second caller came after the pause had passed


async def test_an_open_gate_refuses_calls_until_the_probe_time() -> None:
    time = FakeTime()
    gate = BackendGate(
        threshold=2, reset_seconds=30, max_per_second=None, clock=time.clock, sleep=time.sleep
    )
    gate.record(False, None)
    gate.record(False, None)
    with pytest.raises(CircuitOpen, match="next probe in 30s"):
        await gate.wait()
    time.now = 30
    await gate.wait()  # the probe
    waiter = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    assert not waiter.done()  # everyone else waits for the probe's verdict
    gate.record(True, None)
    await asyncio.wait_for(waiter, 1)
    assert gate.state is State.CLOSED


async def test_an_abandoned_probe_lets_the_next_caller_probe() -> None:
    time = FakeTime()
    gate = BackendGate(
        threshold=1, reset_seconds=5, max_per_second=None, clock=time.clock, sleep=time.sleep
    )
    gate.record(False, None)
    time.now = 5
    await gate.wait()
    waiter = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    gate.abandon()  # the probe was cancelled before any answer
    await asyncio.wait_for(waiter, 1)
    assert gate.breaker.probing
