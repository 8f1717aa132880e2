"""The slots the cycle's callers take: never more out than the limit, and what a drop is."""

from __future__ import annotations

import asyncio

import pytest

from daemon.concurrency import Concurrency, dropped
from daemon.settings import load
from daemon.values import Outcome


def fixed(limit: int) -> Concurrency:
    settings = load({"SYNC_CONCURRENCY": str(limit), "SYNC_ADAPTIVE_CONCURRENCY": "false"})
    return Concurrency(settings, clock=lambda: 0.0)


async def test_a_caller_waits_while_the_limit_is_out_and_goes_when_one_comes_back() -> None:
    slots = fixed(2)
    first, second = await slots.acquire(), await slots.acquire()
    third = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    assert not third.done() and slots.in_flight == 2
    slots.release(first, dropped=False)
    await asyncio.wait_for(third, 1)
    assert slots.in_flight == 2
    slots.release(second, dropped=False)
    slots.release(third.result(), dropped=None)
    assert slots.in_flight == 0


async def test_a_caller_cancelled_while_waiting_takes_no_slot() -> None:
    slots = fixed(1)
    held = await slots.acquire()
    waiting = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slots.release(held, dropped=False)
    assert slots.in_flight == 0
    await asyncio.wait_for(slots.acquire(), 1)
    assert slots.in_flight == 1


async def test_a_wake_up_handed_to_a_cancelled_caller_passes_on() -> None:
    slots = fixed(1)
    held = await slots.acquire()
    doomed = asyncio.create_task(slots.acquire())
    patient = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release(held, dropped=False)  # wakes `doomed` first ...
    doomed.cancel()  # ... which is cancelled before it runs
    await asyncio.wait_for(patient, 1)
    assert doomed.cancelled() and slots.in_flight == 1


@pytest.mark.parametrize(
    ("outcome", "status", "attempts", "circuit_open", "expected"),
    [
        (Outcome.SUCCESS, 200, 1, False, False),
        (Outcome.FAILED, 500, 1, False, False),  # a failure of this user, not overload
        (Outcome.FAILED, 429, 1, False, True),
        (Outcome.FAILED, 503, 1, False, True),
        (Outcome.FAILED, None, 1, False, True),  # timeout or connection error
        (Outcome.SUCCESS, 200, 2, False, False),  # answered in the end: latency tells
        (Outcome.FAILED, 500, 4, False, False),  # a user the backend keeps failing
        (Outcome.FAILED, 503, 4, False, True),
        (Outcome.RELEASED, None, 0, True, False),  # our own breaker: nothing was sent
        (Outcome.CONFLICT, 409, 1, False, False),
    ],
)
def test_what_counts_as_a_drop(
    outcome: Outcome, status: int | None, attempts: int, circuit_open: bool, expected: bool
) -> None:
    assert dropped(outcome, status, attempts, circuit_open) is expected
