"""CPU per synced user and wall time: floor, peer and daemon interleaved in one run.

    python -m bench.cpu                         # 20,000 due users, 50 ms, C=32, 3 rounds
    python -m bench.cpu --write-doc             # and rewrite its section of performance.md
    python -m bench.cpu --clients daemon --due 2000 --table-size 1000000   # memory check

Each round runs the floor, the peer and the daemon one after another against the same
backend process; then each runs once with nothing to do (its fixed start-up cost).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bench import harness, report
from bench.interleave import Run, problems


def body(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    harness.add_common(parser, due=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-baseline", action="store_true", help="skip the 0-user runs")
    args = parser.parse_args(argv)
    harness.check_common(parser, args)
    runs: list[Run] = []
    with harness.prepared(args) as bench:
        runs += bench.runner.rounds(
            args.client_list, rounds=args.rounds, concurrency=args.concurrency, users=args.due
        )
        if not args.no_baseline:
            harness.say("baselines (nothing to do)")
            for client in args.client_list:
                runs.append(
                    bench.runner.run(client, round_=0, concurrency=args.concurrency, users=0)
                )
        meta = bench.meta
    harness.save("cpu", args, meta, runs)
    table = report.cpu_table(runs, args.concurrency)
    rss = ", ".join(
        f"{name} {max(r.usage.max_rss_kib for r in report.by_client(runs, name)) / 1024:.0f} MiB"
        for name in [c.name for c in args.client_list]
        if report.by_client(runs, name)
    )
    database = "the given database" if args.database_url else "SQLite"
    text = "\n\n".join(
        [
            f"{args.due:,} due users ({args.table_size:,} rows), backend {args.latency_ms:g} ms, "
            f"concurrency {args.concurrency}, {database}, "
            f"INFO logging, {args.rounds} interleaved rounds; median (range) over the rounds.",
            table,
            report.targets_table(runs, args.concurrency),
            f"Peak RSS: {rss}. {report.problems_line(runs)}",
            f"Run: {report.machine_line(meta)}.",
        ]
    )
    harness.say("")
    harness.say(text)
    if args.write_doc:
        report.write_section("cpu", text)
        harness.say(f"section 'cpu' of {report.DOC} rewritten")
    return 1 if any(problems(r) for r in runs if r.users) else 0


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main_guard(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
