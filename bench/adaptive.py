#!/usr/bin/env python3
"""Adaptive concurrency against a backend whose capacity changes: does the limit follow?

Starts the reference backend as its own process with a server-side capacity (requests
beyond it wait for a slot, beyond a queue bound they get 503), measures its unloaded
latency with one sequential client, then runs `background-sync once` over enough due
users to keep it busy for the whole run, with SYNC_CONCURRENCY well above the capacity.
While it runs the capacity is full, then halved, then full again (set at run time through
/_control/faults). From the daemon's JSON log (`concurrency_limit_changed`, `user_synced`
with its duration) it reports, per phase: the limit, backend latency against the
unloaded value, throughput against the capacity (capacity / unloaded latency), and how
many windows the limit took to follow each change. Plots the limit against the capacity
(docs/adaptive-concurrency.png) and replaces the "Adaptive concurrency" section at the
end of docs/performance.md.

Run by hand (`.venv/bin/python bench/adaptive.py`); matplotlib is a bench-only extra
(requirements-bench.txt), never a runtime dependency. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Adaptive concurrency"
PATH = "/api/v1/sync/start"
WINDOW_MIN_CALLS = 20  # daemon.limiter.WINDOW_MIN_CALLS: a window is at least this many calls


@dataclass
class Phase:
    name: str
    capacity: int
    started: float  # Unix time
    ended: float = 0.0


@dataclass
class Run:
    unloaded_s: float
    phases: list[Phase] = field(default_factory=list)
    changes: list[tuple[float, int, str]] = field(default_factory=list)  # (t, new, reason)
    calls: list[tuple[float, float]] = field(default_factory=list)  # (finished at, seconds)
    initial_limit: int = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon", *args]


def environment(
    database: Path, backend_url: str, maximum: int, adaptive: bool = True
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    for name in ("NOTIFY_SOCKET", "STATE_DIRECTORY", "CREDENTIALS_DIRECTORY", "WATCHDOG_USEC"):
        env.pop(name, None)
    return env | {
        "SYNC_DATABASE_URL": f"sqlite:///{database}",
        "SYNC_BACKEND_URL": backend_url,
        "SYNC_CONCURRENCY": str(maximum),
        "SYNC_ADAPTIVE_CONCURRENCY": "true" if adaptive else "false",
        "SYNC_LOG_FORMAT": "json",
        "SYNC_LOG_LEVEL": "INFO",
        "SYNC_STATUS_ADDRESS": "off",
        "SYNC_JITTER_SECONDS": "0",
        "SYNC_RETRY_DELAY_SECONDS": "0.2",
        "SYNC_LEASE_SECONDS": "600",
    }


def put_faults(base: str, **faults: Any) -> None:
    request = urllib.request.Request(
        f"{base}/_control/faults", data=json.dumps(faults).encode(), method="PUT"
    )
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def wait_for_backend(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the reference backend exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the reference backend did not answer /health within 20 s")


async def unloaded_latency(url: str, calls: int) -> float:
    """The median of sequential calls: the backend's latency with nothing queued."""
    durations = []
    async with aiohttp.ClientSession() as session:
        for i in range(calls):
            begin = time.perf_counter()
            async with session.post(url, json={"user_id": f"probe-{i}"}) as response:
                await response.read()
            durations.append(time.perf_counter() - begin)
    return statistics.median(durations)


def read_log(path: Path, run: Run) -> None:
    for line in path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        name = event.get("event")
        if name not in ("concurrency_limit_changed", "user_synced"):
            continue
        at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        if name == "concurrency_limit_changed":
            run.changes.append((at, int(event["new"]), str(event["reason"])))
        else:
            run.calls.append((at, event["duration_ms"] / 1000))


def limit_at(run: Run, moment: float) -> int:
    limit = run.initial_limit
    for at, new, _ in run.changes:
        if at > moment:
            break
        limit = new
    return limit


def time_weighted_limit(run: Run, start: float, end: float, step: float = 0.05) -> float:
    samples = [limit_at(run, start + i * step) for i in range(int((end - start) / step))]
    return statistics.fmean(samples) if samples else float("nan")


