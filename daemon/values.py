"""The value types both sides of the daemon speak: a claim, a result, a cycle's report.

They live apart from the SQL (store) and the HTTP client (backend), so that the client
can name what it returns without importing the database layer, and metrics, health and
status read a Report without importing the cycle's machinery.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Outcome(enum.StrEnum):
    """How one claim ended: only SUCCESS moves last_sync; RELEASED and CONFLICT decide nothing."""

    SUCCESS = "success"
    FAILED = "failed"
    CONFLICT = "conflict"
    RELEASED = "released"


@dataclass(slots=True)
class Claim:
    """A user this instance holds a lease on.

    `user_id` is the id as the backend and the logs see it (a JSON number for integer
    ids, text for every other type); `row_id` is the database's own value, for the write.
    """

    user_id: int | str
    key: str
    email: str
    token: str
    claimed_at: datetime | None = None
    row_id: Any = None


@dataclass(slots=True)
class Result:
    """What happened to one claim; `finished_at` is when the backend answered.

    `run_id` is the run that made the call. A result the database did not take in time
    is recorded by a later run, and must still be filed under its own. A failure waits
    at least `backoff_at_least` seconds before the user is due again, whatever its
    backoff would be (a failed circuit probe: see `CallOutcome.hold_seconds`).
    """

    claim: Claim
    outcome: Outcome
    finished_at: datetime
    http_status: int | None = None
    attempts: int = 0
    error: str | None = None
    duration_ms: int = 0
    run_id: str = field(kw_only=True)
    backoff_at_least: float = field(default=0.0, kw_only=True)


@dataclass(slots=True)
class Finished:
    """The outcome of recording a batch: which results lost their lease on the way, and
    which users crossed into quarantine with it."""

    lease_lost: list[Result] = field(default_factory=list)
    quarantined: list[Result] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    """What one cycle did, as the app, health, metrics and status read it."""

    run_id: str
    outcome: str
    claimed: int
    succeeded: int
    failed: int
    skipped: int
    duration_s: float
    error: str | None = None
    circuit_open: bool = False
    # The database refused a statement for the shape of the users table: a config error.
    schema_error: str | None = None
    # The backend answered 401/403: the credentials, not the users, are at fault.
    auth_rejected: bool = False
    # Results the database did not take in time; the next cycle records them first,
    # each under its own run_id.
    unrecorded: tuple[Result, ...] = ()

    @property
    def completed(self) -> bool:
        """The cycle ran through its due list: every claimed user was attempted and
        recorded, nothing halted or crashed it. Users failing one by one do not count
        against it (a backend with a few bad users still completes cycles); a halt
        (circuit open, credentials rejected), a database error, a stop or a pause do."""
        if self.outcome not in ("succeeded", "failed") or self.error is not None:
            return False
        attempted = self.succeeded + self.failed + self.skipped
        return attempted >= self.claimed and not self.unrecorded
