#!/usr/bin/env python3
"""Scale-out on one PostgreSQL: N instances of `background-sync once` share the due users.

A latency-bound workload (the reference backend at `--latency-ms`, `--concurrency` calls
per instance), so N instances should finish N times faster. For N in `--instances` the
script resets everything (users due again, the daemon's tables emptied, the backend's
counters and the database's statistics reset), starts N `once` processes at the same
moment and waits for all of them. It reports:

- wall time from the start until the last process exited, and the speed-up T(1) / T(N);
- duplicate successes: users with more than one `succeeded` row in sync_operations;
- overlaps: calls the backend received for a user whose sync was still running;
- claim contention: due rows a claim found locked by another instance's claim, or whose
  lease another instance won first (`claims_contended` in each `cycle_finished` line);
- database time per user: `pg_stat_database.active_time` of the scratch database (time
  the server spent executing statements, all instances together) divided by the users.

It creates a scratch database (`bench_scale_<random>`) on 127.0.0.1:5432 and drops it
afterwards. Run by hand, never by the test suite:

    .venv/bin/python bench/scale_out.py --users 3000 --plot docs/scale-out.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

PG_ADMIN = "postgresql://127.0.0.1:5432/test"


def environment(url: str, backend: str, concurrency: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "SYNC_DATABASE_URL": url,
            "SYNC_BACKEND_URL": f"{backend}/api/v1/sync/start",
            "SYNC_CONCURRENCY": str(concurrency),
            "SYNC_STATUS_ADDRESS": "off",
            "SYNC_LOG_FORMAT": "json",
            "SYNC_LOG_LEVEL": "INFO",
            "SYNC_JITTER_SECONDS": "0",
        }
    )
    return env


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    name = f"bench_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def reference_backend(latency_ms: float, workdir: Path) -> Iterator[str]:
    log = workdir / "backend.log"
    command = [sys.executable, "-m", "daemon", "reference-backend", "--host", "127.0.0.1"]
    command += ["--port", "0", "--latency-ms", f"{latency_ms:g}"]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = re.search(r"Running on (http://[\d.]+:\d+)", log.read_text(errors="replace"))
            if found:
                yield found.group(1)
                return
            if proc.poll() is not None:
                raise SystemExit(f"reference backend exited: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise SystemExit("reference backend announced no port")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def backend_call(base: str, path: str, method: str = "GET") -> Any:
    request = urllib.request.Request(base + path, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def reset(dsn: str, users: int) -> None:
    """Every user due again; no state, runs, operations or instances; statistics zeroed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE sync_user_state, sync_operations, sync_runs, sync_instances, sync_control"
        )
        conn.execute("UPDATE users SET last_sync = NULL")
        conn.execute("VACUUM ANALYZE")
        conn.execute("SELECT pg_stat_reset()")
        left = conn.execute("SELECT count(*) FROM users WHERE last_sync IS NULL").fetchone()
    assert left is not None and left[0] == users


def events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _moment(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))


