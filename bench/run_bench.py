#!/usr/bin/env python3
"""Measure `background-sync once` against the reference backend.

Builds a fresh database whose users table holds `--table-size` users of which the first
`--due` (by id) have never been synced, starts the reference backend with a fixed
latency, and runs one cycle under `/usr/bin/time -v`. Reports cycle and process wall
time against the ideal `due * latency / concurrency`, CPU per synced user (gross, and
net of the fixed cost of a `once` that finds nothing to do), peak RSS, and the
backend's own counters. Run by hand; see bench/README.md. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, inspect, select, update

from daemon import __version__ as daemon_version
from daemon import settings as settings_module
from daemon.database import make_engine
from daemon.demo import users_table
from daemon.settings import Settings

INSERT_CHUNK = 50_000
TIME_BIN = Path("/usr/bin/time")
BACKEND_PATH = "/api/v1/sync/start"
BACKEND_START_SECONDS = 20.0
BACKEND_STOP_SECONDS = 10.0
# Variables of the caller's shell that would change what is measured.
_SCRUBBED_PREFIXES = ("SYNC_",)
_SCRUBBED: tuple[str, ...] = ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET")
_SCRUBBED += ("WATCHDOG_USEC", "WATCHDOG_PID")


class BenchError(Exception):
    """A setup step failed; the message says which."""


@dataclass
class TimeStats:
    user_s: float | None = None
    system_s: float | None = None
    max_rss_kib: int | None = None
    elapsed_s: float | None = None
    exit_status: int | None = None
    measured_by: str = "/usr/bin/time -v"

    @property
    def cpu_s(self) -> float | None:
        if self.user_s is None or self.system_s is None:
            return None
        return self.user_s + self.system_s


@dataclass
class RunResult:
    kind: str  # "measured" or "startup"
    index: int
    due: int
    table_size: int
    latency_ms: float
    concurrency: int
    exit_status: int | None = None
    timed_out: bool = False
    time: TimeStats = field(default_factory=TimeStats)
    cycle_finished: dict[str, Any] | None = None
    events: dict[str, int] = field(default_factory=dict)
    levels: dict[str, int] = field(default_factory=dict)
    user_synced_lines: int = 0
    unsynced_due_users: int | None = None
    backend: dict[str, Any] = field(default_factory=dict)
    backend_cpu_s: float | None = None
    log_file: str = ""
    stderr_tail: str = ""

    # -- derived -----------------------------------------------------------------------

    @property
    def cycle_wall_s(self) -> float | None:
        if not self.cycle_finished or "duration_ms" not in self.cycle_finished:
            return None
        return float(self.cycle_finished["duration_ms"]) / 1000

    @property
    def ideal_s(self) -> float:
        return self.due * self.latency_ms / 1000 / self.concurrency

    @property
    def succeeded(self) -> int | None:
        return None if not self.cycle_finished else self.cycle_finished.get("succeeded")

    def derived(self) -> dict[str, Any]:
        cycle, proc, cpu = self.cycle_wall_s, self.time.elapsed_s, self.time.cpu_s
        ok = self.succeeded
        rss = self.time.max_rss_kib
        return {
            "cycle_wall_s": cycle,
            "process_wall_s": proc,
            "ideal_s": round(self.ideal_s, 3),
            "efficiency_cycle": _ratio(self.ideal_s, cycle) if self.due else None,
            "efficiency_process": _ratio(self.ideal_s, proc) if self.due else None,
            "cpu_s": None if cpu is None else round(cpu, 3),
            "cpu_us_per_synced_user": (
                round(cpu / ok * 1e6, 1) if cpu is not None and ok else None
            ),
            "peak_rss_mib": None if rss is None else round(rss / 1024, 1),
        }

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["time"]["cpu_s"] = self.time.cpu_s
        data.update(self.derived())
        return data


def _ratio(a: float, b: float | None) -> float | None:
    return round(a / b, 3) if b else None


# -- arguments ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark `background-sync once` against the reference backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--due", type=int, default=20_000, help="users never synced (due)")
    parser.add_argument(
        "--table-size",
        type=int,
        default=None,
        help="rows in the users table; the extra ones are fresh, not due (default: --due)",
    )
    parser.add_argument("--latency-ms", type=float, default=50.0, help="backend latency")
    parser.add_argument("--concurrency", type=int, default=32, help="SYNC_CONCURRENCY")
    parser.add_argument("--repeat", type=int, default=1, help="measured runs (and startup runs)")
    parser.add_argument("--database", choices=["sqlite"], default="sqlite")
    parser.add_argument(
        "--database-url",
        default=None,
        help="use this (empty, scratch) database instead of a fresh SQLite file",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (db, logs)")
    parser.add_argument("--output", type=Path, default=None, help="write results as JSON here")
    parser.add_argument(
        "--markdown", action="store_true", help="print table rows for docs/performance.md"
    )
    parser.add_argument(
        "--run-timeout", type=float, default=1800.0, help="kill a `once` that runs longer"
    )
    parser.add_argument("--no-startup", action="store_true", help="skip the 0-due baseline")
    args = parser.parse_args(argv)
    if args.table_size is None:
        args.table_size = args.due
    if args.due < 0 or args.table_size < args.due:
        parser.error("need 0 <= --due <= --table-size")
    if not 1 <= args.concurrency <= 1024:
        parser.error("--concurrency must be between 1 and 1024")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.latency_ms < 0:
        parser.error("--latency-ms must not be negative")
    return args


# -- processes ---------------------------------------------------------------------------


def daemon_command() -> list[str]:
    """The console script next to this interpreter, else `python -m daemon`."""
    script = Path(sys.executable).parent / "background-sync"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "daemon"]


def base_environment() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def daemon_environment(
    database_url: str, backend_url: str | None, concurrency: int
) -> dict[str, str]:
    env = base_environment()
    env.update(
        {
            "SYNC_DATABASE_URL": database_url,
            "SYNC_CONCURRENCY": str(concurrency),
            # An empty value means "the default", 127.0.0.1:8787, not "disabled".
            "SYNC_STATUS_ADDRESS": "off",
            "SYNC_LOG_FORMAT": "json",
            "SYNC_LOG_LEVEL": "INFO",  # user_synced lines are INFO
        }
    )
    if backend_url is not None:
        env["SYNC_BACKEND_URL"] = backend_url
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen[Any], grace: float = BACKEND_STOP_SECONDS) -> None:
    """SIGTERM the process group this script started, then SIGKILL what lingers.

    The group, not just the child: when the child is /usr/bin/time, it dies on SIGTERM
    at once while the daemon under it is still draining.
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


