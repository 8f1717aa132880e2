"""The exit status of `status`: one per state, the worst live instance wins."""

from __future__ import annotations

from typing import Any

import pytest

from daemon import overview, thresholds
from daemon.settings import Settings


def instance(
    name: str, health: str | None = "healthy", *, live: bool = True, lost: bool = False
) -> dict[str, Any]:
    return {
        "instance": name,
        "health": health,
        "health_reasons": [] if health == "healthy" else [f"{health} reason"],
        "live": live,
        "lost": lost,
        "status": "idle",
    }


def judged(*instances: dict[str, Any], paused: bool = False) -> overview.Verdict:
    return overview.verdict(
        {"instances": list(instances), "paused": paused, "paused_by": "ops@host"}
    )


@pytest.mark.parametrize(
    ("healths", "paused", "state", "code"),
    [
        (["healthy"], False, "healthy", 0),
        (["healthy", "warning"], False, "warning", 1),
        (["warning", "degraded"], False, "degraded", 2),
        (["healthy"], True, "paused", 3),
        (["degraded"], True, "degraded", 2),
        (["unhealthy", "degraded"], True, "unhealthy", 4),
        ([None], False, "healthy", 0),
    ],
)
def test_the_worst_live_instance_decides_and_a_pause_outranks_only_warnings(
    healths: list[str | None], paused: bool, state: str, code: int
) -> None:
    found = judged(*(instance(f"i{n}", h) for n, h in enumerate(healths)), paused=paused)
    assert (found.state, found.exit_status) == (state, code)


def test_no_live_instance_is_not_running_or_lost_when_one_died_without_stopping() -> None:
    assert judged().exit_status == overview.EXIT_NOT_RUNNING
    assert judged(instance("gone", live=False)).exit_status == overview.EXIT_NOT_RUNNING
    lost = judged(instance("gone", live=False, lost=True))
    assert (lost.state, lost.exit_status) == ("lost", overview.EXIT_UNHEALTHY)


def test_a_lost_instance_beside_a_live_one_leaves_the_verdict_to_the_live_one() -> None:
    found = judged(instance("gone", live=False, lost=True), instance("here"))
    assert found.exit_status == overview.EXIT_HEALTHY


def test_the_reasons_are_the_instances_recorded_health_reasons() -> None:
    found = judged(instance("a", "degraded"))
    assert found.reasons == ("a: degraded reason",)


def test_recorded_thresholds_read_back_as_written_with_the_moment_apart() -> None:
    settings = Settings(database_url="sqlite://", stale_after_seconds=60, quarantine_after=3)
    text = thresholds.dump(settings, thresholds.Live(in_flight=2, next_cycle_in_s=-1))
    found = thresholds.load(text)
    assert found["stale_after_seconds"] == 60
    assert found["quarantine_after"] == 3
    assert found["live"]["in_flight"] == 2
    assert found["live"]["next_cycle_in_s"] == 0.0
    assert thresholds.load("not json") == {}
    assert thresholds.load(None) == {}
    assert thresholds.number({"x": "5"}, "x", 7.0) == 7.0
