"""The backlog of one cycle: claimed users waiting for a caller.

Its own object so that the order rule (taken-over users first, then the scan's pages in
order, then one end marker per caller) and the bound on how far ahead leases are taken
are read and tested in one place.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from daemon.values import Claim

# The end marker: a caller that gets it stops. It sorts after every claim.
DONE = object()
# Claims waiting per caller, at most: enough that no caller waits for the next claim
# transaction, few enough that instances sharing a database split the last users evenly
# (a claim holds its users until this instance's callers get to them).
AHEAD_PER_CALLER = 4


def room(batch_size: int, concurrency: int) -> int:
    """How many claims a cycle's backlog holds: SYNC_CLAIM_BATCH_SIZE, and no more than
    AHEAD_PER_CALLER for each of the SYNC_CONCURRENCY callers."""
    return max(1, min(batch_size, AHEAD_PER_CALLER * concurrency))


class Backlog:
    """Claims waiting for a caller: taken-over users first, then the scan's pages.

    The scan's side is bounded (the claimer waits for room, so leases are not taken far
    ahead of need); taken-over users go to the front, because their lease already ran
    out once and they have waited longest.
    """

    _URGENT, _SCAN, _LAST = 0, 1, 2

    def __init__(self, room: int) -> None:
        self._queue: asyncio.PriorityQueue[tuple[int, int, Any]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._room = room
        self._freed = asyncio.Event()
        self._wanted = 1  # free places the waiting claimer needs before it is woken

    @property
    def room(self) -> int:
        return self._room

    def free(self) -> int:
        return max(0, self._room - self._queue.qsize())

    async def wait_for_room(self, places: int) -> int:
        """Until at least `places` are free (at most the room); return how many are.

        The claimer leases only what fits, so no lease waits in its hands for room.
        """
        self._wanted = max(1, min(places, self._room))
        while self.free() < self._wanted:
            self._freed.clear()
            await self._freed.wait()
        return self.free()

    async def put(self, claim: Claim) -> None:
        await self.wait_for_room(1)
        self._queue.put_nowait((self._SCAN, next(self._order), claim))

    def put_urgent(self, claim: Claim) -> None:
        self._queue.put_nowait((self._URGENT, next(self._order), claim))

    def put_done(self) -> None:
        """The end marker for one caller; it sorts after every claim."""
        self._queue.put_nowait((self._LAST, next(self._order), DONE))

    async def get(self) -> Any:
        item = (await self._queue.get())[2]
        if self.free() >= self._wanted:
            self._freed.set()
        return item

    def empty(self) -> bool:
        return self._queue.empty()
