"""The three clients the bench compares, each a process with its own command and log.

- floor: bare aiohttp (bench/floor.py), no database, no logs;
- peer: the quick build (bench/peer.py), gather under a semaphore, one commit per user;
- daemon: `python -m daemon once` (bench/daemon_run.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import daemon_run
from bench.procs import base_environment, python_command

NAMES = ("floor", "peer", "daemon")


@dataclass(frozen=True)
class Target:
    """What a client runs against: the database, the backend, how many users, concurrency."""

    database_url: str
    backend_url: str
    users: int
    concurrency: int


@dataclass(frozen=True)
class Client:
    name: str
    command: Callable[[Target], list[str]]
    environment: Callable[[Target], dict[str, str]]
    read: Callable[[Path], dict[str, Any]]
    uses_database: bool


def _summary_line(path: Path) -> dict[str, Any]:
    """The last JSON line of a floor or peer run, and how many user_synced lines it wrote."""
    summary: dict[str, Any] = {}
    success_lines = 0
    with path.open(encoding="utf-8", errors="replace") as out:
        for line in out:
            if '"user_synced"' in line:
                success_lines += 1
            elif line.startswith("{") and "_finished" in line:
                summary = json.loads(line)
    summary["success_lines"] = success_lines
    return summary


def _floor_command(t: Target) -> list[str]:
    args = ["--url", t.backend_url, "--users", str(t.users), "--concurrency", str(t.concurrency)]
    return python_command("-m", "bench.floor", *args)


def _peer_command(t: Target) -> list[str]:
    args = ["--database-url", t.database_url, "--url", t.backend_url]
    return python_command("-m", "bench.peer", *args, "--concurrency", str(t.concurrency))


FLOOR = Client(
    name="floor",
    command=_floor_command,
    environment=lambda t: base_environment(),
    read=_summary_line,
    uses_database=False,
)
PEER = Client(
    name="peer",
    command=_peer_command,
    environment=lambda t: base_environment(),
    read=_summary_line,
    uses_database=True,
)
DAEMON = Client(
    name="daemon",
    command=lambda t: daemon_run.command(),
    environment=lambda t: daemon_run.environment(t.database_url, t.backend_url, t.concurrency),
    read=daemon_run.read_log,
    uses_database=True,
)
BY_NAME = {c.name: c for c in (FLOOR, PEER, DAEMON)}


def daemon_from(name: str, source: Path) -> Client:
    """The daemon as the tree at `source` has it (e.g. `git archive main daemon`), so that
    a change and the code before it are measured side by side in one interleaved run."""
    if not (source / "daemon" / "__main__.py").exists():
        raise ValueError(f"{source} has no daemon/ package")

    def environment(t: Target) -> dict[str, str]:
        env = daemon_run.environment(t.database_url, t.backend_url, t.concurrency)
        env["PYTHONPATH"] = os.pathsep.join([str(source.resolve()), env["PYTHONPATH"]])
        return env

    return Client(
        name=name,
        command=lambda t: daemon_run.command(),
        environment=environment,
        read=daemon_run.read_log,
        uses_database=True,
    )
