"""Throughput and CPU per user against concurrency, for the floor, the peer and the daemon.

    python -m bench.concurrency                        # C = 8, 16, 32, 64; 4,000 users
    python -m bench.concurrency --write-doc            # plot to docs/ and rewrite the section

At each concurrency the three clients run interleaved (floor, peer, daemon, then the
next concurrency), `--rounds` times over, against one backend process.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from bench import harness, report
from bench.interleave import Run, problems

PLOT = report.DOC.parent / "performance-concurrency.png"


def plot(runs: Sequence[Run], levels: Sequence[int], path: Path, title: str) -> None:
    """Two panels: users per second, and CPU µs per user, against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for client, style in (("floor", "o-"), ("peer", "s--"), ("daemon", "^-")):
        xs, rate, cpu = [], [], []
        for c in levels:
            mine = report.by_client(runs, client, c)
            r = report.Spread.of(x.throughput for x in mine)
            u = report.Spread.of(report.net_cpu_us(x, runs) for x in mine)
            if r and u:
                xs.append(c)
                rate.append(r.median)
                cpu.append(u.median)
        if xs:
            top.plot(xs, rate, style, label=client)
            bottom.plot(xs, cpu, style, label=client)
    latency = runs[0].latency_ms if runs else 50.0
    top.plot(
        levels, [c / latency * 1000 for c in levels], ":", color="grey", label="ideal C / latency"
    )
    top.set_ylabel("users synced per second")
    top.set_title(title)
    top.legend()
    top.grid(True, alpha=0.3)
    bottom.set_ylabel("CPU µs per user, net of start-up")
    bottom.set_xlabel("concurrency")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(list(levels), [str(c) for c in levels])
    bottom.set_ylim(bottom=0)
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(runs: Sequence[Run], levels: Sequence[int]) -> str:
    lines = [
        "| C | ideal users/s | floor users/s | peer users/s | daemon users/s "
        "| floor µs/user | peer µs/user | daemon µs/user | daemon CPU vs floor "
        "| daemon wall vs floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        cells = [str(c), f"{c / runs[0].latency_ms * 1000:.0f}"]
        for client in ("floor", "peer", "daemon"):
            s = report.Spread.of(r.throughput for r in report.by_client(runs, client, c))
            cells.append("n/a" if s is None else f"{s.median:.0f}")
        net: dict[str, float | None] = {}
        for client in ("floor", "peer", "daemon"):
            s = report.Spread.of(
                report.net_cpu_us(r, runs) for r in report.by_client(runs, client, c)
            )
            net[client] = None if s is None else s.median
            cells.append("n/a" if s is None else f"{s.median:.0f}")
        floor, daemon = net["floor"], net["daemon"]
        cells.append(f"{daemon / floor:.2f}x" if floor and daemon is not None else "n/a")
        wall = report.ratios(runs, "daemon", "work_wall_s", c)
        cells.append("n/a" if wall is None else f"{wall.median:.3f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def body(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.add_common(parser, due=4_000)
    parser.add_argument("--levels", default="8,16,32,64", help="concurrencies to measure")
    parser.add_argument("--plot", type=Path, default=PLOT, help="the PNG (with --write-doc)")
    parser.set_defaults(rounds=1)
    args = parser.parse_args(argv)
    harness.check_common(parser, args)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    runs: list[Run] = []
    with harness.prepared(args) as bench:
        for r in range(1, args.rounds + 1):
            for c in levels:
                harness.say(f"round {r} of {args.rounds}, concurrency {c}")
                for client in args.client_list:
                    runs.append(bench.runner.run(client, round_=r, concurrency=c, users=args.due))
        harness.say("baselines (nothing to do)")
        for client in args.client_list:
            runs.append(bench.runner.run(client, round_=0, concurrency=levels[0], users=0))
        meta = bench.meta
    harness.save("concurrency", args, meta, runs)
    title = (
        f"{args.due:,} users, backend {args.latency_ms:g} ms, SQLite, INFO logs "
        f"({meta['started_at'][:10]})"
    )
    text = "\n\n".join(
        [
            f"{args.due:,} due users per run, backend {args.latency_ms:g} ms, SQLite, INFO "
            f"logging; {args.rounds} round(s), the three clients interleaved at each "
            "concurrency. CPU per user is net of each client's start-up (its run with "
            "nothing to do), which would weigh heavily at a few thousand users.",
            f"![throughput and CPU per user against concurrency]({args.plot.name})",
            table(runs, levels),
            report.problems_line(runs),
            f"Run: {report.machine_line(meta)}.",
        ]
    )
    harness.say(text)
    if args.write_doc:
        plot(runs, levels, args.plot, title)
        report.write_section("concurrency", text)
        harness.say(f"plot written to {args.plot}")
    return 1 if any(problems(r) for r in runs if r.users) else 0


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main_guard(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
