"""Progress of the running cycle, and whether it is stalled.

Every wait inside a cycle is bounded (an HTTP timeout, a backoff sleep, a database
unit's retry budget). Each wait registers the moment by which it must be over; the cycle
is stalled when one of them overruns its bound. That is what decides whether systemd's
watchdog is fed: a cycle that is merely slow keeps the pings going, a wedged one stops
them and systemd restarts the daemon.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STALL_GRACE_SECONDS = 5.0


@dataclass
class Progress:
    """Counters for STATUS= and `status`, plus the registry of bounded waits."""

    clock: Callable[[], float] = time.monotonic
    total: int = 0
    claimed: int = 0
    done: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    _deadlines: dict[int, tuple[float, str]] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @contextmanager
    def bounded(self, seconds: float, what: str) -> Iterator[None]:
        """Declare that the enclosed wait ends within `seconds`."""
        token = next(self._ids)
        self._deadlines[token] = (self.clock() + seconds, what)
        try:
            yield
        finally:
            del self._deadlines[token]

    def overdue(self, grace: float = STALL_GRACE_SECONDS) -> str | None:
        """The first wait that overran its bound by more than `grace`, or None."""
        now = self.clock()
        for deadline, what in self._deadlines.values():
            if now > deadline + grace:
                return what
        return None

    def status_line(self) -> str:
        line = f"syncing {self.done} of {max(self.total, self.claimed)}"
        return f"{line}, failed {self.failed}" if self.failed else line