def settle_time(run: Run, after: float, until: float, ok: Any) -> tuple[float | None, int, int]:
    """(seconds, limit changes, completed calls) from `after` to the first moment the
    limit satisfies `ok`; None seconds when it never does before `until`."""
    moments = [after] + [at for at, _, _ in run.changes if after < at <= until]
    for moment in moments:
        if ok(limit_at(run, moment)):
            changes = sum(1 for at, _, _ in run.changes if after < at <= moment)
            calls = sum(1 for at, _ in run.calls if after < at <= moment)
            return moment - after, changes, calls
    return None, 0, 0


@dataclass
class Figures:
    phase: Phase
    settled_from: float
    limit_mean: float
    latency_median_s: float
    latency_p90_s: float
    throughput: float
    capacity_throughput: float


def phase_figures(run: Run, phase: Phase, settle_share: float) -> Figures:
    start = phase.started + (phase.ended - phase.started) * settle_share
    inside = [d for at, d in run.calls if start <= at < phase.ended]
    inside.sort()
    seconds = phase.ended - start
    return Figures(
        phase=phase,
        settled_from=start,
        limit_mean=time_weighted_limit(run, start, phase.ended),
        latency_median_s=statistics.median(inside) if inside else float("nan"),
        latency_p90_s=inside[int(len(inside) * 0.9)] if inside else float("nan"),
        throughput=len(inside) / seconds if seconds > 0 else float("nan"),
        capacity_throughput=phase.capacity / run.unloaded_s,
    )


def plot(run: Run, figures: list[Figures], path: Path, maximum: int) -> None:
    import matplotlib  # a bench extra: imported here, only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = run.phases[0].started
    end = run.phases[-1].ended
    steps = [0.0] + [at - t0 for at, _, _ in run.changes if at <= end] + [end - t0]
    limits = [run.initial_limit] + [new for at, new, _ in run.changes if at <= end]
    limits.append(limits[-1])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 2])
    top.step(steps, limits, where="post", label="adaptive limit", color="tab:blue")
    cap_x, cap_y = [], []
    for phase in run.phases:
        cap_x += [phase.started - t0, phase.ended - t0]
        cap_y += [phase.capacity, phase.capacity]
    top.plot(cap_x, cap_y, "--", color="tab:red", label="backend capacity")
    top.axhline(maximum, color="grey", linewidth=0.8, linestyle=":", label="SYNC_CONCURRENCY")
    top.set_ylabel("calls in flight")
    top.set_ylim(0, maximum * 1.1)
    top.legend(loc="upper right")
    top.set_title("Adaptive concurrency limit against a changing backend capacity")
    bins: dict[int, list[float]] = {}
    for at, duration in run.calls:
        if t0 <= at <= end:
            bins.setdefault(int(at - t0), []).append(duration)
    seconds = sorted(bins)
    bottom.plot(seconds, [len(bins[s]) for s in seconds], color="tab:green", label="calls/s")
    bottom.set_ylabel("calls / s")
    bottom.set_xlabel("seconds")
    twin = bottom.twinx()
    twin.plot(
        seconds,
        [statistics.median(bins[s]) / run.unloaded_s for s in seconds],
        color="tab:orange",
        label="median latency / unloaded",
    )
    twin.axhline(1.5, color="tab:orange", linewidth=0.8, linestyle=":")
    twin.set_ylabel("latency / unloaded")
    twin.set_ylim(0, 3)
    lines = bottom.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    bottom.legend(lines, [str(line.get_label()) for line in lines], loc="upper right")
    del figures
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compared(runs: dict[int, list[Figures]], unloaded_s: float) -> list[str]:
    """Fixed limits over the same schedule: what the adaptive limit is measured against."""
    if not runs:
        return []
    lines = [
        "",
        "The same schedule with a fixed limit (`SYNC_ADAPTIVE_CONCURRENCY=false`), for "
        "comparison: the limit counts calls in flight at the daemon, and part of each "
        "call's time is spent outside the backend's slot (the client, the loopback, the "
        "daemon's own loop), so a limit equal to the capacity leaves slots idle part of "
        "the time; the adaptive limit settles above it, where latency says stop.",
        "",
        "| fixed limit | phase | capacity | median latency | throughput |",
        "|---|---|---|---|---|",
    ]
    for limit, figures in runs.items():
        for f in figures:
            lines.append(
                f"| {limit} | {f.phase.name} | {f.phase.capacity} | "
                f"{f.latency_median_s * 1000:.0f} ms ({f.latency_median_s / unloaded_s:.2f}x) | "
                f"{f.throughput:.0f}/s ({f.throughput / f.capacity_throughput:.0%}) |"
            )
    return lines