def one_round(
    n: int, env: dict[str, str], dsn: str, backend: str, users: int, workdir: Path
) -> dict[str, Any]:
    reset(dsn, users)
    backend_call(backend, "/_control/reset", "POST")
    time.sleep(1.5)  # let the statistics reset settle before the clock starts
    logs = [workdir / f"n{n}-instance{i}.log" for i in range(n)]
    begin = time.monotonic()
    procs = []
    for log in logs:
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "daemon", "once"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    exits = []
    for proc in procs:
        exits.append(proc.wait(timeout=3600))
    wall = time.monotonic() - begin
    time.sleep(1.5)  # backends flush their statistics on exit
    stats = backend_call(backend, "/_control/stats")
    with psycopg.connect(dsn, autocommit=True) as conn:
        dup = conn.execute(
            "SELECT count(*) FROM (SELECT user_key FROM sync_operations "
            "WHERE outcome = 'success' GROUP BY user_key HAVING count(*) > 1) d"
        ).fetchone()
        ok = conn.execute(
            "SELECT count(DISTINCT user_key) FROM sync_operations WHERE outcome = 'success'"
        ).fetchone()
        active = conn.execute(
            "SELECT active_time, xact_commit FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    assert dup is not None and ok is not None and active is not None
    seen = [e for log in logs for e in events(log)]
    finished = [e for e in seen if e.get("event") == "cycle_finished"]
    started = [e for e in seen if e.get("event") == "cycle_started"]
    span = (max(_moment(e) for e in finished) - min(_moment(e) for e in started)).total_seconds()
    cycles = [f.get("duration_ms", 0) / 1000 for f in finished]
    per_instance = [f.get("succeeded", 0) for f in finished]
    return {
        "instances": n,
        "exit_statuses": exits,
        "wall_s": round(wall, 2),
        "sync_span_s": round(span, 2),
        "cycle_s": [round(c, 2) for c in cycles],
        "succeeded_per_instance": per_instance,
        "users_synced": int(ok[0]),
        "duplicate_successes": int(dup[0]),
        "overlaps": stats.get("overlaps"),
        "backend_requests": stats.get("requests"),
        "claims_contended": sum(f.get("claims_contended", 0) for f in finished),
        "claim_transactions": sum(f.get("claim_transactions", 0) for f in finished),
        "db_active_ms": round(float(active[0] or 0), 1),
        "db_active_ms_per_user": round(float(active[0] or 0) / users, 3),
        "db_commits": int(active[1]),
    }


def plot(rounds: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib  # a bench-only extra, never a runtime dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["instances"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(ns, ns, "--", color="grey", label="ideal (N x)")
    for key, label, offset in (
        ("sync_span_s", "first cycle start to last cycle end", (6, -12)),
        ("wall_s", "process wall, interpreter start-up included", (6, 4)),
    ):
        speed = [rounds[0][key] / r[key] for r in rounds]
        ax.plot(ns, speed, "o-", label=label)
        for x, y in zip(ns, speed, strict=True):
            ax.annotate(f"{y:.2f} x", (x, y), textcoords="offset points", xytext=offset)
    ax.axhline(2.8, color="tab:red", lw=0.8, ls=":", label="target at 3 instances: 2.8 x")
    ax.set_xticks(ns)
    ax.set_xlabel("instances on one PostgreSQL")
    ax.set_ylabel("speed-up over one instance")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=8, help="per instance")
    parser.add_argument("--instances", default="1,2,3", help="comma-separated N to run")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="PNG: instances vs speed-up")
    parser.add_argument("--keep", type=Path, default=None, help="copy the logs into this dir")
    parser.add_argument(
        "--env", action="append", default=[], help="extra SYNC_X=Y for every instance"
    )
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.instances.split(",")]

    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp,
        scratch_database() as name,
        reference_backend(args.latency_ms, Path(tmp)) as backend,
    ):
        workdir = Path(tmp)
        url = f"postgresql+psycopg://127.0.0.1:5432/{name}"
        dsn = f"postgresql://127.0.0.1:5432/{name}"
        env = environment(url, backend, args.concurrency)
        env.update(dict(item.split("=", 1) for item in args.env))
        subprocess.run([sys.executable, "-m", "daemon", "migrate"], env=env, check=True)
        subprocess.run(
            [sys.executable, "-m", "daemon", "seed-demo", "--users", str(args.users)],
            env=env,
            check=True,
            capture_output=True,
        )
        rounds = []
        for n in counts:
            result = one_round(n, env, dsn, backend, args.users, workdir)
            rounds.append(result)
            print(json.dumps(result), flush=True)
        if args.keep is not None:
            shutil.copytree(workdir, args.keep, dirs_exist_ok=True)
    ideal = args.users * args.latency_ms / 1000 / args.concurrency
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"ideal wall for one instance: {ideal:.1f} s")
    base, base_span = rounds[0]["wall_s"], rounds[0]["sync_span_s"]
    for r in rounds:
        print(
            f"N={r['instances']}: sync span {r['sync_span_s']:.1f} s, speed-up "
            f"{base_span / r['sync_span_s']:.2f} x; process wall {r['wall_s']:.1f} s, "
            f"speed-up {base / r['wall_s']:.2f} x, "
            f"duplicates {r['duplicate_successes']}, overlaps {r['overlaps']}, "
            f"contended claims {r['claims_contended']} in {r['claim_transactions']} claims, "
            f"db time {r['db_active_ms_per_user']:.3f} ms/user"
        )
    if args.output is not None:
        args.output.write_text(
            json.dumps(
                {"when": datetime.now(UTC).isoformat(timespec="seconds"), "rounds": rounds},
                indent=2,
            )
            + "\n"
        )
    if args.plot is not None:
        title = (
            f"{args.users} users, backend {args.latency_ms:g} ms, "
            f"{args.concurrency} calls per instance"
        )
        plot(rounds, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
