"""Circuit breaker, slow-down and rate limit: pure state machines with time injected."""

from __future__ import annotations

import asyncio

import pytest

from daemon.backend import Ticket
from daemon.resilience import BackendGate, Breaker, CircuitOpen, State, TokenBucket


def opened(threshold: int = 1, reset_seconds: float = 60, at: float = 0) -> Breaker:
    """A breaker that `threshold` failures opened at `at`."""
    breaker = Breaker(threshold=threshold, reset_seconds=reset_seconds)
    for _ in range(threshold):
        ticket = breaker.admit(now=at)
        assert ticket is not None
        breaker.record(ticket, False, now=at)
    assert breaker.state is State.OPEN
    return breaker


def admitted(breaker: Breaker, now: float) -> Ticket:
    ticket = breaker.admit(now)
    assert ticket is not None, f"no call admitted at {now} while {breaker.state}"
    return ticket


# -- the state table ---------------------------------------------------------------------


def test_consecutive_failures_open_the_circuit_and_a_success_resets_the_count() -> None:
    breaker = Breaker(threshold=3, reset_seconds=60)
    for now, healthy in enumerate([False, False, True, False, False]):
        breaker.record(admitted(breaker, now), healthy, now=now)
    assert breaker.state is State.CLOSED
    assert breaker.record(admitted(breaker, 5), False, now=5) is State.OPEN


def test_while_open_nothing_is_admitted_until_the_reset_time() -> None:
    breaker = opened(reset_seconds=60, at=0)
    assert breaker.admit(now=1) is None
    assert breaker.admit(now=59.9) is None
    assert breaker.state is State.OPEN
    assert breaker.reopens_in(now=20) == pytest.approx(40)


def test_half_open_admits_exactly_one_probe() -> None:
    breaker = opened(reset_seconds=60, at=0)
    probe = admitted(breaker, 60)
    assert probe.probe
    assert breaker.state is State.HALF_OPEN
    assert [breaker.admit(now=60 + i) for i in range(5)] == [None] * 5  # they wait


def test_the_probes_success_closes_the_circuit() -> None:
    breaker = opened(reset_seconds=10)
    probe = admitted(breaker, 10)
    assert breaker.record(probe, True, now=11) is State.CLOSED
    assert not admitted(breaker, 11).probe
    assert breaker.failures == 0


def test_a_failed_probe_reopens_the_circuit_with_a_fresh_reset_timer() -> None:
    breaker = opened(threshold=3, reset_seconds=10)
    probe = admitted(breaker, 10)
    assert breaker.record(probe, False, now=14) is State.OPEN  # one failure is enough
    assert breaker.reopens_in(now=14) == pytest.approx(10)
    assert breaker.admit(now=23.9) is None
    assert admitted(breaker, 24).probe


def test_a_late_success_to_a_call_started_before_the_circuit_opened_is_ignored() -> None:
    breaker = Breaker(threshold=2, reset_seconds=60)
    slow = admitted(breaker, 0)
    for now in (1, 2):
        breaker.record(admitted(breaker, now), False, now=now)
    assert breaker.state is State.OPEN
    assert breaker.record(slow, True, now=2.1) is None
    assert breaker.state is State.OPEN
    assert breaker.admit(now=3) is None


def test_a_late_failure_to_a_call_started_before_the_circuit_closed_is_ignored() -> None:
    breaker = Breaker(threshold=1, reset_seconds=10)
    slow = admitted(breaker, 0)
    breaker.record(admitted(breaker, 0), False, now=0)  # opened by another call
    probe = admitted(breaker, 10)
    breaker.record(probe, True, now=11)
    assert breaker.record(slow, False, now=12) is None  # threshold 1: it would re-open
    assert breaker.state is State.CLOSED
    assert breaker.failures == 0


def test_while_half_open_only_the_probes_answer_decides() -> None:
    breaker = Breaker(threshold=1, reset_seconds=10)
    early, late = admitted(breaker, 0), admitted(breaker, 0)
    breaker.record(admitted(breaker, 0), False, now=0)
    probe = admitted(breaker, 10)
    assert breaker.record(early, True, now=10.5) is None
    assert breaker.record(late, False, now=10.6) is None
    assert breaker.state is State.HALF_OPEN
    assert breaker.record(probe, False, now=11) is State.OPEN


def test_an_abandoned_probe_reopens_the_circuit() -> None:
    breaker = opened(reset_seconds=10)
    probe = admitted(breaker, 10)
    assert breaker.abandon(probe, now=12) is State.OPEN
    assert breaker.reopens_in(now=12) == pytest.approx(10)
    assert breaker.record(probe, True, now=13) is None  # an answer after all: too late


def test_abandoning_a_call_that_is_not_the_probe_changes_nothing() -> None:
    breaker = Breaker(threshold=1, reset_seconds=10)
    plain = admitted(breaker, 0)
    assert breaker.abandon(plain, now=1) is None
    assert breaker.state is State.CLOSED
    stale = admitted(breaker, 1)
    breaker.record(admitted(breaker, 1), False, now=1)
    admitted(breaker, 11)  # the probe
    assert breaker.abandon(stale, now=12) is None
    assert breaker.state is State.HALF_OPEN