def markdown(
    run: Run,
    figures: list[Figures],
    follow: list[str],
    args: argparse.Namespace,
    comparison: list[str],
) -> str:
    rows = []
    for f in figures:
        ratio = f.latency_median_s / run.unloaded_s
        share = f.throughput / f.capacity_throughput
        rows.append(
            f"| {f.phase.name} | {f.phase.capacity} | {f.limit_mean:.1f} | "
            f"{f.latency_median_s * 1000:.0f} ms ({ratio:.2f}x) | "
            f"{f.latency_p90_s * 1000:.0f} ms | {f.throughput:.0f}/s "
            f"({share:.0%} of {f.capacity_throughput:.0f}/s) |"
        )
    first = figures[0]
    latency_ok = first.latency_median_s / run.unloaded_s <= 1.5
    throughput_ok = first.throughput / first.capacity_throughput >= 0.9
    return "\n".join(
        [
            SECTION,
            "",
            f"Measured by `bench/adaptive.py` on {datetime.now().date()} "
            f"({platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}): the reference backend in its own process with "
            f"{args.latency_ms:g} ms of work per request, a capacity of {args.capacity} "
            f"(a queue of {2 * args.capacity} beyond it, then 503), and one "
            f"`background-sync once` over {args.users} due users with "
            f"`SYNC_CONCURRENCY={args.maximum}`. The capacity is {args.capacity} for "
            f"{args.phase_seconds:g} s, {args.capacity // 2} for {args.phase_seconds:g} s, "
            f"then {args.capacity} again. Unloaded latency (median of {args.probe_calls} "
            f"sequential calls): {run.unloaded_s * 1000:.1f} ms. Each phase is measured "
            f"after its first {args.settle_share:.0%}.",
            "",
            "| phase | capacity | mean limit | median latency | p90 latency | throughput |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "| target | result |",
            "|---|---|",
            f"| limit settles near the capacity | {first.limit_mean:.1f} for a capacity of "
            f"{first.phase.capacity} |",
            f"| backend latency within 1.5x unloaded at full capacity | "
            f"{first.latency_median_s / run.unloaded_s:.2f}x "
            f"({'met' if latency_ok else 'not met'}) |",
            f"| throughput >= 90 % of capacity | "
            f"{first.throughput / first.capacity_throughput:.0%} "
            f"({'met' if throughput_ok else 'not met'}) |",
            *follow,
            *comparison,
            "",
            "![The adaptive limit against the backend's capacity](adaptive-concurrency.png)",
            "",
            "Latency is what the daemon measured per call (`user_synced` duration_ms), so it "
            "includes the client's own time; throughput counts successful calls per second. "
            f"A window is at least {WINDOW_MIN_CALLS} calls (twice the limit when that is "
            "more). Regenerate with `.venv/bin/python bench/adaptive.py`.",
            "",
        ]
    )


def write_section(path: Path, text: str) -> None:
    """Replace the section at the end of the file (or append it): nothing above it moves."""
    current = path.read_text() if path.exists() else ""
    head, found, _ = current.partition(SECTION)
    if not found:
        head = current
    path.write_text(head.rstrip("\n") + "\n\n" + text)


