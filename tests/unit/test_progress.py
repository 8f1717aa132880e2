"""A cycle is stalled only when one of its bounded waits overruns its bound."""

from __future__ import annotations

from daemon.progress import Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_wait_within_its_bound_is_not_a_stall() -> None:
    clock = FakeClock()
    progress = Progress(clock=clock)
    with progress.bounded(30, "backend call"):
        clock.now += 30 + 4
        assert progress.overdue(grace=5) is None


def test_a_wait_past_its_bound_and_grace_is_reported() -> None:
    clock = FakeClock()
    progress = Progress(clock=clock)
    with progress.bounded(30, "database claim"):
        clock.now += 36
        assert progress.overdue(grace=5) == "database claim"
    assert progress.overdue(grace=5) is None  # the wait ended: nothing is overdue


def test_status_line_counts_done_of_total_and_failures() -> None:
    progress = Progress(total=200, claimed=50, done=10, failed=2)
    assert progress.status_line() == "syncing 10 of 200, failed 2"
    assert Progress(total=0, claimed=5, done=1).status_line() == "syncing 1 of 5"