def test_token_bucket_spaces_calls_to_the_rate() -> None:
    bucket = TokenBucket(rate=10)
    delays = [bucket.delay(now=0.0) for _ in range(15)]
    assert delays[:10] == [0.0] * 10  # the burst
    assert delays[10:] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert bucket.delay(now=10.0) == 0.0  # refilled


# -- the gate ------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def make_gate(time: FakeTime, threshold: int = 1, reset_seconds: float = 30) -> BackendGate:
    return BackendGate(
        threshold=threshold,
        reset_seconds=reset_seconds,
        max_per_second=None,
        clock=time.clock,
        sleep=time.sleep,
    )


async def open_gate(gate: BackendGate) -> None:
    for _ in range(gate.breaker.threshold):
        gate.record(await gate.wait(), False, None)
    assert gate.state is State.OPEN


async def test_retry_after_slows_every_caller_of_the_instance() -> None:
    time = FakeTime()
    gate = make_gate(time, threshold=5)
    gate.record(await gate.wait(), True, retry_after=7)
    await gate.wait()
    await gate.wait()
    assert time.slept == [7]  # the second caller came after the pause had passed


async def test_an_open_gate_refuses_calls_and_says_when_it_will_probe() -> None:
    time = FakeTime()
    gate = make_gate(time, threshold=2, reset_seconds=30)
    await open_gate(gate)
    with pytest.raises(CircuitOpen, match=r"^circuit open, probe in 30 s$"):
        await gate.wait()
    time.now = 10.2
    assert gate.describe() == "circuit open, probe in 20 s"  # 19.8 s, rounded up
    assert gate.probe_in() == pytest.approx(19.8)


async def test_callers_wait_for_the_probes_success_then_go_on() -> None:
    time = FakeTime()
    gate = make_gate(time)
    await open_gate(gate)
    time.now = 30
    probe = await gate.wait()
    assert probe.probe and gate.describe() == "circuit half-open, one probe in flight"
    waiters = [asyncio.create_task(gate.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)  # everyone else waits for the probe's verdict
    gate.record(probe, True, None)
    tickets = await asyncio.gather(*waiters)
    assert gate.state is State.CLOSED and gate.describe() is None
    assert not any(t.probe for t in tickets)


async def test_callers_waiting_for_a_failed_probe_are_refused() -> None:
    time = FakeTime()
    gate = make_gate(time)
    await open_gate(gate)
    time.now = 30
    probe = await gate.wait()
    waiters = [asyncio.create_task(gate.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    gate.record(probe, False, None)
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, CircuitOpen) for r in results), results
    assert gate.probe_in() == pytest.approx(30)


async def test_a_late_answer_while_half_open_neither_closes_nor_releases_the_waiters() -> None:
    time = FakeTime()
    gate = make_gate(time)
    slow = await gate.wait()
    await open_gate(gate)
    time.now = 30
    probe = await gate.wait()
    waiter = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    gate.record(slow, True, None)  # started before the circuit opened
    await asyncio.sleep(0)
    assert gate.state is State.HALF_OPEN and not waiter.done()
    assert gate.stale_answers == 1
    gate.record(probe, True, None)
    assert not (await waiter).probe


async def test_an_abandoned_probe_reopens_and_the_waiting_callers_are_refused() -> None:
    time = FakeTime()
    gate = make_gate(time, reset_seconds=5)
    await open_gate(gate)
    time.now = 5
    probe = await gate.wait()
    waiter = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    gate.abandon(probe)  # the probe was cancelled before any answer
    with pytest.raises(CircuitOpen):
        await waiter
    assert gate.state is State.OPEN and gate.probe_in() == pytest.approx(5)


async def test_a_probe_cancelled_while_waiting_for_its_turn_reopens_the_circuit() -> None:
    time = FakeTime()
    gate = BackendGate(
        threshold=1, reset_seconds=5, max_per_second=None, clock=time.clock, sleep=asyncio.sleep
    )
    gate.record(await gate.wait(), False, retry_after=3600)  # opens, and pauses the instance
    time.now = 5
    probe = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    assert gate.state is State.HALF_OPEN  # the probe waits out the Retry-After pause
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert gate.state is State.OPEN


async def test_a_call_waiting_for_its_turn_when_the_circuit_opens_is_not_sent() -> None:
    time = FakeTime()
    turn = asyncio.Event()

    async def sleep(seconds: float) -> None:
        await turn.wait()

    gate = BackendGate(
        threshold=1, reset_seconds=30, max_per_second=None, clock=time.clock, sleep=sleep
    )
    first, failing = await gate.wait(), await gate.wait()
    gate.record(first, True, retry_after=10)  # the instance pauses
    queued = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    gate.record(failing, False, None)  # meanwhile another call's failure opens the circuit
    turn.set()
    with pytest.raises(CircuitOpen):
        await queued
