"""The daemon's own CPU per user: `once` with the HTTP exchange replaced, several trees.

With a real backend, aiohttp and the kernel's loopback take half of a synced user's CPU
and move with the machine's load; this takes them out. Each run is a fresh process that
runs `background-sync once` in-process over an SQLite file of --due due users, with
`BackendClient._post` replaced by a 5 ms sleep and a success answer: everything else (the
claims, the gate, the limit, the recorder, the fenced writes, the log line written to a
real file) is the daemon's own code. Trees are interleaved, --rounds times:

    python -m bench.own_work --daemon-from before=/tmp/before [--write-doc]

Only for comparing trees side by side; it is not a figure of a real deployment.
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
from bench.workload import Workload, daemon_environment

# Runs inside the measured process, with the tree under test first on sys.path.
_PROBE = r"""
import asyncio, json, sys, time
import daemon.backend as backend
from daemon.values import Outcome

async def answered(self, body, headers):
    await asyncio.sleep(0.005)
    return backend._Attempt(Outcome.SUCCESS, 200, body={"synced_items": 1})

backend.BackendClient._post = answered
from daemon import cli
cpu = time.process_time()
code = cli.run(["once"])
print(json.dumps({"code": code, "cpu_s": time.process_time() - cpu}), file=sys.stderr)
"""


def measure(source: Path | None, work: Workload, workdir: Path) -> float:
    """CPU seconds of one in-process `once` (interpreter start-up excluded)."""
    work.make_due()
    env = daemon_environment(work.database_url, "http://127.0.0.1:9/")
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source.resolve()), env["PYTHONPATH"]])
    with (workdir / "once.log").open("w") as log:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    figures = json.loads(done.stderr.strip().splitlines()[-1])
    if figures["code"] != 0 or work.unsynced():
        raise SystemExit(f"a run of {source or 'this tree'} did not sync every user")
    return float(figures["cpu_s"])


def body(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--due", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--daemon-from", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args(argv)
    trees = harness.trees(args.daemon_from)
    load_before = report.uptime()
    figures: dict[str, list[float]] = {name: [] for name, _ in trees}
    with tempfile.TemporaryDirectory() as tmp:
        work = Workload.sqlite(Path(tmp), args.due, args.due)
        work.create(scratch_check=False)
        try:
            for r in range(1, args.rounds + 1):
                for name, source in trees:
                    per_user = measure(source, work, Path(tmp)) / args.due * 1e6
                    figures[name].append(per_user)
                    harness.say(f"round {r}, {name}: {per_user:.0f} µs per user")
        finally:
            work.dispose()
    lines = ["| tree | CPU µs per user, HTTP replaced |", "|---|---:|"]
    for name, _ in trees:
        lines.append(f"| {name} | {harness.spread(figures[name], '.0f')} |")
    text = "\n".join(lines) + (
        f"\n\n{args.due:,} due users, SQLite, INFO lines to a file, {args.rounds} interleaved "
        f"rounds; median (range). Load before: `{load_before}`; after: `{report.uptime()}`."
    )
    harness.publish("own-work", text, write_doc=args.write_doc)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main_guard(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
