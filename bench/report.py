"""Figures from one interleaved run: medians, ratios to the floor, markdown, the doc.

Ratios are taken round by round (the daemon's run against the floor's run of the same
round) and then summarised; absolute figures of different bench runs are not compared.
Each bench command owns one section of docs/performance.md, between two markers, and
rewrites only that section, so the prose around it stays as written.
"""

from __future__ import annotations

import re
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.interleave import Run

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
CPU_TARGET = 1.3  # daemon CPU per user at most 1.3x the floor's
WALL_TARGET = 1.02  # daemon wall time at most 1.02x the floor's


@dataclass(frozen=True)
class Spread:
    """The median of a few values and their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        known = [v for v in values if v is not None]
        if not known:
            return None
        return cls(statistics.median(known), min(known), max(known))

    def fmt(self, spec: str) -> str:
        if self.low == self.high:
            return format(self.median, spec)
        return f"{self.median:{spec}} ({self.low:{spec}}-{self.high:{spec}})"


def by_client(runs: Sequence[Run], client: str, concurrency: int | None = None) -> list[Run]:
    return [
        r
        for r in runs
        if r.client == client and r.users and (concurrency is None or r.concurrency == concurrency)
    ]


def ratios(runs: Sequence[Run], client: str, attr: str, concurrency: int) -> Spread | None:
    """`client`'s figure over the floor's, per round of one concurrency."""
    floor = {r.round: r for r in by_client(runs, "floor", concurrency)}
    values: list[float | None] = []
    for run in by_client(runs, client, concurrency):
        base = floor.get(run.round)
        mine, theirs = getattr(run, attr), getattr(base, attr) if base else None
        values.append(mine / theirs if mine is not None and theirs else None)
    return Spread.of(values)


def net_cpu_us(run: Run, baselines: Sequence[Run]) -> float | None:
    """CPU per user net of the client's fixed cost (its run with nothing to do)."""
    base = [b.usage.cpu_s for b in baselines if b.client == run.client and not b.users]
    if not base or not run.users:
        return None
    return (run.usage.cpu_s - statistics.median(base)) / run.users * 1e6


def _fmt(spread: Spread | None, spec: str, suffix: str = "") -> str:
    return "n/a" if spread is None else spread.fmt(spec) + suffix


def cpu_table(runs: Sequence[Run], concurrency: int) -> str:
    """The headline table: each client's CPU and wall time, and both against the floor."""
    lines = [
        "| client | CPU µs/user | net of start-up | CPU vs floor | work wall s "
        "| of ideal | wall vs floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for client in dict.fromkeys(r.client for r in runs):  # in the order they ran
        mine = by_client(runs, client, concurrency)
        if not mine:
            continue
        lines.append(
            f"| {client} | {_fmt(Spread.of(r.cpu_us_per_user for r in mine), '.0f')} "
            f"| {_fmt(Spread.of(net_cpu_us(r, runs) for r in mine), '.0f')} "
            f"| {_fmt(ratios(runs, client, 'cpu_us_per_user', concurrency), '.2f', 'x')} "
            f"| {_fmt(Spread.of(r.work_wall_s for r in mine), '.2f')} "
            f"| {_fmt(Spread.of(r.efficiency for r in mine), '.3f')} "
            f"| {_fmt(ratios(runs, client, 'work_wall_s', concurrency), '.3f', 'x')} |"
        )
    return "\n".join(lines)


def targets_table(runs: Sequence[Run], concurrency: int) -> str:
    cpu = ratios(runs, "daemon", "cpu_us_per_user", concurrency)
    wall = ratios(runs, "daemon", "work_wall_s", concurrency)

    def verdict(spread: Spread | None, target: float) -> str:
        if spread is None:
            return "not measured"
        return "reached" if spread.median <= target else "**not reached**"

    return "\n".join(
        [
            "| target | measured (median of the rounds) | |",
            "|---|---:|---|",
            f"| daemon CPU per user ≤ {CPU_TARGET}x the floor's "
            f"| {_fmt(cpu, '.2f', 'x')} | {verdict(cpu, CPU_TARGET)} |",
            f"| daemon wall time ≤ {WALL_TARGET}x the floor's "
            f"| {_fmt(wall, '.3f', 'x')} | {verdict(wall, WALL_TARGET)} |",
        ]
    )


def problems_line(runs: Sequence[Run]) -> str:
    from bench.interleave import problems

    found = [
        f"{r.client} round {r.round}: {'; '.join(p)}" for r in runs if r.users if (p := problems(r))
    ]
    return "Checks: " + (
        "; ".join(found)
        if found
        else (
            "every run synced every user once (no failures, no overlapping calls, no user "
            "left unsynced, at most C calls in flight)."
        )
    )


def machine_line(meta: dict[str, Any]) -> str:
    return (
        f"{meta['started_at']}, commit {meta['commit']}, {meta['cpus']} cores, Python "
        f"{meta['python']}; load before: `{meta['load_before']}`; after: `{meta['load_after']}`"
    )


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "daemon"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def uptime() -> str:
    done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in doc."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
