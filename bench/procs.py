"""Running a measured process: its environment, its CPU and wall time, stopping it.

Every client (the floor, the peer, the daemon) runs as its own process under
`/usr/bin/time -v`, so that their CPU is measured the same way, interpreter included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIME_BIN = Path("/usr/bin/time")
# Variables of the caller's shell that would change what is measured.
_SCRUBBED_PREFIXES = ("SYNC_",)
_SCRUBBED = (
    *("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET"),
    *("WATCHDOG_USEC", "WATCHDOG_PID"),
)


class BenchError(Exception):
    """A setup step failed; the message says which."""


@dataclass
class Usage:
    """What `/usr/bin/time -v` (or wait4) says about one process."""

    user_s: float = 0.0
    system_s: float = 0.0
    max_rss_kib: int = 0
    elapsed_s: float = 0.0
    exit_status: int | None = None
    timed_out: bool = False

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s


def python_command(*args: str) -> list[str]:
    """`python ARGS` with this interpreter (the project's venv)."""
    return [sys.executable, *args]


def daemon_command(*args: str) -> list[str]:
    """`python -m daemon ARGS`: the daemon as systemd would start it, same interpreter."""
    return python_command("-m", "daemon", *args)


def base_environment() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED
    }
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    return env


_TIME_FIELDS = {
    "User time (seconds)": "user_s",
    "System time (seconds)": "system_s",
    "Maximum resident set size (kbytes)": "max_rss_kib",
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "elapsed_s",
    "Exit status": "exit_status",
}


def parse_time_output(text: str) -> Usage:
    usage = Usage()
    for line in text.splitlines():
        name, sep, value = line.strip().rpartition(": ")
        if not sep or name not in _TIME_FIELDS:
            continue
        attr = _TIME_FIELDS[name]
        if attr == "elapsed_s":
            seconds = 0.0
            for part in value.split(":"):
                seconds = seconds * 60 + float(part)
            usage.elapsed_s = round(seconds, 3)
        elif attr in ("max_rss_kib", "exit_status"):
            setattr(usage, attr, int(value))
        else:
            setattr(usage, attr, float(value))
    return usage


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: Path,
    timeout: float,
) -> Usage:
    """Run `cmd` to its end with stdout to a file; its CPU, peak RSS and wall time."""
    time_path = stdout.with_suffix(".time")
    use_time = TIME_BIN.exists()
    full = [str(TIME_BIN), "-v", "-o", str(time_path), *cmd] if use_time else list(cmd)
    started = time.monotonic()
    timed_out = False
    with stdout.open("wb") as out, stdout.with_suffix(".stderr").open("wb") as err:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env),
            # Not the checkout: `python -m` puts the working directory first on sys.path,
            # which would shadow the PYTHONPATH a client names its daemon package by.
            cwd=stdout.parent,
            start_new_session=True,
        )
        try:
            if not use_time:
                return _wait4(proc, timeout, started)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            stop_group(proc, grace=5)
    usage = parse_time_output(time_path.read_text(errors="replace"))
    usage.timed_out = timed_out
    if usage.exit_status is None:
        usage.exit_status = proc.returncode
    return usage


def _wait4(proc: subprocess.Popen[Any], timeout: float, started: float) -> Usage:
    deadline = started + timeout
    timed_out = False
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Usage(
                user_s=rusage.ru_utime,
                system_s=rusage.ru_stime,
                max_rss_kib=rusage.ru_maxrss,
                elapsed_s=round(time.monotonic() - started, 3),
                exit_status=proc.returncode,
                timed_out=timed_out,
            )
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process group this script started, then SIGKILL what lingers.

    The group, not just the child: when the child is /usr/bin/time, it dies on SIGTERM
    at once while the process under it may still be draining.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.05)


def process_cpu_seconds(pid: int) -> float | None:
    """utime+stime of a live process from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