def measure(args: argparse.Namespace, work: Path) -> Run:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    backend = subprocess.Popen(
        daemon(
            "reference-backend",
            "--port",
            str(port),
            "--latency-ms",
            str(args.latency_ms),
            "--capacity",
            str(args.capacity),
            "--queue-limit",
            str(2 * args.capacity),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        start_new_session=True,
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        wait_for_backend(base, backend)
        run = Run(unloaded_s=asyncio.run(unloaded_latency(base + PATH, args.probe_calls)))
        database = work / "sync.db"
        if args.fixed:
            env = environment(database, base + PATH, args.fixed, adaptive=False)
            run.initial_limit = args.fixed
        else:
            env = environment(database, base + PATH, args.maximum)
        subprocess.run(daemon("migrate"), env=env, cwd=ROOT, check=True, capture_output=True)
        seed = daemon("seed-demo", "--users", str(args.users))
        subprocess.run(seed, env=env, cwd=ROOT, check=True, capture_output=True)
        log = work / "daemon.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                daemon("once"), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
            schedule = [
                ("full", args.capacity),
                ("halved", args.capacity // 2),
                ("restored", args.capacity),
            ]
            for name, capacity in schedule:
                put_faults(
                    base,
                    latency_ms=args.latency_ms,
                    capacity=capacity,
                    queue_limit=2 * args.capacity,
                )
                phase = Phase(name, capacity, time.time())
                run.phases.append(phase)
                time.sleep(args.phase_seconds)
                phase.ended = time.time()
                if proc.poll() is not None:
                    raise SystemExit("the daemon ran out of due users: raise --users")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        read_log(log, run)
        return run
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--maximum", type=int, default=64, help="SYNC_CONCURRENCY")
    parser.add_argument("--phase-seconds", type=float, default=40.0)
    parser.add_argument("--settle-share", type=float, default=0.25)
    parser.add_argument("--probe-calls", type=int, default=50)
    parser.add_argument("--users", type=int, default=0, help="default: enough for the run")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-docs", action="store_true", help="print, write nothing")
    parser.add_argument(
        "--fixed", type=int, default=0, help="only a fixed limit of this many (no docs)"
    )
    parser.add_argument(
        "--compare", type=int, nargs="*", default=[], help="also run these fixed limits"
    )
    args = parser.parse_args(argv)
    if not args.users:
        per_second = args.capacity / (args.latency_ms / 1000)
        args.users = int(per_second * args.phase_seconds * 3 * 1.5) + 1000
    with tempfile.TemporaryDirectory(prefix="bench-adaptive-") as tmp:
        run = measure(args, Path(tmp))
    figures = [phase_figures(run, phase, args.settle_share) for phase in run.phases]
    full, halved, restored = run.phases
    # "Follows": back in the band the limit settles in for that capacity (at most 1.5x it).
    down = settle_time(
        run, halved.started, halved.ended, lambda limit: limit <= 1.5 * halved.capacity
    )
    up = settle_time(
        run, restored.started, restored.ended, lambda limit: limit >= restored.capacity
    )
    follow = []
    for what, (seconds, changes, calls) in (
        ("capacity halves: the limit comes down to 1.5x the new capacity", down),
        ("capacity returns: the limit climbs back to it", up),
    ):
        if seconds is None:
            follow.append(f"| {what} | not within the phase |")
        else:
            windows = calls / max(WINDOW_MIN_CALLS, 2 * full.capacity)
            follow.append(
                f"| {what} | {seconds:.1f} s, {changes} change(s), {calls} calls "
                f"(about {windows:.1f} windows) |"
            )
    fixed_runs: dict[int, list[Figures]] = {}
    for limit in args.compare:
        fixed_args = argparse.Namespace(**{**vars(args), "fixed": limit})
        with tempfile.TemporaryDirectory(prefix="bench-adaptive-") as tmp:
            other = measure(fixed_args, Path(tmp))
        other.unloaded_s = run.unloaded_s  # one yardstick for every run
        fixed_runs[limit] = [phase_figures(other, p, args.settle_share) for p in other.phases]
    text = markdown(run, figures, follow, args, compared(fixed_runs, run.unloaded_s))
    print(text)
    if not args.no_docs and not args.fixed:
        plot(run, figures, args.docs / "adaptive-concurrency.png", args.maximum)
        write_section(args.docs / "performance.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
