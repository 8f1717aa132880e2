"""Draw freshness over a run in which the backend fails for a while and recovers.

Runs the real daemon (`python -m daemon run`) on a fresh SQLite file with short
intervals against the bundled reference backend, turns the backend's faults on for a
while and off again through its control API, and samples once a second:

- from the database itself, the share of users whose last_sync is within the freshness
  target and the number overdue (never-synced users count as overdue), so the picture
  shows what the users table says, whatever the daemon reports;
- from the daemon's /status, its health state and the fresh ratio it last measured.

It writes a PNG (docs/monitoring/freshness.png by default) and the samples as CSV next
to it. Run by hand, never by the test suite; matplotlib is a bench extra
(`pip install -r requirements-bench.txt`), not a runtime dependency:

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python bench/freshness_picture.py
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 30.0


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the daemon started
    users: int
    fresh: int
    health: str
    reported: float | None  # the fresh ratio of the daemon's last measurement (/status)

    @property
    def fresh_ratio(self) -> float:
        return self.fresh / self.users if self.users else 1.0

    @property
    def overdue(self) -> int:
        return self.users - self.fresh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without SYNC_* and systemd variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        env.pop(name, None)
    return env | extra


def run(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


def http(url: str, *, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own session, logging to `log`; SIGTERM (then SIGKILL) on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(what: str, check: Any, timeout: float = START_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if (found := check()) is not None:
                return found
        time.sleep(0.1)
    raise SystemExit(f"gave up waiting for {what}")


def spread_last_sync(db: Path, spread_s: float) -> int:
    """Give every user a last_sync spread over the last `spread_s` seconds (all fresh,
    coming due steadily), in the naive-UTC form SQLAlchemy writes."""
    now = datetime.now(UTC).replace(tzinfo=None)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM users")]
        rows = [
            ((now - timedelta(seconds=random.uniform(0, spread_s))).isoformat(" "), i) for i in ids
        ]
        conn.executemany("UPDATE users SET last_sync = ? WHERE id = ?", rows)
    return len(ids)


def measure(db: Path, target_s: float) -> tuple[int, int]:
    """(users, fresh): fresh when last_sync is within the target of now; NULL is overdue."""
    now = datetime.now(UTC).replace(tzinfo=None)
    oldest_fresh = now - timedelta(seconds=target_s)
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        values = [row[0] for row in conn.execute("SELECT last_sync FROM users")]
    fresh = sum(1 for v in values if v is not None and datetime.fromisoformat(v) >= oldest_fresh)
    return len(values), fresh


def daemon_view(status_url: str) -> tuple[str, float | None]:
    """The daemon's health, and the fresh ratio it last measured (None if it shows none)."""
    try:
        status = http(status_url)
    except (OSError, ValueError):
        return "unknown", None
    measured = status.get("freshness") or {}
    ratio = measured.get("fresh_ratio")
    return str(status.get("health", "unknown")), None if ratio is None else float(ratio)


def record(args: argparse.Namespace, work: Path) -> tuple[list[Sample], float, float]:
    """Run backend and daemon, inject the fault; return the samples and the fault window."""
    db = work / "sync.db"
    target_s = args.stale_after + args.interval
    status_port = free_port()
    env = clean_env(
        {
            "SYNC_DATABASE_URL": f"sqlite:///{db}",
            "SYNC_INTERVAL_SECONDS": str(args.interval),
            "SYNC_STALE_AFTER_SECONDS": str(args.stale_after),
            "SYNC_CIRCUIT_RESET_SECONDS": str(args.circuit_reset),
            "SYNC_MAX_RETRIES": "1",
            "SYNC_RETRY_DELAY_SECONDS": "0.5",
            "SYNC_REQUEST_TIMEOUT_SECONDS": "5",
            "SYNC_JITTER_SECONDS": "0",
            "SYNC_STATUS_ADDRESS": f"127.0.0.1:{status_port}",
            "SYNC_LOG_FORMAT": "json",
        }
    )
    python = sys.executable
    run([python, "-m", "daemon", "migrate"], env)
    run([python, "-m", "daemon", "seed-demo", "--users", str(args.users)], env)
    # Not quite up to stale-after: the daemon takes a few seconds to start.
    spread_last_sync(db, max(0.0, args.stale_after - 10))

    backend_log = work / "backend.log"
    backend_args = [python, "-m", "daemon", "reference-backend", "--port", "0"]
    backend_args += ["--latency-ms", str(args.latency_ms), "--seed", "1"]
    with process(backend_args, env, backend_log) as backend:
        port = wait_for(
            "the reference backend's port",
            lambda: _port(backend_log.read_text(errors="replace"), backend),
        )
        base = f"http://127.0.0.1:{port}"
        env["SYNC_BACKEND_URL"] = f"{base}/api/v1/sync/start"
        status_url = f"http://127.0.0.1:{status_port}/status"
        with process([python, "-m", "daemon", "run"], env, work / "daemon.log") as daemon:
            started = time.monotonic()
            wait_for("the daemon's /status", lambda: http(status_url))
            fault_on = args.healthy
            fault_off = args.healthy + args.fault
            end = fault_off + args.recovery
            samples: list[Sample] = []
            phase = "before"  # then "failing", then "after": each switch happens once
            next_at = time.monotonic() - started
            while (t := time.monotonic() - started) < end:
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.returncode}: see {work}")
                if phase == "before" and t >= fault_on:
                    http(f"{base}/_control/faults", method="PUT", body=json.loads(args.faults))
                    phase = "failing"
                if phase == "failing" and t >= fault_off:
                    http(f"{base}/_control/faults", method="PUT", body={"seed": 1})
                    phase = "after"
                users, fresh = measure(db, target_s)
                health, reported = daemon_view(status_url)
                samples.append(Sample(round(t, 2), users, fresh, health, reported))
                next_at += 1.0
                time.sleep(max(0.0, next_at - (time.monotonic() - started)))
    return samples, fault_on, fault_off


