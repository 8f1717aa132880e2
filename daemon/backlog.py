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
        self._low_water = room // 2
        self._freed = asyncio.Event()

    async def put(self, claim: Claim) -> None:
        while self._queue.qsize() >= self._room:
            self._freed.clear()
            await self._freed.wait()
        self._queue.put_nowait((self._SCAN, next(self._order), claim))

    def put_urgent(self, claim: Claim) -> None:
        self._queue.put_nowait((self._URGENT, next(self._order), claim))

    def put_done(self) -> None:
        """The end marker for one caller; it sorts after every claim."""
        self._queue.put_nowait((self._LAST, next(self._order), DONE))

    async def get(self) -> Any:
        item = (await self._queue.get())[2]
        if self._queue.qsize() <= self._low_water:
            self._freed.set()
        return item

    def empty(self) -> bool:
        return self._queue.empty()
