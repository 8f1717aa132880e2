"""The backlog of one cycle: claimed users waiting for a caller.

Its own object so that the order rule (taken-over users first, then the scan's pages in
order, then one end marker per caller) and the bound on how far ahead leases are taken
are read and tested in one place.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any

from daemon.values import Claim

# The end marker: a caller that gets it stops. It sorts after every claim.
DONE = object()
# How far ahead a cycle leases: about this long of calls, so that no caller waits for
# the next claim transaction, and no longer, so that instances sharing a database split
# the last users evenly (a claim holds its users until this instance's callers get to
# them). Never fewer than AT_LEAST_PER_CALLER per caller, never more than a claim batch.
AHEAD_SECONDS = 1.0
AT_LEAST_PER_CALLER = 2


def room(batch_size: int, concurrency: int, call_seconds: float | None) -> int:
    """How many claims a cycle's backlog holds, given how long a call takes (None before
    the first one ended): AHEAD_SECONDS of calls, within the bounds above."""
    least = min(batch_size, AT_LEAST_PER_CALLER * concurrency)
    if call_seconds is None or call_seconds <= 0:
        return max(1, least)
    ahead = math.ceil(concurrency * AHEAD_SECONDS / call_seconds)
    return max(1, least, min(batch_size, ahead))


class Backlog:
    """Claims waiting for a caller: taken-over users first, then the scan's pages.

    The scan's side is bounded (the claimer waits for room, so leases are not taken far
    ahead of need); taken-over users go to the front, because their lease already ran
    out once and they have waited longest.

    A claimer waiting for room is woken when the backlog has drained to half of it, not
    at every claim taken: it then fills half a room at once, rather than being woken,
    putting one claim and waiting again for each user called.
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

    def resize(self, room: int) -> None:
        """A new bound (the calls got faster or slower); claims already queued stay."""
        self._room = max(1, room)
        if self.free() >= self._wanted:
            self._freed.set()

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