def _port(log: str, proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is not None:
        raise SystemExit(f"the reference backend exited with {proc.returncode}: {log[-2000:]}")
    match = re.search(r"reference-backend: Running on http://[^\s:]+:(\d+)", log)
    return int(match.group(1)) if match else None


def plot(
    samples: list[Sample], fault_on: float, fault_off: float, args: argparse.Namespace
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=110)
    ax.axvspan(fault_on, fault_off, color="tab:red", alpha=0.12, label="backend failing")
    unhealthy = [s.health not in ("healthy", "unknown") for s in samples]
    if any(unhealthy):
        ax.fill_between(
            t,
            1.03,
            1.07,
            where=unhealthy,
            step="post",
            color="tab:orange",
            alpha=0.8,
            lw=0,
            label="daemon not healthy (/status)",
        )
    ax.plot(t, [s.fresh_ratio for s in samples], color="tab:blue", lw=2, label="fresh ratio")
    if any(s.reported is not None for s in samples):
        reported = [float("nan") if s.reported is None else s.reported for s in samples]
        ax.plot(
            t,
            reported,
            color="black",
            lw=0.8,
            ls=":",
            drawstyle="steps-post",
            label="fresh ratio the daemon measured (once per cycle)",
        )
    ax.axhline(
        args.objective, color="tab:green", ls="--", lw=1, label=f"objective {args.objective:g}"
    )
    ax.set_ylim(0, 1.09)
    ax.set_xlim(0, t[-1] if t else 1)
    ax.set_xlabel("seconds since the daemon started")
    ax.set_ylabel("share of users fresh")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    right = ax.twinx()
    right.plot(t, [s.overdue for s in samples], color="tab:gray", lw=1, label="users overdue")
    right.set_ylim(0, max(1, samples[0].users if samples else 1) * 1.08)
    right.set_ylabel("users overdue")
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="lower left", fontsize=8)
    ax.set_title(
        f"Freshness while the backend fails for {fault_off - fault_on:g} s "
        f"({args.users} users, interval {args.interval:g} s, "
        f"target {args.stale_after + args.interval:g} s)",
        fontsize=10,
    )
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--interval", type=float, default=5.0, help="SYNC_INTERVAL_SECONDS")
    parser.add_argument("--stale-after", type=float, default=30.0, help="SYNC_STALE_AFTER_SECONDS")
    parser.add_argument(
        "--circuit-reset", type=float, default=10.0, help="SYNC_CIRCUIT_RESET_SECONDS"
    )
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--healthy", type=float, default=45.0, help="seconds before the fault")
    parser.add_argument("--fault", type=float, default=60.0, help="seconds the backend fails")
    parser.add_argument("--recovery", type=float, default=60.0, help="seconds after the fault")
    parser.add_argument(
        "--faults", default='{"error_rate": 1.0}', help="the reference backend's faults (JSON)"
    )
    parser.add_argument("--objective", type=float, default=0.99, help="drawn as a line")
    parser.add_argument("--output", type=Path, default=ROOT / "docs/monitoring/freshness.png")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "needs matplotlib: .venv/bin/pip install -r requirements-bench.txt"
        ) from None

    work = Path(tempfile.mkdtemp(prefix="freshness-picture-"))
    try:
        samples, fault_on, fault_off = record(args, work)
    finally:
        if not args.keep:
            for path in sorted(work.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            work.rmdir()
        else:
            print(f"work directory kept: {work}", file=sys.stderr)
    plot(samples, fault_on, fault_off, args)
    with args.output.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_s", "users", "fresh", "overdue", "fresh_ratio", "health", "reported"])
        for s in samples:
            ratio = f"{s.fresh_ratio:.4f}"
            writer.writerow([s.t, s.users, s.fresh, s.overdue, ratio, s.health, s.reported])
    low = min(samples, key=lambda s: s.fresh_ratio)
    back = next((s for s in samples if s.t > fault_off and s.fresh_ratio >= args.objective), None)
    print(f"wrote {args.output} ({len(samples)} samples)")
    window = f"the backend failed from {fault_on:g} s to {fault_off:g} s"
    print(f"lowest fresh ratio {low.fresh_ratio:.3f} at {low.t:.0f} s; {window}")
    if back is not None:
        print(f"back at the objective {back.t - fault_off:.0f} s after the backend recovered")
    else:
        print("not back at the objective by the end of the run")


if __name__ == "__main__":
    main()