class Backend:
    """The reference backend as a separate process on a free port."""

    def __init__(self, workdir: Path, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self.log_path = workdir / "backend.stderr.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [*daemon_command(), "reference-backend", "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--latency-ms", f"{self.latency_ms:g}"]
        with self.log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=base_environment(),
                start_new_session=True,  # Ctrl-C reaches only this script; it stops us
            )
        deadline = time.monotonic() + BACKEND_START_SECONDS
        pattern = re.compile(r"reference-backend: Running on http://[^\s:]+:(\d+)")
        while time.monotonic() < deadline:
            match = pattern.search(self.log_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                break
            if self.proc.poll() is not None:
                raise BenchError(
                    f"reference backend exited with {self.proc.returncode}: "
                    f"{self.log_path.read_text(errors='replace').strip()[-2000:]}"
                )
            time.sleep(0.05)
        else:
            raise BenchError(f"reference backend announced no port in {BACKEND_START_SECONDS}s")
        self.get("/health")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=30) as response:
            return json.load(response)

    def reset(self) -> None:
        request = urllib.request.Request(self.base_url + "/_control/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def stats(self, due: int) -> dict[str, Any]:
        raw = self.get("/_control/stats")
        calls: dict[str, int] = raw.get("per_user_calls", {})
        keep: tuple[str, ...] = (
            "requests",
            "successes",
            "overlaps",
            "max_in_flight",
            "in_flight",
            "replays",
        )
        keep += ("idempotency_keys_seen", "requests_without_idempotency_key", "auth_failures")
        summary = {k: raw.get(k) for k in keep}
        summary["by_status"] = raw.get("by_status", {})
        summary["users_called"] = len(calls)
        summary["users_called_more_than_once"] = sum(1 for n in calls.values() if n > 1)
        summary["max_calls_per_user"] = max(calls.values(), default=0)
        summary["not_due_users_called"] = sum(
            1 for user in calls if not (user.isdigit() and 1 <= int(user) <= due)
        )
        return summary

    def cpu_seconds(self) -> float | None:
        return None if self.proc is None else process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


def run_command(cmd: list[str], env: Mapping[str, str], what: str) -> None:
    done = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{what} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")


# -- database ----------------------------------------------------------------------------


def app_now(settings: Settings, engine: Engine) -> datetime:
    """Now, UTC, in the form the demo table's naive DateTime column stores."""
    table = users_table(settings)
    column = table.c[settings.last_sync_column]
    now = datetime.now(UTC)
    return now if getattr(column.type, "timezone", False) else now.replace(tzinfo=None)


def check_scratch_database(engine: Engine, settings: Settings) -> None:
    names = set(inspect(engine).get_table_names())
    clash = names & {settings.users_table, "sync_user_state", "sync_runs", "alembic_version"}
    if clash:
        raise BenchError(
            f"the database already has {', '.join(sorted(clash))}; point --database-url at an "
            "empty scratch database (this script does not drop anything)"
        )


def fill_users(engine: Engine, settings: Settings, due: int, table_size: int) -> float:
    """Create the users table and insert ids 1..table_size; 1..due never synced."""
    started = time.monotonic()
    table = users_table(settings)
    table.metadata.create_all(engine)
    fresh = app_now(settings, engine)
    id_col, email_col = settings.user_id_column, settings.user_email_column
    last_col = settings.last_sync_column
    statement = insert(table)
    for first in range(1, table_size + 1, INSERT_CHUNK):
        last = min(first + INSERT_CHUNK, table_size + 1)
        rows = [
            {id_col: n, email_col: f"user{n}@example.com", last_col: None if n <= due else fresh}
            for n in range(first, last)
        ]
        with engine.begin() as conn:
            conn.execute(statement, rows)
    return time.monotonic() - started


def set_due(engine: Engine, settings: Settings, due: int, *, synced: bool) -> None:
    """Make users 1..due never-synced again, or freshly synced (nothing due)."""
    table = users_table(settings)
    value = app_now(settings, engine) if synced else None
    with engine.begin() as conn:
        conn.execute(
            update(table)
            .where(table.c[settings.user_id_column] <= due)
            .values({settings.last_sync_column: value})
        )


def count_unsynced(engine: Engine, settings: Settings, due: int) -> int:
    table = users_table(settings)
    query = (
        select(func.count())
        .select_from(table)
        .where(table.c[settings.user_id_column] <= due)
        .where(table.c[settings.last_sync_column].is_(None))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


# -- one `once` --------------------------------------------------------------------------


_TIME_FIELDS = {
    "User time (seconds)": "user_s",
    "System time (seconds)": "system_s",
    "Maximum resident set size (kbytes)": "max_rss_kib",
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "elapsed_s",
    "Exit status": "exit_status",
}


def parse_time_output(text: str) -> TimeStats:
    stats = TimeStats()
    for line in text.splitlines():
        name, sep, value = line.strip().rpartition(": ")
        if not sep or name not in _TIME_FIELDS:
            continue
        attr = _TIME_FIELDS[name]
        if attr == "elapsed_s":
            seconds = 0.0
            for part in value.split(":"):
                seconds = seconds * 60 + float(part)
            stats.elapsed_s = round(seconds, 3)
        elif attr in ("max_rss_kib", "exit_status"):
            setattr(stats, attr, int(value))
        else:
            setattr(stats, attr, float(value))
    return stats


def parse_daemon_log(path: Path, result: RunResult) -> None:
    events: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    with path.open(encoding="utf-8", errors="replace") as log:
        for line in log:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                events["<not json>"] += 1
                continue
            if not isinstance(record, dict):
                continue
            event = str(record.get("event"))
            events[event] += 1
            levels[str(record.get("level"))] += 1
            if event == "cycle_finished":
                result.cycle_finished = {
                    k: record.get(k)
                    for k in ("outcome", "duration_ms", "claimed", "succeeded", "failed", "skipped")
                }
    result.events = dict(events.most_common())
    result.levels = dict(levels)
    result.user_synced_lines = events["user_synced"]


def run_once(
    *,
    kind: str,
    index: int,
    args: argparse.Namespace,
    workdir: Path,
    env: Mapping[str, str],
    backend: Backend,
    engine: Engine,
    settings: Settings,
    due: int,
) -> RunResult:
    result = RunResult(
        kind=kind,
        index=index,
        due=due,
        table_size=args.table_size,
        latency_ms=args.latency_ms,
        concurrency=args.concurrency,
    )
    stem = f"{kind}-{index}"
    log_path = workdir / f"{stem}.log"
    err_path = workdir / f"{stem}.stderr"
    time_path = workdir / f"{stem}.time"
    result.log_file = str(log_path)
    backend.reset()
    backend_cpu_before = backend.cpu_seconds()
    use_time = TIME_BIN.exists()
    cmd = [*daemon_command(), "once"]
    if use_time:
        cmd = [str(TIME_BIN), "-v", "-o", str(time_path), *cmd]
    started = time.monotonic()
    with log_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env),
            start_new_session=True,
        )
        try:
            if use_time:
                try:
                    proc.wait(timeout=args.run_timeout)
                except subprocess.TimeoutExpired:
                    result.timed_out = True
                    stop_group(proc)
            else:  # no GNU time: take the child's own rusage from wait4
                _, status, usage = _wait4_with_timeout(proc, args.run_timeout, result)
                result.time = TimeStats(
                    user_s=round(usage.ru_utime, 3),
                    system_s=round(usage.ru_stime, 3),
                    max_rss_kib=usage.ru_maxrss,
                    elapsed_s=round(time.monotonic() - started, 3),
                    exit_status=os.waitstatus_to_exitcode(status),
                    measured_by="os.wait4 (no /usr/bin/time)",
                )
                proc.returncode = result.time.exit_status
        finally:
            stop_group(proc, grace=5)
    if use_time and time_path.exists():
        result.time = parse_time_output(time_path.read_text(errors="replace"))
    result.exit_status = result.time.exit_status if use_time else proc.returncode
    if result.exit_status is None:
        result.exit_status = proc.returncode
    backend_cpu_after = backend.cpu_seconds()
    if backend_cpu_before is not None and backend_cpu_after is not None:
        result.backend_cpu_s = round(backend_cpu_after - backend_cpu_before, 3)
    parse_daemon_log(log_path, result)
    result.stderr_tail = err_path.read_text(errors="replace")[-2000:]
    result.unsynced_due_users = count_unsynced(engine, settings, due)
    result.backend = backend.stats(due)
    return result


