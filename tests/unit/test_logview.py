"""`background-sync logs`: its filters, its reading of lines and files, its output."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon import cli, logview

NOW = datetime(2026, 12, 1, 14, 0, tzinfo=UTC)
RUN_A = "aaaaaaaa11111111aaaaaaaa11111111"
RUN_B = "bbbbbbbb22222222bbbbbbbb22222222"


def _record(event: str, level: str = "info", minutes_ago: float = 0, **extra: object) -> str:
    stamp = (NOW - timedelta(minutes=minutes_ago)).isoformat().replace("+00:00", "Z")
    return json.dumps({**extra, "event": event, "level": level, "timestamp": stamp})


LOG = [
    _record("cycle_started", minutes_ago=90, run_id=RUN_A, due=2),
    _record("user_synced", minutes_ago=89, run_id=RUN_A, user_id=7, status=200, duration_ms=5),
    "Started background-sync.service - keeps users synced.",
    _record("user_sync_failed", "warning", 30, run_id=RUN_B, user_id=8, status=503),
    _record("user_synced", minutes_ago=29, run_id=RUN_B, user_id="7", status=200),
    "{this is not json",
    _record("circuit_opened", "error", 5),
]


def _view(*args: str, lines: list[str] = LOG) -> list[str]:
    out = io.StringIO()
    parsed = cli._parser().parse_args(["logs", *args])
    status = logview.run(parsed, stdin=io.StringIO("\n".join(lines) + "\n"), stdout=out, now=NOW)
    assert status == logview.EX_OK
    return out.getvalue().splitlines()


def _events(shown: list[str]) -> list[str]:
    """The event names of rendered lines; other lines as they are."""
    return [line.split("] ", 1)[1].split()[0] if line[:2] == "20" else line for line in shown]


def test_without_filters_every_line_is_shown_in_order() -> None:
    assert _events(_view()) == [
        *("cycle_started", "user_synced", LOG[2], "user_sync_failed", "user_synced"),
        *(LOG[5], "circuit_opened"),
    ]


def test_level_is_a_minimum() -> None:
    assert _events(_view("--level", "warning")) == [
        LOG[2],
        "user_sync_failed",
        LOG[5],
        "circuit_opened",
    ]


def test_user_matches_ids_written_as_numbers_or_strings() -> None:
    assert _events(_view("--user", "7")) == ["user_synced", LOG[2], "user_synced", LOG[5]]


def test_run_accepts_the_short_form_the_console_shows() -> None:
    assert _events(_view("--run", RUN_B[:8])) == [LOG[2], "user_sync_failed", "user_synced", LOG[5]]


def test_since_a_duration_counts_back_from_now() -> None:
    assert _events(_view("--since", "45m")) == [
        *(LOG[2], "user_sync_failed", "user_synced", LOG[5], "circuit_opened")
    ]


def test_filters_combine() -> None:
    assert _events(_view("--user", "7", "--since", "1h")) == [LOG[2], "user_synced", LOG[5]]


def test_json_prints_the_matching_records_as_they_were_written() -> None:
    assert _view("--json", "--level", "error") == [LOG[2], LOG[5], LOG[6]]


def test_a_record_without_the_field_a_filter_asks_about_does_not_match() -> None:
    assert logview.Filters(users=frozenset({"7"})).admits({"event": "x"}) is False
    assert logview.Filters(since=NOW).admits({"event": "x", "timestamp": "soon"}) is False
    assert logview.Filters(min_level="info").admits({"event": "x", "level": "loud"}) is False
    assert logview.Filters().admits({}) is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", NOW - timedelta(minutes=10)),
        ("2h", NOW - timedelta(hours=2)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("1d", NOW - timedelta(days=1)),
        ("45s", NOW - timedelta(seconds=45)),
        ("2026-12-01T12:00", datetime(2026, 12, 1, 12, 0, tzinfo=UTC)),
        ("2026-12-01 12:00:00Z", datetime(2026, 12, 1, 12, 0, tzinfo=UTC)),
        ("2026-12-01T13:00:00+01:00", datetime(2026, 12, 1, 12, 0, tzinfo=UTC)),
    ],
)
def test_since_takes_a_duration_or_an_iso_time_in_utc(text: str, expected: datetime) -> None:
    assert logview.parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "10", "10x", "m", "10m garbage", ""])
def test_since_refuses_what_is_neither(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        logview.parse_since(text, now=NOW)


def test_a_bad_since_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli._parser().parse_args(["logs", "--since", "yesterday"])
    status = logview.run(args, stdin=io.StringIO(""), stdout=io.StringIO(), now=NOW)
    assert status == logview.EX_USAGE
    assert "--since: 'yesterday' is neither" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line", ["", "   ", "[1, 2]", '"a string"', "42", "{broken", "null", "{}garbage"]
)
def test_lines_that_are_not_json_objects_are_printed_unchanged(line: str) -> None:
    assert logview.parse(line) is None
    assert _view("--level", "error", lines=[line]) == [line]


def test_a_dict_traceback_is_printed_as_a_traceback() -> None:
    exception = [
        {
            "exc_type": "ValueError",
            "exc_value": "boom",
            "frames": [{"filename": "/srv/daemon/cycle.py", "lineno": 3, "name": "run"}],
        }
    ]
    (shown,) = [_view(lines=[json.dumps({"event": "cycle_crashed", "exception": exception})])]
    assert shown[1:] == [
        "Traceback (most recent call last):",
        '  File "/srv/daemon/cycle.py", line 3, in run',
        "ValueError: boom",
    ]


def test_no_colours_unless_the_output_is_a_terminal() -> None:
    assert "\x1b[" not in "".join(_view())
    line = logview.renderer(colors=True)({"event": "user_synced", "level": "info"})
    assert "\x1b[" in line


def test_a_file_that_cannot_be_opened_exits_66(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli._parser().parse_args(["logs", str(tmp_path / "missing.log")])
    status = logview.run(args, stdin=io.StringIO(""), stdout=io.StringIO(), now=NOW)
    assert status == logview.EX_NOINPUT
    assert "missing.log: No such file or directory" in capsys.readouterr().err


def test_follow_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli._parser().parse_args(["logs", "-f"])
    status = logview.run(args, stdin=io.StringIO(""), stdout=io.StringIO(), now=NOW)
    assert status == logview.EX_USAGE
    assert "--follow needs a FILE" in capsys.readouterr().err


class _Writer:
    """Stands in for the daemon and for logrotate: each pause of the follower is a step."""

    def __init__(self, path: Path, steps: list[str]) -> None:
        self.path = path
        self.steps = steps

    def __call__(self, seconds: float) -> None:
        if not self.steps:
            raise _Done
        step = self.steps.pop(0)
        if step.startswith("rotate:"):  # the last words into the old file, then a new one
            with self.path.open("a") as f:
                f.write(step.removeprefix("rotate:"))
            self.path.rename(self.path.with_suffix(".1"))
            self.path.write_text("")
        elif step == "truncate":
            os.truncate(self.path, 0)
        else:
            with self.path.open("a") as f:
                f.write(step)


class _Done(Exception):
    pass


def test_follow_reads_appended_whole_lines_across_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "background-sync.log"
    path.write_text("one\n")
    steps = ["two\n", "thr", "ee\n", "rotate:four\n", "five\n", "truncate", "six\n"]
    lines = logview.follow(str(path), path.open(), sleep=_Writer(path, steps))
    seen: list[str] = []
    with pytest.raises(_Done):
        seen.extend(lines)
    assert seen == ["one\n", "two\n", "three\n", "four\n", "five\n", "six\n"]
