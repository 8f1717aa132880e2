"""The floor: the least a client can do per user with aiohttp, as its own process.

One session with default settings, `concurrency` workers, each POSTing a user's JSON
body and reading the answer. No database, no logs, no retries, no bookkeeping: what
the daemon costs above this is the daemon's own. Prints one JSON line at the end.

    python -m bench.floor --url URL --users N --concurrency C
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

import aiohttp


async def run(url: str, users: int, concurrency: int) -> dict[str, object]:
    statuses: Counter[int] = Counter()
    ids = iter(range(1, users + 1))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for n in ids:
                body = {"user_id": n, "email": f"user{n}@example.com"}
                async with session.post(url, json=body) as response:
                    await response.read()
                    statuses[response.status] += 1

        started, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.monotonic() - started, time.process_time() - cpu
    return {
        "event": "floor_finished",
        "users": users,
        "succeeded": statuses[200],
        "statuses": {str(k): v for k, v in statuses.items()},
        "work_wall_s": round(wall, 3),
        "work_cpu_s": round(cpu, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    summary = asyncio.run(run(args.url, args.users, args.concurrency))
    print(json.dumps(summary), flush=True)
    return 0 if summary["succeeded"] == args.users else 1


if __name__ == "__main__":
    raise SystemExit(main())
