"""`background-sync logs`: the JSON log lines, filtered and printed for a person.

The daemon's log is JSON (the journal, or the manage script's log file) so that tools can
read it; this command is the tool for a person at a terminal. It reads a file or stdin
(`journalctl -u background-sync -o cat | background-sync logs`), keeps the records that
pass the filters and prints them in the console's short form (daemon/logline.py).
A line that is not a JSON object (systemd's own lines, a traceback) is printed as it is:
the filters cannot know what it belongs to, and a reader must never lose or choke on it.

It reads no settings: it works where no SYNC_* variable is set, on a copy of a log taken
from another host.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import structlog

from daemon import logline

EX_OK = 0
EX_USAGE = 2  # argparse's
EX_NOINPUT = 66  # sysexits: FILE cannot be opened
FOLLOW_POLL_SECONDS = 0.25

LEVELS = ("debug", "info", "warning", "error", "critical")
_RANK = {name: rank for rank, name in enumerate(LEVELS)}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

EXIT_CODES = """\
exit status:
  0   done; also when the reader stops early (`background-sync logs | head`)
  2   bad arguments (an unknown --level, a --since that is neither a duration nor a time)
  66  FILE cannot be opened
  Ctrl-C ends the command by SIGINT, as it ends other filters (status 130 in a shell)."""


# -- filters (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """What a record must match. A record lacking the field a filter asks about does not."""

    min_level: str | None = None
    users: frozenset[str] = frozenset()
    run: str | None = None
    since: datetime | None = None

    def admits(self, record: Mapping[str, Any]) -> bool:
        if self.min_level is not None:
            rank = _RANK.get(str(record.get("level", "")).lower())
            if rank is None or rank < _RANK[self.min_level]:
                return False
        if self.users and str(record.get("user_id")) not in self.users:
            return False
        if self.run is not None and not str(record.get("run_id", "")).startswith(self.run):
            return False
        if self.since is not None:
            moment = record_time(record)
            if moment is None or moment < self.since:
                return False
        return True


def parse_since(text: str, *, now: datetime) -> datetime:
    """`10m`, `2h`, `1d`, `90s`, `1h30m` before `now`, or an ISO time (UTC if it names no
    zone, like the log's own timestamps). ValueError for anything else."""
    spec = text.strip()
    parts = _DURATION.findall(spec)
    if parts and _DURATION.sub("", spec).strip() == "":
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
        return now - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(spec)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (10m, 2h, 1d) nor an ISO time (2026-12-01T14:00)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def record_time(record: Mapping[str, Any]) -> datetime | None:
    stamp = record.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse(line: str) -> dict[str, Any] | None:
    """The record on a line, or None when the line is not a JSON object."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# -- rendering (pure) -----------------------------------------------------------------


def renderer(*, colors: bool) -> Callable[[Mapping[str, Any]], str]:
    """A function from a record to its line(s), as the daemon's console prints them."""
    console = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False)

    def render(record: Mapping[str, Any]) -> str:
        fields = logline.for_people(record)
        exception = fields.get("exception")
        if exception is not None and not isinstance(exception, str):
            fields["exception"] = traceback_text(exception)
        level = str(fields.get("level", ""))
        line = console(None, level, fields)
        assert isinstance(line, str)
        return line

    return render


def traceback_text(exception: object) -> str:
    """structlog's dict_tracebacks (a list of exceptions with frames) back as text."""
    if not isinstance(exception, list):
        return str(exception)
    out: list[str] = []
    for exc in exception:
        if not isinstance(exc, dict):
            out.append(str(exc))
            continue
        out.append("Traceback (most recent call last):")
        for frame in exc.get("frames") or ():
            if isinstance(frame, dict):
                where = f'  File "{frame.get("filename")}", line {frame.get("lineno")}'
                out.append(f"{where}, in {frame.get('name')}")
        out.append(f"{exc.get('exc_type')}: {exc.get('exc_value')}")
    return "\n".join(out)


def view(
    lines: Iterable[str],
    out: TextIO,
    *,
    filters: Filters,
    render: Callable[[Mapping[str, Any]], str] | None,
    flush: bool = False,
) -> None:
    """Print what passes: records rendered (or as they were, with `render=None`),
    other lines unchanged."""
    for line in lines:
        text = line.rstrip("\n")
        record = parse(text)
        if record is None:
            out.write(text + "\n")
        elif filters.admits(record):
            out.write((render(record) if render is not None else text) + "\n")
        else:
            continue
        if flush:
            out.flush()


# -- input ----------------------------------------------------------------------------


