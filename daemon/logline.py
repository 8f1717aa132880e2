"""How one log record reads for a person: the short form of the console and of `logs`.

The JSON lines keep every field for machines; a person scanning a terminal needs far
less. Two things made the console hard to read: a 32-character run_id on every line,
and every per-user line carrying every field of the result. Here a run_id is cut to its
first `RUN_ID_CHARS` characters (enough to tell the runs of a day apart, and a prefix
that `background-sync logs --run` accepts), and a per-user line keeps who, the outcome
(its event name), the HTTP status and the duration. Pure functions: the daemon's
console renderer and the `logs` command both call them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RUN_ID_CHARS = 8
ERROR_CHARS = 160

# Lines about one user's call; their summary is user, outcome, status, duration.
USER_EVENTS = frozenset(
    {"user_synced", "user_sync_conflict", "user_sync_failed", "backend_auth_rejected"}
    | {"backend_retry", "backend_unexpected_error", "user_sync_lease_lost", "user_sync_skipped"}
)
# What a per-user line keeps, in this order; the rest (e.g. the backend's counts) is
# in the JSON line.
_USER_FIELDS = (
    *("user_id", "status", "duration_ms", "delay_ms", "attempts", "error", "reason"),
    "held_s",  # a failed circuit probe: how long the user waits
)
# Handled by the renderer itself (level column, event column, tracebacks).
_RENDERER_KEYS = ("timestamp", "level", "event", "exc_info", "exception", "stack")


def short_run_id(run_id: object) -> object:
    """The first characters of a run_id; anything else unchanged."""
    if isinstance(run_id, str) and len(run_id) > RUN_ID_CHARS:
        return run_id[:RUN_ID_CHARS]
    return run_id


def short_time(timestamp: object) -> object:
    """`2026-12-01T12:48:18.123456Z` -> `2026-12-01 12:48:18` (UTC, like the JSON)."""
    if isinstance(timestamp, str) and len(timestamp) >= 19 and timestamp[10] == "T":
        return f"{timestamp[:10]} {timestamp[11:19]}"
    return timestamp


def short_error(error: object) -> object:
    """An error message on one line, cut to `ERROR_CHARS` (the JSON line has all of it)."""
    if not isinstance(error, str):
        return error
    text = " ".join(error.split())
    if len(text) > ERROR_CHARS:
        return text[: ERROR_CHARS - 1] + "…"
    return text


def for_people(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `record` worth a person's line, in reading order (a new dict)."""
    event = record.get("event")
    out: dict[str, Any] = {k: record[k] for k in _RENDERER_KEYS if k in record}
    if "timestamp" in out:
        out["timestamp"] = short_time(out["timestamp"])
    if event in USER_EVENTS:
        source = dict(record)
        attempt = source.get("attempt")
        if event != "backend_retry" and isinstance(attempt, int) and attempt > 1:
            source["attempts"] = attempt  # a user that needed retries is worth knowing
        kept = {k: source[k] for k in _USER_FIELDS if k in source}
    else:
        kept = {k: v for k, v in record.items() if k not in _RENDERER_KEYS}
    kept.pop("run_id", None)
    if "user_id" in kept:  # who, first
        out["user_id"] = kept.pop("user_id")
    out.update(kept)
    if "error" in out:
        out["error"] = short_error(out["error"])
    if "run_id" in record:  # last: the least read, and the same on every line of a cycle
        out["run_id"] = short_run_id(record["run_id"])
    return out
