"""CPU per user of the daemon's own per-user steps, side by side for several trees.

    python -m bench.units --daemon-from before=/tmp/before [--write-doc]

Measures, in a fresh process per tree and per round (interleaved: this tree, then each
--daemon-from tree, --rounds times): `Store.claim` of every due user in pages of 256,
`Store.finish` of their successes in batches of 128 (the fenced writes: last_sync, the
state row, the operation row) on a fresh SQLite file, and one `user_synced` JSON line as
the cycle logs it. No backend, no network: only the steps the daemon adds to a call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import harness, report
from bench.procs import base_environment

# Runs inside the measured process, with the tree under test first on sys.path.
_PROBE = r"""
import io, json, sys, tempfile, time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from bench.workload import Workload
from daemon import logs, schema
from daemon.database import Database
from daemon.store import Cursor, Store
from daemon.values import Outcome, Result

users = int(sys.argv[1])
work = Workload.sqlite(Path(tempfile.mkdtemp()), users, users)
work.create(scratch_check=False)
db = Database(work.engine)
store = Store(db, schema.inspect_users(db.engine, work.settings), instance="u", lease_seconds=120)
now = datetime.now(UTC)
cursor, claims = Cursor(), []
t = time.process_time()
while not cursor.done:
    claims += store.claim(cursor, 256, run_id="r1", now=now, stale_before=now - timedelta(hours=1))
claim = time.process_time() - t
results = [
    Result(c, Outcome.SUCCESS, datetime.now(UTC), http_status=200, attempts=1, duration_ms=50,
           run_id="r1")
    for c in claims
]
t = time.process_time()
for i in range(0, len(results), 128):
    store.finish(results[i:i + 128], now=now, backoff=lambda n: 60.0, quarantine_after=10)
finish = time.process_time() - t
assert work.unsynced() == 0 and len(claims) == users
out = open(Path(tempfile.mkdtemp()) / "log", "w")
logs.configure("INFO", "json", stream=out)
log = logs.get_logger(run_id="0123456789abcdef0123456789abcdef")
t = time.process_time()
for n in range(users):
    log.info("user_synced", user_id=n, attempt=1, status=200, duration_ms=51,
             result={"synced_items": 17})
line = time.process_time() - t
print(json.dumps({"claim": claim / users * 1e6, "finish": finish / users * 1e6,
                  "log_line": line / users * 1e6}))
"""

STEPS = (("claim", "Store.claim"), ("finish", "Store.finish"), ("log_line", "user_synced line"))


def measure(source: Path | None, users: int) -> dict[str, float]:
    env = base_environment()
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source.resolve()), env["PYTHONPATH"]])
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(users)],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"probe failed for {source or 'this tree'}: {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def body(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--daemon-from", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args(argv)
    trees = harness.trees(args.daemon_from)
    load_before = report.uptime()
    figures: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for r in range(1, args.rounds + 1):
        for name, source in trees:
            figures[name].append(measure(source, args.users))
            harness.say(f"round {r}, {name}: {figures[name][-1]}")
    header = "| step (µs of CPU per user) | " + " | ".join(n for n, _ in trees) + " |"
    lines = [header, "|---|" + "---:|" * len(trees)]
    for key, label in STEPS:
        cells = [harness.spread([f[key] for f in figures[name]], ".1f") for name, _ in trees]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + (
        f"\n\n{args.users:,} users, {args.rounds} interleaved rounds, median (range). "
        f"Load before: `{load_before}`; after: `{report.uptime()}`."
    )
    harness.publish("units", text, write_doc=args.write_doc)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main_guard(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