def _open(path: str) -> TextIO:
    return open(path, encoding="utf-8", errors="replace")


def follow(
    path: str,
    handle: TextIO,
    *,
    sleep: Callable[[float], None] = time.sleep,
    poll: float = FOLLOW_POLL_SECONDS,
) -> Generator[str, None, None]:
    """The lines of `handle` (open on `path`), then those appended to it, forever, like
    `tail -F`: a file replaced (rotated) or truncated is read again from its start."""
    partial = ""
    try:
        while True:
            chunk = handle.readline()
            if chunk:
                if chunk.endswith("\n"):
                    yield partial + chunk
                    partial = ""
                else:
                    partial += chunk  # the writer is in the middle of a line
                continue
            sleep(poll)
            if _replaced(path, handle):
                # What the writer added to the old file in the meantime comes first.
                yield from (partial + handle.read()).splitlines(keepends=True)
                handle.close()
                handle = _open(path)
                partial = ""
    finally:
        handle.close()


def _replaced(path: str, handle: TextIO) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False  # rotated away, its successor not there yet: keep the old one
    mine = os.fstat(handle.fileno())
    read = os.lseek(handle.fileno(), 0, os.SEEK_CUR)  # at the end of the data: all consumed
    return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino) or now.st_size < read


# -- the command ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Print the daemon's JSON log lines (a FILE, or stdin) in the console's short form,\n"
        "filtered. Lines that are not JSON objects are printed unchanged, whatever the\n"
        "filters. Reads no settings."
    )
    parser.epilog = (
        "examples:\n"
        "  journalctl -u background-sync -o cat | background-sync logs --level warning\n"
        "  background-sync logs var/log/background-sync.log --user 42 --since 2h\n\n" + EXIT_CODES
    )
    parser.add_argument(
        "file", nargs="?", default="-", metavar="FILE", help="a log file; stdin if - or absent"
    )
    parser.add_argument(
        "--level", type=str.lower, choices=LEVELS, help="only records at this level or above"
    )
    parser.add_argument(
        "--user", action="append", default=[], metavar="ID", help="only this user's lines"
    )
    parser.add_argument("--run", metavar="RUN_ID", help="only this run's lines (a prefix will do)")
    parser.add_argument(
        "--since", metavar="WHEN", help="only records since a duration ago (10m, 2h) or a time"
    )
    parser.add_argument("--follow", "-f", action="store_true", help="keep reading FILE as it grows")
    parser.add_argument(
        "--json", action="store_true", help="print matching records as the JSON lines they are"
    )


def main_from_args(args: argparse.Namespace) -> int:
    """The command, on the process's own streams."""
    # Ctrl-C ends a filter quietly and by the signal, so that a shell pipeline sees it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")  # a stray byte is a line to show, not a crash
    try:
        return run(args, stdin=sys.stdin, stdout=sys.stdout, now=datetime.now(UTC))
    except BrokenPipeError:
        _quiet_stdout(sys.stdout)
        return EX_OK


def run(args: argparse.Namespace, *, stdin: TextIO, stdout: TextIO, now: datetime) -> int:
    out = stdout
    try:
        since = parse_since(args.since, now=now) if args.since else None
    except ValueError as exc:
        print(f"background-sync logs: --since: {exc}", file=sys.stderr)
        return EX_USAGE
    filters = Filters(min_level=args.level, users=frozenset(args.user), run=args.run, since=since)
    colors = out.isatty() and not os.environ.get("NO_COLOR")
    render = None if args.json else renderer(colors=colors)
    reading_stdin = args.file == "-"
    if args.follow and reading_stdin:
        print("background-sync logs: --follow needs a FILE", file=sys.stderr)
        return EX_USAGE
    if reading_stdin:
        view(stdin, out, filters=filters, render=render, flush=True)
        return _flushed(out)
    try:
        handle = _open(args.file)
    except OSError as exc:
        print(f"background-sync logs: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EX_NOINPUT
    lines: Generator[str, None, None] | TextIO = (
        follow(args.file, handle) if args.follow else handle
    )
    with contextlib.closing(handle), contextlib.closing(lines):
        view(lines, out, filters=filters, render=render, flush=args.follow)
    return _flushed(out)


def _flushed(out: TextIO) -> int:
    out.flush()
    return EX_OK


def _quiet_stdout(out: TextIO) -> None:
    """The reader went away (`| head`): nothing more to say, and nothing to say it with.

    stdout points at /dev/null from here on, so that the interpreter's final flush does
    not print "Exception ignored ... BrokenPipeError" on stderr.
    """
    try:
        fileno = out.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fileno)
    os.close(devnull)
