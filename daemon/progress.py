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
from dataclasses import dataclass, field

STALL_GRACE_SECONDS = 5.0


class _Bounded:
    """One registered wait; a plain class because it sits on every backend call."""

    __slots__ = ("_progress", "_seconds", "_token", "_what")

    def __init__(self, progress: Progress, seconds: float, what: str) -> None:
        self._progress = progress
        self._seconds = seconds
        self._what = what
        self._token = 0

    def __enter__(self) -> None:
        progress = self._progress
        self._token = next(progress._ids)
        progress._deadlines[self._token] = (progress.clock() + self._seconds, self._what)

    def __exit__(self, *exc_info: object) -> None:
        del self._progress._deadlines[self._token]


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

    def bounded(self, seconds: float, what: str) -> _Bounded:
        """Declare that the enclosed wait ends within `seconds` (a context manager)."""
        return _Bounded(self, seconds, what)

    def overdue(self, grace: float = STALL_GRACE_SECONDS) -> str | None:
        """The first wait that overran its bound by more than `grace`, or None."""
        now = self.clock()
        for deadline, what in self._deadlines.values():
            if now > deadline + grace:
                return what
        return None

    def status_line(self) -> str:
        if not self.claimed and not self.total:
            return "syncing: starting"
        line = f"syncing {self.done} of {max(self.total, self.claimed)}"
        return f"{line}, failed {self.failed}" if self.failed else line
