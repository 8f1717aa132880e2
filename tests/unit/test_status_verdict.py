"""The exit status of `status`: one per state, the worst live instance wins; every
command's --help lists its exit statuses."""

from __future__ import annotations

import re
from typing import Any

import pytest

from daemon import cli, overview, thresholds
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
        (["warning", "degraded"], False, "degraded", 4),
        (["healthy"], True, "paused", 3),
        (["degraded"], True, "degraded", 4),
        (["unhealthy", "degraded"], True, "unhealthy", 5),
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


@pytest.mark.parametrize(
    "command",
    [
        "run",
        "once",
        "migrate",
        "check-config",
        "status",
        "pause",
        "resume",
        "force",
        "cleanup",
        "seed-demo",
    ],
)
def test_every_commands_help_lists_its_exit_statuses(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.run([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    listed = text.split("exit statuses:\n", 1)[1]
    assert re.search(r"^\s+0  ", listed, re.M), text
    assert re.search(r"^\s+2  bad command-line arguments", listed, re.M), text


def test_status_help_names_a_code_for_every_state() -> None:
    listed = cli._epilog("status")
    states = {0: "healthy", 1: "warning", 3: "paused", 4: "degraded", 5: "unhealthy", 6: "not"}
    for code, state in states.items():
        assert re.search(rf"^\s+{code}  {state}", listed, re.M), listed


def test_bad_arguments_exit_2_which_no_state_of_status_uses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.run(["status", "--no-such-option"])
    assert done.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    assert 2 not in overview.STATES.values()
