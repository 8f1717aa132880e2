"""The adaptive concurrency limit: the rule per window, fed synthetic calls, time injected."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from daemon import limiter as rule
from daemon.limiter import Change, Limiter

BASE_S = 0.05


@dataclass
class Backend:
    """A backend of a given capacity, closed-loop: every call the limit allows is out.

    Above the capacity calls queue for a slot, so a round of L calls takes
    base * L / capacity; beyond `shed_above` calls in flight it answers 503 at once."""

    capacity: int
    shed_above: int | None = None
    base_s: float = BASE_S
    now: float = 0.0
    history: list[int] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)

    def rounds(self, limiter: Limiter, count: int) -> None:
        for _ in range(count):
            out = limiter.limit
            started = self.now
            self.now += self.base_s * max(1.0, out / self.capacity)
            shed = self.shed_above is not None and out > self.shed_above
            for _ in range(out):
                change = limiter.sample(
                    started=started, finished=self.now, in_flight=out, dropped=shed
                )
                if change is not None:
                    self.changes.append(change)
            self.history.append(limiter.limit)


def assert_near(history: list[int], capacity: int) -> None:
    """Settled: never far below the capacity (throughput), never at twice it (latency)."""
    assert min(history) >= capacity - 1 and max(history) <= 2 * capacity, history
    assert capacity <= sum(history) / len(history) <= 1.6 * capacity, history


def new(minimum: int = 1, maximum: int = 32, adaptive: bool = True) -> Limiter:
    return Limiter(minimum=minimum, maximum=maximum, adaptive=adaptive, now=0.0)


def test_the_limit_settles_near_the_capacity_from_a_low_start() -> None:
    limiter, backend = new(), Backend(capacity=8)
    assert limiter.limit == rule.INITIAL_LIMIT
    backend.rounds(limiter, 300)
    assert_near(backend.history[-100:], 8)
    assert limiter.baseline_s is not None and abs(limiter.baseline_s - BASE_S) < 1e-9


def test_the_limit_halves_within_a_few_windows_when_the_capacity_halves() -> None:
    limiter, backend = new(), Backend(capacity=16)
    backend.rounds(limiter, 300)
    assert_near(backend.history[-50:], 16)
    backend.capacity = 8
    backend.changes.clear()
    backend.rounds(limiter, 10)
    assert limiter.limit <= 12, backend.history[-10:]
    assert backend.changes[0].reason == rule.LATENCY
    backend.rounds(limiter, 100)
    assert_near(backend.history[-50:], 8)


def test_the_limit_climbs_back_when_the_capacity_returns() -> None:
    limiter, backend = new(), Backend(capacity=8)
    backend.rounds(limiter, 200)
    assert_near(backend.history[-50:], 8)
    backend.capacity = 16
    backend.rounds(limiter, 200)
    assert_near(backend.history[-50:], 16)
    assert any(c.reason == rule.GROWTH for c in backend.changes[-20:])


def test_drops_cut_the_limit_by_the_backoff_ratio() -> None:
    limiter = new(maximum=64)
    limiter.limit = 20
    for _ in range(40):
        change = limiter.sample(started=0.0, finished=0.01, in_flight=20, dropped=True)
        if change is not None:
            break
    assert change == Change(20, 18, rule.DROPS, None)


def test_a_few_drops_below_the_tolerance_do_not_cut() -> None:
    limiter = new(maximum=64)
    limiter.limit = 20
    changes = [
        limiter.sample(started=0.0, finished=0.01, in_flight=20, dropped=i == 0) for i in range(40)
    ]
    assert [c.reason for c in changes if c] == [rule.GROWTH]


def test_the_limit_never_grows_while_it_is_not_in_use() -> None:
    limiter, now = new(maximum=32), 0.0
    for _ in range(500):
        change = limiter.sample(started=now, finished=now + BASE_S, in_flight=2, dropped=False)
        assert change is None
        now += BASE_S
    assert limiter.limit == rule.INITIAL_LIMIT


def test_the_limit_never_leaves_the_configured_range() -> None:
    rng = random.Random(7)
    limiter, now = new(minimum=2, maximum=5), 0.0
    for _ in range(20_000):
        latency = rng.choice([0.01, 0.05, 0.5, 3.0])
        limiter.sample(
            started=now,
            finished=now + latency,
            in_flight=rng.randint(1, 5),
            dropped=rng.random() < 0.1,
            latency_counts=rng.random() < 0.9,
        )
        now += rng.random() / 10
        assert 2 <= limiter.limit <= 5


def test_a_shedding_backend_pulls_the_limit_below_its_shedding_point() -> None:
    limiter, backend = new(maximum=64), Backend(capacity=100, shed_above=12)
    backend.rounds(limiter, 300)
    settled = backend.history[-100:]
    # Around the shedding point: one growth step (sqrt 12 = 3) above it at most.
    assert min(settled) >= 10 and max(settled) <= 12 + 3 + 1, settled
    assert sum(settled) / len(settled) <= 14, settled
    assert {c.reason for c in backend.changes} >= {rule.DROPS, rule.GROWTH}


def test_calls_started_before_a_change_do_not_count_against_the_new_limit() -> None:
    limiter = new(maximum=64)
    limiter.limit = 40
    limiter.sample(started=0.0, finished=0.05, in_flight=40, dropped=False)  # baseline window
    first = None
    for _ in range(100):
        first = first or limiter.sample(started=1.0, finished=2.0, in_flight=40, dropped=True)
    assert first is not None and first.new == 36
    late = [
        limiter.sample(started=1.5, finished=2.5, in_flight=36, dropped=True) for _ in range(200)
    ]
    assert late == [None] * 200 and limiter.limit == 36


def test_the_baseline_follows_a_backend_that_became_slower_for_good() -> None:
    limiter, backend = new(), Backend(capacity=8)
    backend.rounds(limiter, 200)
    slower = Backend(capacity=8, base_s=3 * BASE_S, now=backend.now)
    slower.rounds(limiter, 1500)  # at the minimum: 30 windows of 20 one-call rounds
    assert limiter.baseline_s is not None and limiter.baseline_s > 2.5 * BASE_S
    assert_near(slower.history[-50:], 8)


def test_a_fixed_limit_is_the_maximum_and_never_moves() -> None:
    limiter, backend = new(maximum=12, adaptive=False), Backend(capacity=4, shed_above=6)
    backend.rounds(limiter, 100)
    assert set(backend.history) == {12} and backend.changes == []


def test_new_settings_clamp_the_limit_and_switch_adaptivity() -> None:
    limiter, backend = new(maximum=32), Backend(capacity=16)
    backend.rounds(limiter, 200)
    change = limiter.configure(minimum=1, maximum=10, adaptive=True, now=backend.now)
    assert change is not None and change.new == 10 and change.reason == rule.SETTINGS
    change = limiter.configure(minimum=1, maximum=10, adaptive=False, now=backend.now)
    assert change is None and limiter.limit == 10  # already at the maximum
    limiter.configure(minimum=1, maximum=10, adaptive=True, now=backend.now)
    assert limiter.limit == rule.INITIAL_LIMIT
    assert limiter.as_dict()["reason"] == rule.SETTINGS
