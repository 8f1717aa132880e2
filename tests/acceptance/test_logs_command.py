"""`background-sync logs` as an operator runs it: a real process on a real file or pipe.

It must work where no setting is (a log copied off a host), pass through what is not
JSON, and end quietly when its reader goes away (`logs | head`). And `run`, whose
stdout is its log, writes a failed start there too, as a JSON record.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.acceptance.conftest import base_env

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "0123456789abcdef0123456789abcdef"
MIXED = [
    json.dumps(
        {
            "run_id": RUN_ID,
            "due": 2,
            "event": "cycle_started",
            "level": "info",
            "timestamp": "2026-12-01T12:00:00.000001Z",
        }
    ),
    json.dumps(
        {
            "run_id": RUN_ID,
            "user_id": 7,
            "attempt": 1,
            "status": 200,
            "duration_ms": 12,
            "result": {"emails": 3},
            "event": "user_synced",
            "level": "info",
            "timestamp": "2026-12-01T12:00:01.000001Z",
        }
    ),
    "Traceback (most recent call last):",
    json.dumps(
        {
            "run_id": RUN_ID,
            "user_id": 8,
            "attempt": 4,
            "status": 503,
            "duration_ms": 3000,
            "error": "HTTP 503",
            "event": "user_sync_failed",
            "level": "warning",
            "timestamp": "2026-12-01T12:00:02.000001Z",
        }
    ),
    "{truncated by a full disk",
]


def _env() -> dict[str, str]:
    """No SYNC_* at all but one bad value, which a command that read settings would refuse."""
    return {**base_env(), "SYNC_INTERVAL_SECONDS": "not-a-number"}


def _logs(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "logs", *args],
        cwd=PROJECT_ROOT,
        env=_env(),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_logs_prints_a_file_in_short_form_and_other_lines_unchanged(tmp_path: Path) -> None:
    log = tmp_path / "background-sync.log"
    log.write_text("\n".join(MIXED) + "\n")
    done = _logs(str(log))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("2026-12-01 12:00:00 [info")
    assert "cycle_started" in lines[0] and "due=2 run_id=01234567" in lines[0]
    assert "user_id=7 status=200 duration_ms=12 run_id=01234567" in lines[1]
    assert (lines[2], lines[4]) == (MIXED[2], MIXED[4])
    assert "user_id=8 status=503 duration_ms=3000 attempts=4 error='HTTP 503'" in lines[3]
    assert RUN_ID not in done.stdout
    assert "\x1b[" not in done.stdout  # no colours into a pipe


def test_logs_filters_stdin_by_level_user_run_and_time() -> None:
    text = "\n".join(MIXED) + "\n"
    warnings = _logs("--level", "warning", stdin=text)
    assert warnings.returncode == 0, warnings.stderr
    shown = warnings.stdout.splitlines()
    assert (shown[0], shown[2]) == (MIXED[2], MIXED[4])  # not JSON: always shown
    assert shown[1].startswith("2026-12-01 12:00:02 [warning  ] user_sync_failed")
    assert len(shown) == 3

    one_user = _logs("--user", "7", "--run", "0123", "--json", stdin=text)
    assert one_user.stdout.splitlines() == [MIXED[1], MIXED[2], MIXED[4]]

    late = _logs("--since", "2026-12-01T12:00:01.5", "--json", stdin=text)
    assert late.stdout.splitlines() == [MIXED[2], MIXED[3], MIXED[4]]


def test_logs_into_a_closed_pipe_ends_quietly_with_0(tmp_path: Path) -> None:
    """`logs | head -1`: far more output than a pipe holds, and a reader that leaves."""
    log = tmp_path / "big.log"
    log.write_text("\n".join(MIXED * 5000) + "\n")
    with subprocess.Popen(
        [sys.executable, "-m", "daemon", "logs", str(log)],
        cwd=PROJECT_ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # what head does after its line
        err = proc.stderr.read()
        status = proc.wait(timeout=60)
    assert "cycle_started" in first
    assert err == ""
    assert status == 0


def test_logs_of_a_missing_file_exits_66_and_its_help_lists_the_exit_statuses(
    tmp_path: Path,
) -> None:
    missing = _logs(str(tmp_path / "nothing.log"))
    assert missing.returncode == 66
    assert missing.stderr.strip().endswith("nothing.log: No such file or directory")
    assert "Traceback" not in missing.stderr

    shown = _logs("--help")
    assert shown.returncode == 0
    assert "exit status:" in shown.stdout
    for status in ("0 ", "2 ", "66 "):
        assert f"\n  {status}" in shown.stdout


def test_a_failed_start_is_one_line_on_stderr_and_a_json_record_in_the_log() -> None:
    """The manage script's log file and the journal say why `run` ended, as a record."""
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "run"],
        cwd=PROJECT_ROOT,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78
    (line,) = done.stderr.splitlines()
    assert line.startswith("background-sync: SYNC_INTERVAL_SECONDS: ")
    (record,) = [json.loads(x) for x in done.stdout.splitlines()]
    assert (record["event"], record["level"], record["exit_status"]) == (
        "config_error",
        "error",
        78,
    )
    assert record["error"] == line.removeprefix("background-sync: ")
    assert record["timestamp"].endswith("Z")
