"""A cycle's outcome: what its run row, `status` and the metrics call it at its end."""

from __future__ import annotations

from daemon.ending import Ending, Tally, decide


def tally(
    claimed: int = 10, done: int = 10, failed: int = 0, unrecorded: int = 0, stopped: bool = False
) -> Tally:
    return Tally(claimed, done, failed, unrecorded, stopped)


def test_a_cycle_that_attempted_and_recorded_every_claim_succeeded() -> None:
    assert decide(Ending(), tally(), None) == ("succeeded", None)
    assert decide(Ending(), tally(claimed=0, done=0), None) == ("succeeded", None)


def test_one_failed_user_makes_the_cycle_failed_without_an_error() -> None:
    assert decide(Ending(), tally(failed=1), None) == ("failed", None)


def test_never_succeeded_with_claimed_users_left_unattempted_or_unrecorded() -> None:
    assert decide(Ending(), tally(done=9), None) == ("failed", None)
    assert decide(Ending(), tally(unrecorded=3), None) == ("failed", None)


def test_a_halt_fails_the_cycle_with_its_reason_and_the_first_reason_stays() -> None:
    ending = Ending()
    assert ending.halt_for("circuit open: the backend is failing")
    assert not ending.halt_for("the backend rejected our credentials")
    assert decide(ending, tally(done=4), None) == (
        "failed",
        "circuit open: the backend is failing",
    )


def test_an_error_from_outside_the_calls_is_a_crash_unless_the_cycle_was_halted() -> None:
    assert decide(Ending(), tally(), "database is locked") == ("crashed", "database is locked")
    halted = Ending(halt="circuit open: the backend is failing")
    assert decide(halted, tally(), "database is locked") == ("failed", "database is locked")


def test_a_stop_with_calls_left_is_interrupted_not_failed() -> None:
    assert decide(Ending(), tally(done=3, stopped=True), None) == ("interrupted", None)
    assert decide(Ending(), tally(stopped=True), None) == ("succeeded", None)


def test_a_pause_is_neither_failed_nor_succeeded_and_says_what_it_gave_back() -> None:
    paused = Ending(paused=True, released_for_pause=7)
    assert decide(paused, tally(done=3), None) == (
        "paused",
        "paused by an operator; 7 claimed user(s) released",
    )
    # a pause seen after the last call still ends the cycle as paused
    assert decide(paused, tally(), None)[0] == "paused"
    # a stop during the pause, with calls left, is an interruption first
    assert decide(paused, tally(done=3, stopped=True), None)[0] == "interrupted"