def _wait4_with_timeout(
    proc: subprocess.Popen[Any], timeout: float, result: RunResult
) -> tuple[int, int, Any]:
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.monotonic() > deadline and not result.timed_out:
            result.timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.02)


# -- reporting ---------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if spec else str(value)


def describe(run: RunResult, startup_cpu: float | None) -> list[str]:
    d = run.derived()
    t, b, cf = run.time, run.backend, run.cycle_finished or {}
    lines = [
        f"[{run.kind} #{run.index}] due={run.due} table_size={run.table_size} "
        f"latency={run.latency_ms:g}ms concurrency={run.concurrency}",
        f"  exit status            {_fmt(run.exit_status)}"
        + ("  (TIMED OUT, killed)" if run.timed_out else ""),
        f"  cycle_finished         outcome={_fmt(cf.get('outcome'))} "
        f"claimed={_fmt(cf.get('claimed'))} succeeded={_fmt(cf.get('succeeded'))} "
        f"failed={_fmt(cf.get('failed'))} skipped={_fmt(cf.get('skipped'))} "
        f"duration_ms={_fmt(cf.get('duration_ms'))}",
        f"  user_synced lines      {run.user_synced_lines}",
        f"  unsynced due users     {_fmt(run.unsynced_due_users)}",
        f"  cycle wall             {_fmt(d['cycle_wall_s'], '.3f')} s",
        f"  process wall           {_fmt(t.elapsed_s, '.3f')} s",
        f"  ideal N*lat/conc       {d['ideal_s']:.3f} s",
        f"  efficiency             cycle {_fmt(d['efficiency_cycle'], '.1%')}, "
        f"process {_fmt(d['efficiency_process'], '.1%')}",
        f"  CPU user+sys           {_fmt(t.user_s, '.2f')} + {_fmt(t.system_s, '.2f')} = "
        f"{_fmt(t.cpu_s, '.2f')} s",
        f"  CPU per synced user    {_fmt(d['cpu_us_per_synced_user'], '.1f')} us",
    ]
    if run.kind == "measured" and startup_cpu is not None and t.cpu_s is not None and run.due:
        net = (t.cpu_s - startup_cpu) / run.due * 1e6
        lines.append(
            f"  CPU per user, net      {net:.1f} us"
            f"  ((cpu_N - cpu_0) / N, cpu_0={startup_cpu:.2f} s)"
        )
    lines += [
        f"  peak RSS               {_fmt(d['peak_rss_mib'], '.1f')} MiB",
        f"  backend                requests={_fmt(b.get('requests'))} "
        f"successes={_fmt(b.get('successes'))} overlaps={_fmt(b.get('overlaps'))} "
        f"max_in_flight={_fmt(b.get('max_in_flight'))} by_status={b.get('by_status')}",
        f"  backend users          called={_fmt(b.get('users_called'))} "
        f"more_than_once={_fmt(b.get('users_called_more_than_once'))} "
        f"not_due_called={_fmt(b.get('not_due_users_called'))} "
        f"cpu={_fmt(run.backend_cpu_s, '.2f')} s",
        f"  log levels             {run.levels}",
    ]
    odd = {k: v for k, v in run.events.items() if k not in _EXPECTED_EVENTS}
    if odd:
        lines.append(f"  other events           {odd}")
    if run.exit_status != 0 and run.stderr_tail.strip():
        lines.append("  stderr: " + run.stderr_tail.strip().replace("\n", "\n          "))
    return lines


