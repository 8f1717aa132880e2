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


REPO = Path(__file__).resolve().parent.parent


def code_tree(ref: str | None, into: Path) -> Path:
    """A private copy of the daemon's code (this work tree's, or `git archive REF`), so
    that editing the tree while the benchmark runs changes nothing it measures."""
    into.mkdir(parents=True)
    if ref is None:
        shutil.copytree(REPO / "daemon", into / "daemon")
        return into
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "daemon"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def environment(url: str, backend: str, concurrency: int, code: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(
        {
            "PYTHONPATH": str(code),
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
def reference_backend(latency_ms: float, workdir: Path, code: Path) -> Iterator[str]:
    """This tree's backend (a private copy too), whichever daemon is measured."""
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
            env={**os.environ, "PYTHONPATH": str(code)},
            cwd=workdir,  # `-m` puts the current directory first on sys.path
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


def reset(dsn: str, users: int, *, due: bool = True) -> None:
    """Every user due again (or fresh); no state, runs, operations; statistics zeroed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE sync_user_state, sync_operations, sync_runs, sync_control")
        conn.execute("UPDATE users SET last_sync = " + ("NULL" if due else "now()"))
        conn.execute("VACUUM ANALYZE")
        conn.execute("SELECT pg_stat_reset()")
        left = conn.execute("SELECT count(*) FROM users WHERE last_sync IS NULL").fetchone()
    assert left is not None and left[0] == (users if due else 0)


def events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _moment(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))


def start(command: str, env: dict[str, str], log: Path, workdir: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", command],
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def count_events(log: Path, name: str) -> int:
    return sum(1 for e in events(log) if e.get("event") == name)


def wait_for_cycles(logs: list[Path], count: int, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while not all(count_events(log, "cycle_finished") >= count for log in logs):
        if time.monotonic() > deadline:
            raise SystemExit(f"no cycle_finished #{count} within {timeout} s: see {logs}")
        time.sleep(0.1)


def one_round(
    n: int,
    mode: str,
    env: dict[str, str],
    dsn: str,
    backend: str,
    users: int,
    workdir: Path,
) -> dict[str, Any]:
    """`once`: N processes started together, timed until the last exits. `run`: N daemons
    started and settled first, then every user made due and SIGUSR1 (a forced cycle) sent
    to all at once, timed until the last cycle_finished: start-up costs left out."""
    logs = [workdir / f"{mode}-n{n}-instance{i}.log" for i in range(n)]
    if mode == "once":
        reset(dsn, users)
        backend_call(backend, "/_control/reset", "POST")
        time.sleep(1.5)  # let the statistics reset settle before the clock starts
        begin = time.monotonic()
        procs = [start("once", env, log, workdir) for log in logs]
        exits = [proc.wait(timeout=3600) for proc in procs]
        wall = time.monotonic() - begin
    else:
        reset(dsn, users, due=False)
        procs = [
            start("run", env | {"SYNC_INTERVAL_SECONDS": "3600"}, log, workdir) for log in logs
        ]
        try:
            wait_for_cycles(logs, 1, timeout=300)  # the start-up cycle: nobody due
            reset(dsn, users)
            backend_call(backend, "/_control/reset", "POST")
            time.sleep(1.5)
            begin = time.monotonic()
            for proc in procs:
                proc.send_signal(signal.SIGUSR1)
            wait_for_cycles(logs, 2)
            wall = time.monotonic() - begin
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            exits = [proc.wait(timeout=60) for proc in procs]
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
    # The measured cycle is each log's last (`run` had its start-up cycle before).
    last_run = [[e for e in events(log) if "run_id" in e] for log in logs]
    seen = [e for run in last_run for e in run if e["run_id"] == run[-1]["run_id"]]
    finished = [e for e in seen if e.get("event") == "cycle_finished"]
    started = [e for e in seen if e.get("event") == "cycle_started"]
    span = (max(_moment(e) for e in finished) - min(_moment(e) for e in started)).total_seconds()
    cycles = [f.get("duration_ms", 0) / 1000 for f in finished]
    per_instance = [f.get("succeeded", 0) for f in finished]
    return {
        "instances": n,
        "mode": mode,
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


def plot(
    rounds: list[dict[str, Any]],
    path: Path,
    title: str,
    before: list[dict[str, Any]] | None = None,
) -> None:
    import matplotlib  # a bench-only extra, never a runtime dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ns = [r["instances"] for r in rounds]
    ax.plot(ns, ns, "--", color="grey", label="ideal (N x)")
    ax.axhline(2.8, color="tab:red", lw=0.8, ls=":", label="target at 3 instances: 2.8 x")
    series = [(rounds, "this version", "o-", (8, -4))]
    if before:
        series.append((before, "before (a claim held up to 512 users)", "s-", (8, -10)))
    for data, label, style, offset in series:
        xs = [r["instances"] for r in data]
        speed = [data[0]["wall_s"] / r["wall_s"] for r in data]
        ax.plot(xs, speed, style, label=label)
        for x, y in zip(xs, speed, strict=True):
            ax.annotate(f"{y:.2f} x", (x, y), textcoords="offset points", xytext=offset)
    ax.set_xticks(ns)
    ax.set_xlim(0.8, max(ns) + 0.5)
    ax.set_xlabel("instances on one PostgreSQL")
    ax.set_ylabel("speed-up over one instance")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
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
    parser.add_argument(
        "--before", type=Path, default=None, help="--output of an earlier run, plotted beside"
    )
    parser.add_argument(
        "--mode",
        choices=["run", "once"],
        default="run",
        help="settled `run` daemons forced together (default), or `once` processes",
    )
    parser.add_argument(
        "--ref", default=None, help="run the daemon of this git ref (default: this work tree)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="copy the logs into this dir")
    parser.add_argument(
        "--env", action="append", default=[], help="extra SYNC_X=Y for every instance"
    )
    parser.add_argument(
        "--from-json", type=Path, default=None, help="report and plot an earlier --output"
    )
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.instances.split(",")]
    if args.from_json is not None:
        report(args, json.loads(args.from_json.read_text())["rounds"])
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        workdir = Path(tmp)
        code = code_tree(args.ref, workdir / "code")
        here = code if args.ref is None else code_tree(None, workdir / "backend-code")
        with (
            scratch_database() as name,
            reference_backend(args.latency_ms, workdir, here) as backend,
        ):
            rounds = run_rounds(args, counts, workdir, code, name, backend)
    report(args, rounds)
    return 0


def run_rounds(
    args: argparse.Namespace,
    counts: list[int],
    workdir: Path,
    code: Path,
    name: str,
    backend: str,
) -> list[dict[str, Any]]:
    url = f"postgresql+psycopg://127.0.0.1:5432/{name}"
    dsn = f"postgresql://127.0.0.1:5432/{name}"
    env = environment(url, backend, args.concurrency, code)
    env.update(dict(item.split("=", 1) for item in args.env))
    subprocess.run([sys.executable, "-m", "daemon", "migrate"], env=env, check=True, cwd=workdir)
    subprocess.run(
        [sys.executable, "-m", "daemon", "seed-demo", "--users", str(args.users)],
        env=env,
        cwd=workdir,
        check=True,
        capture_output=True,
    )
    rounds = []
    for n in counts:
        result = one_round(n, args.mode, env, dsn, backend, args.users, workdir)
        rounds.append(result)
        print(json.dumps(result), flush=True)
    if args.keep is not None:
        shutil.copytree(workdir, args.keep, dirs_exist_ok=True)
    return rounds


def report(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> None:
    ideal = args.users * args.latency_ms / 1000 / args.concurrency
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"ideal wall for one instance: {ideal:.1f} s")
    base, base_span = rounds[0]["wall_s"], rounds[0]["sync_span_s"]
    for r in rounds:
        print(
            f"N={r['instances']}: sync span {r['sync_span_s']:.1f} s, speed-up "
            f"{base_span / r['sync_span_s']:.2f} x; wall {r['wall_s']:.1f} s, "
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
        before = json.loads(args.before.read_text())["rounds"] if args.before else None
        plot(rounds, args.plot, title, before)


if __name__ == "__main__":
    sys.exit(main())
