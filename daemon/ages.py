"""Durations and moments as an operator reads them at a glance: "3 min", "5 s ago".

Every view that prints an age (STATUS=, `status`, the logs viewer) uses these, so the
same moment never reads "180 s" in one place and "3 min" in another.
"""

from __future__ import annotations

from datetime import datetime

_UNITS = (("d", 86400), ("h", 3600), ("min", 60))


def span(seconds: float | None) -> str:
    """5 s, 3 min, 2 h, 4 d: whole units, the largest that fits twice (so 90 s, not 1 min)."""
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    for unit, size in _UNITS:
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def ago(moment: datetime | None, now: datetime) -> str:
    """ "3 min ago", "in 40 s" for a moment still ahead, "never" for none."""
    if moment is None:
        return "never"
    delta = (now - moment).total_seconds()
    return f"{span(delta)} ago" if delta >= 0 else f"in {span(-delta)}"
