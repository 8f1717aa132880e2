"""The adaptive concurrency limit: how many backend calls may be in flight, decided per window.

Pure: no I/O, no clock of its own (every sample carries its times), so the rule can be
tested with synthetic samples. The rule (docs/architecture.md, "Adaptive concurrency"):

- A window is at least WINDOW_MIN_CALLS completed calls and twice the limit (or, for a
  slow backend, WINDOW_SECONDS with at least 3 calls). Calls started before the limit
  last changed ran under the old limit and are not counted.
- The limit starts low (Envoy's gradient controller measures its minRTT at a
  concurrency of 3) and doubles per clean window until the first cut; after that it
  grows by the square root of the limit per clean window (Envoy's headroom), but only
  while it is in use: a window in which fewer calls than the limit were ever in flight
  at once says nothing about whether more would fit (Netflix's AIMDLimit and
  Gradient2Limit do not grow when "app limited" either).
- Drops (429, 503, timeouts, connection errors; a call that needed a retry) in more than
  DROP_TOLERANCE of a window's calls cut it by BACKOFF, AIMDLimit's default backoff
  ratio.
- A window whose median latency is above LATENCY_TOLERANCE times the baseline counts
  as a drop; the cut then follows the latency gradient (baseline / median, as in
  Envoy's and Gradient2's gradient), bounded to [0.5, BACKOFF]: a limit far above the
  backend's capacity comes down in one or two windows, and lands where the queue is
  gone, so the windows after it measure the unloaded latency again.
- The baseline is the lowest window median of the last BASELINE_WINDOWS windows: it
  follows a backend that became slower for good after that many windows, as Envoy
  recalculates its minRTT periodically.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

INITIAL_LIMIT = 3  # Envoy's min_concurrency while it measures the minRTT
BACKOFF = 0.9  # Netflix AIMDLimit's default backoffRatio
MAX_GRADIENT_CUT = 0.5  # Gradient2Limit never cuts below half in one step
LATENCY_TOLERANCE = 1.5  # the latency target itself; see architecture.md for why
DROP_TOLERANCE = 0.05  # a window counts as dropped when more than 5 % of its calls did
WINDOW_MIN_CALLS = 20  # twice Netflix WindowedLimit's minimum window size of 10
WINDOW_SECONDS = 5.0  # a slow backend's window closes after this long with 3 calls
WINDOW_MIN_CALLS_TIMED = 3
BASELINE_WINDOWS = 30

START = "start"
DROPS = "drops"
LATENCY = "latency"
GROWTH = "growth"
SETTINGS = "settings"
REASONS = (START, DROPS, LATENCY, GROWTH, SETTINGS)


@dataclass(frozen=True, slots=True)
class Change:
    """The limit moved: what `concurrency_limit_changed` logs."""

    old: int
    new: int
    reason: str
    baseline_s: float | None


@dataclass(slots=True)
class _Window:
    """What the calls completed since the last decision said."""

    opened_at: float
    calls: int = 0
    drops: int = 0
    most_in_flight: int = 0
    latencies: list[float] | None = None

    def median(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[len(ordered) // 2]


class Limiter:
    """One instance's limit between `minimum` and `maximum`; fixed at `maximum` when not
    adaptive. Feed every completed call to `sample`; it returns a Change when the
    limit moved."""

    def __init__(self, *, minimum: int, maximum: int, adaptive: bool, now: float) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.adaptive = adaptive
        self.limit = maximum if not adaptive else max(minimum, min(maximum, INITIAL_LIMIT))
        self.reason = START
        self._slow_start = True
        self._medians: deque[float] = deque(maxlen=BASELINE_WINDOWS)
        self._window = _Window(now)
        self._changed_at = now

    @property
    def baseline_s(self) -> float | None:
        """The unloaded latency: the lowest recent window median (None before the first)."""
        return min(self._medians) if self._medians else None

    def sample(
        self,
        *,
        started: float,
        finished: float,
        in_flight: int,
        dropped: bool,
        latency_counts: bool = True,
    ) -> Change | None:
        """One completed call: it started and finished at these monotonic times, with
        `in_flight` calls out (itself included). A call started before the last change
        ran under the old limit and is not counted; nor is the latency of a call whose
        duration is not one round trip (`latency_counts` False: it was retried)."""
        if not self.adaptive or started < self._changed_at:
            return None
        w = self._window
        w.calls += 1
        w.most_in_flight = max(w.most_in_flight, in_flight)
        if dropped:
            w.drops += 1
        elif latency_counts:
            if w.latencies is None:
                w.latencies = []
            w.latencies.append(finished - started)
        if w.calls < max(WINDOW_MIN_CALLS, 2 * self.limit) and not (
            w.calls >= WINDOW_MIN_CALLS_TIMED and finished - w.opened_at >= WINDOW_SECONDS
        ):
            return None
        return self._decide(finished)

    def configure(self, *, minimum: int, maximum: int, adaptive: bool, now: float) -> Change | None:
        """New settings (SIGHUP): keep what was learned, clamp the limit into the range."""
        self.minimum, self.maximum = minimum, maximum
        was_adaptive, self.adaptive = self.adaptive, adaptive
        if not adaptive:
            new = maximum
        elif not was_adaptive:
            new = max(minimum, min(maximum, INITIAL_LIMIT))
            self._slow_start = True
        else:
            new = max(minimum, min(maximum, self.limit))
        self._window = _Window(now)
        return self._move(new, SETTINGS)

    def _decide(self, now: float) -> Change | None:
        w, limit = self._window, self.limit
        self._window = _Window(now)
        median = w.median()
        if median is not None:
            self._medians.append(median)
        baseline = self.baseline_s
        if w.drops > DROP_TOLERANCE * w.calls:
            self._slow_start = False
            return self._move(min(limit - 1, math.floor(limit * BACKOFF)), DROPS)
        if median is not None and baseline and median > LATENCY_TOLERANCE * baseline:
            self._slow_start = False
            factor = max(MAX_GRADIENT_CUT, min(BACKOFF, baseline / median))
            return self._move(min(limit - 1, math.floor(limit * factor)), LATENCY)
        if w.most_in_flight >= limit:
            step = limit if self._slow_start else math.isqrt(limit)  # Envoy's headroom
            return self._move(limit + step, GROWTH)
        return None

    def _move(self, wanted: int, reason: str) -> Change | None:
        new = max(self.minimum, min(self.maximum, wanted))
        if new == self.limit:
            return None
        change = Change(self.limit, new, reason, self.baseline_s)
        self.limit, self.reason = new, reason
        self._changed_at = self._window.opened_at
        return change

    def as_dict(self) -> dict[str, object]:
        """The "concurrency" part of /status and of the instance's settings."""
        baseline = self.baseline_s
        return {
            "adaptive": self.adaptive,
            "limit": self.limit,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "reason": self.reason,
            "baseline_s": None if baseline is None else round(baseline, 6),
        }