_EXPECTED_EVENTS = {"cycle_requested", "cycle_started", "user_synced", "cycle_finished"}


def problems(run: RunResult) -> list[str]:
    found = []
    cf, b = run.cycle_finished or {}, run.backend
    if run.timed_out:
        found.append("timed out")
    if run.exit_status != 0:
        found.append(f"exit status {run.exit_status}")
    if not cf:
        found.append("no cycle_finished event")
    if cf.get("failed"):
        found.append(f"{cf['failed']} failed")
    if cf and cf.get("succeeded") != run.due:
        found.append(f"succeeded {cf.get('succeeded')} != due {run.due}")
    if run.user_synced_lines != run.due:
        found.append(f"{run.user_synced_lines} user_synced lines != due {run.due}")
    if run.unsynced_due_users:
        found.append(f"{run.unsynced_due_users} due users still unsynced")
    if b.get("overlaps"):
        found.append(f"{b['overlaps']} backend overlaps")
    if b.get("not_due_users_called"):
        found.append(f"{b['not_due_users_called']} not-due users called")
    if (b.get("max_in_flight") or 0) > run.concurrency:
        found.append(f"max_in_flight {b['max_in_flight']} > concurrency {run.concurrency}")
    if b.get("requests") is not None and b["requests"] != run.due:
        found.append(f"backend saw {b['requests']} requests for {run.due} due users")
    return found


