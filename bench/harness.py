"""What every bench command shares: its options, the work directory, the backend and
the workload set up once, cleaned up on error, Ctrl-C or SIGTERM, and the JSON record."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import clients, report
from bench.backend import ReferenceBackend
from bench.interleave import Interleaver, Run
from bench.procs import TIME_BIN
from bench.workload import Workload

RESULTS = Path(__file__).resolve().parent / "results"


def say(message: str) -> None:
    print(message, flush=True)


def trees(specs: Sequence[str]) -> list[tuple[str, Path | None]]:
    """This tree (None: the one on sys.path), then each `--daemon-from NAME=DIR`."""
    found: list[tuple[str, Path | None]] = [("this tree", None)]
    for spec in specs:
        name, _, source = spec.partition("=")
        found.append((name, Path(source)))
    return found


def spread(values: Sequence[float], spec: str) -> str:
    """A tree's rounds as every table writes them: `median (low-high)` (report.Spread)."""
    found = report.Spread.of(values)
    return found.fmt(spec) if found is not None else "-"


def publish(section: str, text: str, *, write_doc: bool) -> None:
    """Print a figure's text; with `write_doc`, also put it in its section of the doc."""
    say(text)
    if write_doc:
        report.write_section(section, text)


def add_common(parser: argparse.ArgumentParser, *, due: int) -> None:
    parser.add_argument("--due", type=int, default=due, help="users never synced (due)")
    parser.add_argument(
        "--table-size", type=int, default=None, help="rows in the users table (default: --due)"
    )
    parser.add_argument("--latency-ms", type=float, default=50.0, help="backend latency")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--clients",
        default=",".join(clients.NAMES),
        help="which of floor,peer,daemon to run, in this order",
    )
    parser.add_argument(
        "--database-url", default=None, help="an empty scratch database instead of SQLite"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs, db)")
    parser.add_argument("--output", type=Path, default=None, help="the JSON record")
    parser.add_argument(
        "--write-doc", action="store_true", help="rewrite this figure's section of the doc"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    parser.add_argument(
        "--daemon-from",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run the daemon package found in DIR, as client NAME (repeatable)",
    )


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.table_size is None:
        args.table_size = args.due
    if args.due < 1 or args.table_size < args.due:
        parser.error("need 1 <= --due <= --table-size")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    unknown = [n for n in names if n not in clients.BY_NAME]
    if unknown or not names:
        parser.error(f"--clients: unknown {', '.join(unknown) or '(none)'}")
    args.client_list = [clients.BY_NAME[n] for n in names]
    for spec in args.daemon_from:
        name, sep, source = spec.partition("=")
        if not sep or not name or name in clients.BY_NAME:
            parser.error(f"--daemon-from {spec}: want NAME=DIR, NAME not floor/peer/daemon")
        try:
            args.client_list.append(clients.daemon_from(name, Path(source)))
        except ValueError as exc:
            parser.error(f"--daemon-from: {exc}")


@dataclass
class Bench:
    workdir: Path
    backend: ReferenceBackend
    workload: Workload
    runner: Interleaver
    meta: dict[str, Any]


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _workdir(args: argparse.Namespace) -> Iterator[Path]:
    path = args.workdir or Path(tempfile.mkdtemp(prefix="background-sync-bench-"))
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if args.keep:
            say(f"workdir kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def prepared(args: argparse.Namespace) -> Iterator[Bench]:
    """The backend process and the filled database, for the length of the block."""
    signal.signal(signal.SIGTERM, _interrupt)
    if not TIME_BIN.exists():
        say(f"note: {TIME_BIN} missing (apt-get install -y time); using os.wait4")
    meta = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": report.git_commit(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_before": report.uptime(),
        "parameters": {k: str(v) for k, v in vars(args).items() if k != "client_list"},
    }
    with _workdir(args) as workdir:
        workload = (
            Workload(args.database_url, args.due, args.table_size)
            if args.database_url
            else Workload.sqlite(workdir, args.due, args.table_size)
        )
        backend = ReferenceBackend(workdir, args.latency_ms)
        try:
            seconds = workload.create(scratch_check=bool(args.database_url))
            say(f"setup: {args.table_size:,} users ({args.due:,} due) in {seconds:.1f} s")
            backend.start()
            say(f"reference backend on {backend.base_url}, latency {args.latency_ms:g} ms")
            runner = Interleaver(workdir, backend, workload, timeout=args.timeout, say=say)
            yield Bench(workdir, backend, workload, runner, meta)
        finally:
            backend.stop()
            workload.dispose()
            meta["load_after"] = report.uptime()


def save(name: str, args: argparse.Namespace, meta: dict[str, Any], runs: Sequence[Run]) -> Path:
    path = args.output or RESULTS / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "runs": [r.to_json() for r in runs]}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    say(f"results written to {path}")
    return path


def main_guard(body: Any, argv: Sequence[str] | None) -> int:
    """Exit 0 when clean, 1 when a run had problems, 2 on setup failure, 130 on Ctrl-C."""
    from bench.procs import BenchError

    try:
        return int(body(argv))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
