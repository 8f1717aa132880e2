"""The peer: the quick build a team writes by hand, as its own process.

Select the due users, then `asyncio.gather` one coroutine per user under a semaphore of
`concurrency`; each POSTs, reads the answer, and on a 200 updates last_sync in its own
transaction (one commit per user, on the event loop) and logs one structlog JSON line at
INFO. No leases, no fencing, no retries, no history: the promises the daemon keeps are
what it pays for above this. Prints a `peer_finished` JSON line at the end.

    python -m bench.peer --database-url URL --url URL --concurrency C
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import structlog
from sqlalchemy import create_engine, text


def _configure_logs() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
    )


async def run(database_url: str, url: str, concurrency: int) -> dict[str, object]:
    _configure_logs()
    log = structlog.get_logger()
    engine = create_engine(database_url)
    started, cpu = time.monotonic(), time.process_time()
    stale = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=1)
    with engine.connect() as conn:
        users = conn.execute(
            text("SELECT id, email FROM users WHERE last_sync IS NULL OR last_sync < :stale"),
            {"stale": stale},
        ).all()
    semaphore = asyncio.Semaphore(concurrency)
    update = text("UPDATE users SET last_sync = :now WHERE id = :id")

    async with aiohttp.ClientSession() as session:

        async def sync(user_id: int, email: str) -> bool:
            async with semaphore:
                begin = time.monotonic()
                body = {"user_id": user_id, "email": email}
                async with session.post(url, json=body) as response:
                    answer = await response.json()
                    if response.status != 200:
                        log.warning("user_sync_failed", user_id=user_id, status=response.status)
                        return False
                with engine.begin() as conn:
                    conn.execute(
                        update, {"now": datetime.now(UTC).replace(tzinfo=None), "id": user_id}
                    )
                log.info(
                    "user_synced",
                    user_id=user_id,
                    status=response.status,
                    duration_ms=round((time.monotonic() - begin) * 1000),
                    result={"synced_items": answer.get("synced_items")},
                )
                return True

        done = await asyncio.gather(*(sync(u, e) for u, e in users))
    wall, cpu = time.monotonic() - started, time.process_time() - cpu
    engine.dispose()
    return {
        "event": "peer_finished",
        "users": len(users),
        "succeeded": sum(done),
        "work_wall_s": round(wall, 3),
        "work_cpu_s": round(cpu, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    summary = asyncio.run(run(args.database_url, args.url, args.concurrency))
    print(json.dumps(summary), flush=True)
    return 0 if summary["succeeded"] == summary["users"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