MARKDOWN_HEADER = (
    "| date | due | table | latency ms | conc | cycle s | process s | ideal s | eff (cycle) "
    "| CPU us/user | net CPU us/user | startup CPU s | peak RSS MiB | failed | overlaps "
    "| max in flight | exit |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown_row(run: RunResult, startup_cpu: float | None) -> str:
    d, t, b, cf = run.derived(), run.time, run.backend, run.cycle_finished or {}
    net = None
    if startup_cpu is not None and t.cpu_s is not None and run.due:
        net = (t.cpu_s - startup_cpu) / run.due * 1e6
    cells = [
        datetime.now(UTC).strftime("%Y-%m-%d"),
        f"{run.due:,}",
        f"{run.table_size:,}",
        f"{run.latency_ms:g}",
        str(run.concurrency),
        _fmt(d["cycle_wall_s"], ".2f"),
        _fmt(t.elapsed_s, ".2f"),
        f"{d['ideal_s']:.2f}",
        _fmt(d["efficiency_cycle"], ".0%"),
        _fmt(d["cpu_us_per_synced_user"], ".0f"),
        _fmt(net, ".0f"),
        _fmt(startup_cpu, ".2f"),
        _fmt(d["peak_rss_mib"], ".0f"),
        _fmt(cf.get("failed")),
        _fmt(b.get("overlaps")),
        _fmt(b.get("max_in_flight")),
        _fmt(run.exit_status),
    ]
    return "| " + " | ".join(cells) + " |"


def environment_info() -> dict[str, Any]:
    return {
        "daemon_version": daemon_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "time_tool": str(TIME_BIN) if TIME_BIN.exists() else "os.wait4",
    }


# -- main --------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir_for(args: argparse.Namespace) -> Iterator[Path]:
    if args.workdir is None:
        path = Path(tempfile.mkdtemp(prefix="background-sync-bench-"))
        created = True
    else:
        path = args.workdir.resolve()
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        if not created and any(path.iterdir()):
            raise BenchError(f"--workdir {path} is not empty")
    try:
        yield path
    finally:
        if args.keep:
            print(f"workdir kept: {path}", file=sys.stderr)
        elif created:
            shutil.rmtree(path, ignore_errors=True)
        else:
            for child in path.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def say(message: str) -> None:
    print(message, flush=True)


def benchmark(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> None:
    if not TIME_BIN.exists():
        say(f"note: {TIME_BIN} not found (apt-get install -y time); using os.wait4 instead")
    database_url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
    settings = settings_module.load(daemon_environment(database_url, None, args.concurrency))
    report["database"] = settings.redacted()["database_url"]
    engine = make_engine(database_url)
    backend = Backend(workdir, args.latency_ms)
    try:
        if args.database_url:
            check_scratch_database(engine, settings)
        env = daemon_environment(database_url, None, args.concurrency)
        started = time.monotonic()
        run_command([*daemon_command(), "migrate"], env, "background-sync migrate")
        report["setup"] = {"migrate_s": round(time.monotonic() - started, 2)}
        fill_s = fill_users(engine, settings, args.due, args.table_size)
        report["setup"]["fill_s"] = round(fill_s, 2)
        say(
            f"setup: migrate {report['setup']['migrate_s']:.2f} s, filled {args.table_size:,} "
            f"users ({args.due:,} due) in {fill_s:.2f} s"
        )
        backend.start()
        env = daemon_environment(database_url, backend.base_url + BACKEND_PATH, args.concurrency)
        say(f"reference backend on {backend.base_url} (pid {backend.proc and backend.proc.pid})")
        once = functools.partial(
            run_once,
            args=args,
            workdir=workdir,
            env=env,
            backend=backend,
            engine=engine,
            settings=settings,
        )
        measured: list[RunResult] = report["_measured"]
        startup: list[RunResult] = report["_startup"]
        for i in range(args.repeat):
            if i:
                set_due(engine, settings, args.due, synced=False)
            say(f"running once: measured #{i + 1} of {args.repeat} ...")
            measured.append(once(kind="measured", index=i + 1, due=args.due))
        if not args.no_startup:
            set_due(engine, settings, args.due, synced=True)  # nothing due, same table
            for i in range(args.repeat):
                say(f"running once: startup (0 due) #{i + 1} of {args.repeat} ...")
                startup.append(once(kind="startup", index=i + 1, due=0))
    finally:
        backend.stop()
        engine.dispose()


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "parameters": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("database_url",)
        },
        "environment": environment_info(),
        "_measured": [],
        "_startup": [],
    }
    error: str | None = None
    interrupted = False
    try:
        with workdir_for(args) as workdir:
            say(f"workdir: {workdir}")
            benchmark(args, workdir, report)
    except BenchError as exc:
        error = str(exc)
    except KeyboardInterrupt:
        interrupted, error = True, "interrupted"

    measured: list[RunResult] = report.pop("_measured")
    startup: list[RunResult] = report.pop("_startup")
    startup_cpus = [r.time.cpu_s for r in startup if r.time.cpu_s is not None]
    startup_cpu = round(statistics.median(startup_cpus), 3) if startup_cpus else None
    say("")
    for run in [*measured, *startup]:
        for line in describe(run, startup_cpu):
            say(line)
        found = problems(run) if run.kind == "measured" else startup_problems(run)
        say(f"  PROBLEMS: {'; '.join(found)}" if found else "  problems: none")
        say("")
    summary = summarize(measured, startup, startup_cpu)
    if summary:
        say("summary (median over measured runs):")
        for key, value in summary.items():
            say(f"  {key:32} {_fmt(value)}")
    if args.markdown and measured:
        say("")
        say(MARKDOWN_HEADER)
        for run in measured:
            say(markdown_row(run, startup_cpu))
    report["measured"] = [r.to_json() for r in measured]
    report["startup"] = [r.to_json() for r in startup]
    report["startup_cpu_s_median"] = startup_cpu
    report["summary"] = summary
    report["error"] = error
    report["problems"] = {
        f"{r.kind}-{r.index}": problems(r) if r.kind == "measured" else startup_problems(r)
        for r in [*measured, *startup]
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
        say(f"results written to {args.output}")
    if error:
        print(f"run_bench: {error}", file=sys.stderr)
        return 130 if interrupted else 2
    return 1 if any(report["problems"].values()) else 0


def startup_problems(run: RunResult) -> list[str]:
    found = []
    if run.timed_out:
        found.append("timed out")
    if run.exit_status != 0:
        found.append(f"exit status {run.exit_status}")
    cf = run.cycle_finished or {}
    if not cf:
        found.append("no cycle_finished event")
    elif cf.get("claimed"):
        found.append(f"claimed {cf['claimed']} users though none were due")
    if run.backend.get("requests"):
        found.append(f"backend saw {run.backend['requests']} requests")
    return found


def summarize(
    measured: list[RunResult], startup: list[RunResult], startup_cpu: float | None
) -> dict[str, Any]:
    if not measured:
        return {}

    def median(values: list[Any]) -> Any:
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    derived = [r.derived() for r in measured]
    due = measured[0].due
    cpus = [r.time.cpu_s for r in measured]
    cpu = median(cpus)
    return {
        "due": due,
        "table_size": measured[0].table_size,
        "cycle_wall_s": median([d["cycle_wall_s"] for d in derived]),
        "process_wall_s": median([d["process_wall_s"] for d in derived]),
        "ideal_s": derived[0]["ideal_s"],
        "efficiency_cycle": median([d["efficiency_cycle"] for d in derived]),
        "efficiency_process": median([d["efficiency_process"] for d in derived]),
        "cpu_s": cpu,
        "cpu_us_per_synced_user": median([d["cpu_us_per_synced_user"] for d in derived]),
        "startup_cpu_s": startup_cpu,
        "net_cpu_us_per_user": (
            round((cpu - startup_cpu) / due * 1e6, 1)
            if cpu is not None and startup_cpu is not None and due
            else None
        ),
        "peak_rss_mib": median([d["peak_rss_mib"] for d in derived]),
        "startup_peak_rss_mib": median([r.derived()["peak_rss_mib"] for r in startup]),
    }


if __name__ == "__main__":
    sys.exit(main())
