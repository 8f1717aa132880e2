#!/usr/bin/env python3
"""What `background-sync run` costs between cycles: CPU of an idle daemon, old vs new.

Starts idle daemons side by side, in the same window, so that the machine's noise hits
them alike: for each database kind (SQLite, PostgreSQL), one daemon of this tree and one
of a reference tree (by default `git archive main`, run with PYTHONPATH pointing at it).
Each gets its own fresh database with a users table where nobody is due, and an interval
of an hour, so that after the start-up cycle nothing runs but the loop and the control
poll. After `--settle` seconds the script reads utime+stime of every daemon from
/proc/PID/stat (and, for PostgreSQL, of the server process serving it, found through
pg_stat_activity), waits `--seconds`, reads again and prints the share of one core.

A systemd notify socket is given to every daemon (WATCHDOG_USEC as in the shipped unit,
WatchdogSec=30), so STATUS= and watchdog pings cost what they cost in production.

Run by hand, never by the test suite:

    .venv/bin/python bench/idle.py --seconds 120
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://127.0.0.1:5432/test"
TICKS = os.sysconf("SC_CLK_TCK")
WATCHDOG_USEC = 30_000_000  # systemd/background-sync.service: WatchdogSec=30


@dataclass
class Daemon:
    """One idle daemon under measurement."""

    tree: str  # "new" (this tree) or "old" (the reference tree)
    database: str  # "sqlite" or "postgresql"
    url: str
    code: Path
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    server_pids: list[int] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.tree}-{self.database}"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, every thread included (also threads that ended)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_ns(pid: int) -> int:
    """Time on CPU of the live threads, in ns (/proc/PID/task/*/schedstat): finer than
    the clock ticks of /proc/PID/stat, which an idle minute only moves a few times."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def reference_tree(ref: str, into: Path) -> Path:
    """The daemon as it is at `ref`, unpacked from `git archive`."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "daemon"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def environment(daemon: Daemon, notify_socket: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SYNC_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_PID")
    }
    env.update(
        {
            "PYTHONPATH": str(daemon.code),
            "PYTHONUNBUFFERED": "1",
            "SYNC_DATABASE_URL": daemon.url,
            # Nobody is due, so nobody is called: the backend need not exist.
            "SYNC_BACKEND_URL": "http://127.0.0.1:9/api/v1/sync/start",
            "SYNC_INTERVAL_SECONDS": "3600",
            "SYNC_JITTER_SECONDS": "0",
            "SYNC_STATUS_ADDRESS": "off",
            "SYNC_LOG_FORMAT": "json",
            "SYNC_LOG_LEVEL": "INFO",
            "NOTIFY_SOCKET": str(notify_socket),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
        }
    )
    return env


def prepare_database(daemon: Daemon, users: int) -> None:
    """Migrate with the daemon's own code, then a users table where nobody is due."""
    env = environment(daemon, Path("/nonexistent"))
    del env["NOTIFY_SOCKET"], env["WATCHDOG_USEC"]
    subprocess.run(
        [sys.executable, "-m", "daemon", "migrate"],
        env=env,
        cwd=daemon.workdir,
        check=True,
        capture_output=True,
    )
    script = (
        "import sys; from datetime import datetime, UTC\n"
        "from daemon import demo, settings\n"
        "from daemon.database import engine_for\n"
        "s = settings.load()\n"
        "e = engine_for(s)\n"
        "demo.seed(e, s, int(sys.argv[1]), last_sync=datetime.now(UTC).replace(tzinfo=None))\n"
        "e.dispose()\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(users)],
        env=env,
        cwd=daemon.workdir,
        check=True,
        capture_output=True,
    )


@contextlib.contextmanager
def postgres_databases(names: list[str]) -> Iterator[dict[str, str]]:
    """Fresh scratch databases, dropped afterwards whatever happens."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield {name: f"postgresql+psycopg://127.0.0.1:5432/{name}" for name in names}
        finally:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_pids(database: str) -> list[int]:
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            (database, "background-sync"),
        ).fetchall()
    return [int(row[0]) for row in rows]


def start(daemon: Daemon, notify_socket: Path) -> None:
    log = (daemon.workdir / f"{daemon.name}.log").open("wb")
    daemon.proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run"],
        env=environment(daemon, notify_socket),
        cwd=daemon.workdir,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(daemon: Daemon) -> None:
    proc = daemon.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(daemons: list[Daemon], seconds: float) -> None:
    def sample() -> dict[str, tuple[float, float, int]]:
        out = {}
        for d in daemons:
            assert d.proc is not None
            if d.proc.poll() is not None:
                raise SystemExit(f"{d.name} exited with {d.proc.returncode}; see its log")
            server = sum(cpu_seconds(pid) for pid in d.server_pids)
            out[d.name] = (cpu_seconds(d.proc.pid), server, run_ns(d.proc.pid))
        return out

    begin, t0 = sample(), time.monotonic()
    time.sleep(seconds)
    end, t1 = sample(), time.monotonic()
    elapsed = t1 - t0
    for d in daemons:
        (c0, s0, n0), (c1, s1, n1) = begin[d.name], end[d.name]
        d.cpu = {
            "elapsed_s": round(elapsed, 1),
            "daemon_cpu_s": round(c1 - c0, 3),
            "daemon_pct_of_core": round((c1 - c0) / elapsed * 100, 4),
            "daemon_threads_pct_of_core": round((n1 - n0) / 1e9 / elapsed * 100, 4),
        }
        if d.server_pids:
            d.cpu["server_cpu_s"] = round(s1 - s0, 3)
            d.cpu["server_pct_of_core"] = round((s1 - s0) / elapsed * 100, 4)


class NotifySocket:
    """systemd's side of NOTIFY_SOCKET, read all the time: a datagram socket nobody reads
    fills up after a few messages and then blocks the daemon's send (and its loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.5)
        self._open = True
        self._thread = threading.Thread(target=self._read, name="notify", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            with contextlib.suppress(TimeoutError):
                self._sock.recv(4096)
                self.received += 1

    def close(self) -> None:
        self._open = False
        self._thread.join()
        self._sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="measured window")
    parser.add_argument("--settle", type=float, default=20.0, help="wait after start-up")
    parser.add_argument("--users", type=int, default=1000, help="users (none due)")
    parser.add_argument("--ref", default="main", help="git ref of the reference tree")
    parser.add_argument(
        "--databases", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.databases.split(",") if k]

    work = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    tag = uuid.uuid4().hex[:8]
    pg_names = [f"bench_idle_{tree}_{tag}" for tree in ("old", "new")]
    daemons: list[Daemon] = []
    notify = NotifySocket(work / "notify.sock")
    notify_path = notify.path
    try:
        old_code = reference_tree(args.ref, work / "old-tree")
        new_code = work / "new-tree"
        new_code.mkdir()
        shutil.copytree(REPO / "daemon", new_code / "daemon")  # edits meanwhile change nothing
        trees = {"old": old_code, "new": new_code}
        with postgres_databases(pg_names if "postgresql" in kinds else []) as pg:
            for kind in kinds:
                for tree, code in trees.items():
                    workdir = work / f"{tree}-{kind}"
                    workdir.mkdir()
                    if kind == "sqlite":
                        url = f"sqlite:///{workdir / 'sync.db'}"
                    else:
                        url = pg[f"bench_idle_{tree}_{tag}"]
                    daemons.append(Daemon(tree, kind, url, code, workdir))
            for d in daemons:
                prepare_database(d, args.users)
            for d in daemons:
                start(d, notify_path)
            time.sleep(args.settle)
            for d in daemons:
                if d.database == "postgresql":
                    d.server_pids = server_pids(d.url.rsplit("/", 1)[1])
            received = notify.received
            uptime_before = Path("/proc/loadavg").read_text().split()[:3]
            measure(daemons, args.seconds)
            notifications = notify.received - received
            uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout
            for d in daemons:
                stop(d)
    finally:
        for d in daemons:
            stop(d)
        notify.close()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    result: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "ref": args.ref,
        "loadavg_before": uptime_before,
        "uptime_after": uptime_after.strip(),
        "cpus": os.cpu_count(),
        "notify_datagrams_all_daemons": notifications,
        "daemons": {d.name: d.cpu for d in daemons},
    }
    print(f"uptime: {result['uptime_after']}  (load before: {' '.join(uptime_before)})")
    print(f"{'daemon':<16} {'stat % core':>12} {'schedstat % core':>17} {'db server % core':>17}")
    for d in daemons:
        server = d.cpu.get("server_pct_of_core")
        print(
            f"{d.name:<16} {d.cpu['daemon_pct_of_core']:>11.3f}% "
            f"{d.cpu['daemon_threads_pct_of_core']:>16.3f}% "
            f"{'' if server is None else f'{server:>16.3f}%'}"
        )
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
