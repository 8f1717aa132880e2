"""The backlog between claimer and callers: how far ahead leases are taken, and when."""

from __future__ import annotations

import asyncio

from daemon import backlog
from daemon.backlog import Backlog
from daemon.values import Claim


def claim(n: int) -> Claim:
    return Claim(n, str(n), f"user{n}@example.com", f"token{n}")


def test_the_backlog_holds_about_a_second_of_calls_within_its_bounds() -> None:
    # 8 callers, calls of 200 ms: 40 calls a second.
    assert backlog.room(batch_size=256, concurrency=8, call_seconds=0.2) == 40
    # 32 callers, calls of 50 ms: 640 a second, but never more than a claim batch.
    assert backlog.room(batch_size=256, concurrency=32, call_seconds=0.05) == 256
    # Slow calls: still 2 per caller, so that no caller waits for a claim transaction.
    assert backlog.room(batch_size=256, concurrency=8, call_seconds=5.0) == 16
    assert backlog.room(batch_size=10, concurrency=8, call_seconds=5.0) == 10


def test_before_any_call_ended_the_backlog_holds_two_per_caller() -> None:
    assert backlog.room(batch_size=256, concurrency=8, call_seconds=None) == 16
    assert backlog.room(batch_size=1, concurrency=1, call_seconds=None) == 1


async def test_a_larger_room_wakes_the_waiting_claimer() -> None:
    queue = Backlog(room=4)
    for n in range(4):
        await queue.put(claim(n))
    waiting = asyncio.create_task(queue.wait_for_room(2))
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.resize(8)
    assert await asyncio.wait_for(waiting, 1) == 4


async def test_the_claimer_is_woken_only_once_half_the_room_is_free_and_told_how_much() -> None:
    queue = Backlog(room=8)
    for n in range(8):
        await queue.put(claim(n))
    waiting = asyncio.create_task(queue.wait_for_room(4))
    for _ in range(3):
        await queue.get()
        await asyncio.sleep(0)
    assert not waiting.done()
    await queue.get()
    assert await asyncio.wait_for(waiting, 1) == 4


async def test_an_empty_backlog_offers_its_whole_room_at_once() -> None:
    queue = Backlog(room=8)
    assert await asyncio.wait_for(queue.wait_for_room(4), 1) == 8
    assert await asyncio.wait_for(queue.wait_for_room(100), 1) == 8  # never more than the room
