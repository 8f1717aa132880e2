"""The backlog between claimer and callers: how far ahead leases are taken, and when."""

from __future__ import annotations

import asyncio

from daemon import backlog
from daemon.backlog import Backlog
from daemon.values import Claim


def claim(n: int) -> Claim:
    return Claim(n, str(n), f"user{n}@example.com", f"token{n}")


def test_the_backlog_holds_four_claims_per_caller_and_never_more_than_a_batch() -> None:
    assert backlog.room(batch_size=256, concurrency=8) == 32
    assert backlog.room(batch_size=16, concurrency=8) == 16
    assert backlog.room(batch_size=256, concurrency=100) == 256
    assert backlog.room(batch_size=1, concurrency=1) == 1


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
