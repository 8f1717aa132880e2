"""Where the daemon's CPU goes: one `once` under py-spy, summarised by component.

    python -m bench.profile --due 20000            # writes bench/results/profile-*.json
    python -m bench.profile --write-doc            # and rewrites its section of the doc

py-spy (`pip install -r requirements-bench.txt`) samples the daemon from outside (it
needs ptrace: root, or kernel.yama.ptrace_scope=0). The speedscope file it writes opens
at https://www.speedscope.app; this command also sums its samples by component (the
innermost frame of each sample that belongs to a known library or daemon module).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import clients, harness, report
from bench.clients import Target

# First match wins, innermost frame first: (component, path fragment).
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("structlog (log lines)", "/structlog/"),
    ("daemon/logs.py", "/daemon/logs.py"),
    ("SQLAlchemy + sqlite3 (database thread)", "/sqlalchemy/"),
    ("daemon/store.py", "/daemon/store.py"),
    ("daemon/recorder.py", "/daemon/recorder.py"),
    ("aiohttp + yarl + multidict (HTTP client)", "/aiohttp/"),
    ("aiohttp + yarl + multidict (HTTP client)", "/yarl/"),
    ("aiohttp + yarl + multidict (HTTP client)", "/multidict/"),
    ("daemon/backend.py", "/daemon/backend.py"),
    ("daemon/resilience.py", "/daemon/resilience.py"),
    ("daemon/cycle.py", "/daemon/cycle.py"),
    ("daemon/backlog.py", "/daemon/backlog.py"),
    ("daemon (other modules)", "/daemon/"),
    ("json", "/json/"),
    ("asyncio event loop", "/asyncio/"),
    ("threads, selectors, sockets", "/threading.py"),
    ("threads, selectors, sockets", "/selectors.py"),
    ("threads, selectors, sockets", "/concurrent/"),
)


def summarise(speedscope: Path) -> tuple[Counter[str], Counter[str], int]:
    """Samples per component (innermost known frame) and per function (self), and total."""
    data = json.loads(speedscope.read_text())
    frames = data["shared"]["frames"]
    by_component: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for profile in data["profiles"]:
        for stack in profile["samples"]:
            weight = 1  # each sample is one look at one thread that was not idle
            total += weight
            if not stack:
                continue
            leaf = frames[stack[-1]]
            by_function[f"{leaf['name']} ({Path(leaf.get('file', '?')).name})"] += weight
            by_component[_component(frames, stack)] += weight
    return by_component, by_function, total


def _component(frames: list[dict[str, str]], stack: list[int]) -> str:
    for index in reversed(stack):
        file = frames[index].get("file", "")
        for name, fragment in COMPONENTS:
            if fragment in file:
                return name
    return "other (interpreter, imports, C code)"


def body(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common(parser, due=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--client", choices=clients.NAMES, default="daemon")
    args = parser.parse_args(argv)
    args.clients = args.client
    harness.check_common(parser, args)
    client = args.client_list[0]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        parser.error("py-spy not found: pip install -r requirements-bench.txt")
    out = args.output or harness.RESULTS / f"profile-{args.client}.speedscope.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with harness.prepared(args) as bench:
        bench.workload.make_due()
        target = Target(
            bench.workload.database_url, bench.backend.sync_url, args.due, args.concurrency
        )
        cmd = [spy, "record", "--format", "speedscope", "--rate", str(args.rate), "--threads"]
        cmd += ["--output", str(out), "--", *client.command(target)]
        log = bench.workdir / "profiled.log"
        with log.open("wb") as stdout:
            done = subprocess.run(cmd, env=client.environment(target), stdout=stdout, check=False)
        meta = bench.meta
    if done.returncode != 0:
        harness.say(f"py-spy exited with {done.returncode}")
        return 1
    components, functions, total = summarise(out)
    lines = [
        f"{client.name}: py-spy, {args.rate} samples/s, {args.due:,} users, "
        f"concurrency {args.concurrency}, "
        f"every thread; {total:,} samples.",
        "",
        "| component (innermost frame) | share of samples |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {n / total:.1%} |" for name, n in components.most_common()]
    lines += ["", "| hottest functions (self) | share |", "|---|---:|"]
    lines += [f"| `{name}` | {n / total:.1%} |" for name, n in functions.most_common(12)]
    lines += ["", f"Run: {report.machine_line(meta)}."]
    text = "\n".join(lines)
    harness.say(text)
    harness.say(f"speedscope profile: {out}")
    if args.write_doc:
        report.write_section(f"profile-{client.name}", text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main_guard(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
