"""What ended a cycle before its due list, and the outcome its run row gets.

A cycle learns on the way why it may not finish (a halt: the circuit opened or the
backend refused our credentials; an operator's pause; a schema problem), and decides at
its end what that makes of the run: succeeded, failed, paused, interrupted or crashed.
Both live here, apart from the tasks that run the cycle, so that the outcome rule is a
pure function read and tested in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Ending:
    """Why the running cycle stops short, as far as it knows so far."""

    halt: str | None = None  # calls stopped for the rest of the cycle, and why
    circuit_open: bool = False
    auth_rejected: bool = False
    paused: bool = False  # an operator's pause was seen
    released_for_pause: int = 0  # claimed users given back unattempted by the pause
    schema_error: str | None = None

    def halt_for(self, reason: str) -> bool:
        """Halt with `reason` unless halted already; True if this is the first halt."""
        if self.halt is not None:
            return False
        self.halt = reason
        return True


@dataclass(frozen=True, slots=True)
class Tally:
    """A cycle's counts at its end, as the outcome rule reads them."""

    claimed: int
    done: int
    failed: int
    unrecorded: int
    stopped: bool  # a stop (SIGTERM) was requested


def decide(ending: Ending, tally: Tally, error: str | None) -> tuple[str, str | None]:
    """The run's outcome and its error text.

    `error` is what ended the cycle from outside its calls (a database or schema error,
    a bug). A cycle is "succeeded" only when it attempted every user it claimed and
    every result is recorded; a pause is never "failed" (nothing went wrong) and never
    "succeeded" (due users were left for after `resume`).
    """
    if ending.halt is not None:
        return "failed", error or ending.halt
    if error is not None:
        return "crashed", error
    if tally.stopped and tally.done < tally.claimed:
        return "interrupted", None
    if ending.paused:
        released = ending.released_for_pause
        return "paused", f"paused by an operator; {released} claimed user(s) released"
    if tally.done < tally.claimed or tally.failed or tally.unrecorded:
        return "failed", None
    return "succeeded", None
