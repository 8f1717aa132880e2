"""The reference backend's capacity: a bounded number of requests work at once, the rest
wait in line (their latency grows with the line), and a full line is answered 503."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from daemon.reference_backend import Faults, add_arguments, start_server

START = "/api/v1/sync/start"
WORK_MS = 3000  # long enough that the line is still there while the test looks at it


@pytest.fixture
async def base() -> AsyncIterator[str]:
    runner, port = await start_server("127.0.0.1", 0, faults=Faults())
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


async def set_faults(client: aiohttp.ClientSession, base: str, **faults: Any) -> None:
    async with client.put(f"{base}/_control/faults", json=faults) as response:
        assert response.status == 200, await response.text()


async def stats(client: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with client.get(f"{base}/_control/stats") as response:
        return dict(await response.json())


async def post(client: aiohttp.ClientSession, base: str, user_id: int) -> tuple[int, Any]:
    async with client.post(base + START, json={"user_id": user_id}) as response:
        return response.status, response.headers.get("Retry-After")


class Watch:
    """The backend's counters, polled from the test's own event loop."""

    def __init__(self, client: aiohttp.ClientSession, base: str) -> None:
        self.client, self.base = client, base
        self.last: dict[str, Any] = {}

    async def until(self, **wanted: int) -> None:
        async def probe() -> bool:
            self.last = await stats(self.client, self.base)
            return all(self.last[k] == v for k, v in wanted.items())

        deadline = asyncio.get_running_loop().time() + 20
        while not await probe():
            assert asyncio.get_running_loop().time() < deadline, (wanted, self.last)
            await asyncio.sleep(0.05)


async def test_requests_beyond_the_capacity_wait_in_line_for_a_slot(
    base: str, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, base, latency_ms=WORK_MS, capacity=2)
    calls = [asyncio.create_task(post(session, base, user)) for user in range(5)]
    watch = Watch(session, base)
    await watch.until(busy=2, queued=3)
    answers = await asyncio.gather(*calls)
    assert [status for status, _ in answers] == [200] * 5
    final = await stats(session, base)
    assert final["max_queued"] == 3 and final["capacity_rejections"] == 0
    assert final["busy"] == 0 and final["queued"] == 0


async def test_a_full_line_is_answered_503_with_retry_after(
    base: str, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, base, latency_ms=WORK_MS, capacity=1, queue_limit=1)
    watch = Watch(session, base)
    first = asyncio.create_task(post(session, base, 1))
    await watch.until(busy=1)
    second = asyncio.create_task(post(session, base, 2))
    await watch.until(busy=1, queued=1)
    assert await post(session, base, 3) == (503, "1")
    await set_faults(session, base, latency_ms=WORK_MS, capacity=2, queue_limit=1)
    await watch.until(busy=2, queued=0)  # a larger capacity lets the line in at once
    assert [(await first)[0], (await second)[0]] == [200, 200]
    assert (await stats(session, base))["capacity_rejections"] == 1


async def test_a_lower_capacity_at_run_time_holds_back_new_requests(
    base: str, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, base, latency_ms=WORK_MS, capacity=3)
    watch = Watch(session, base)
    early = [asyncio.create_task(post(session, base, user)) for user in range(3)]
    await watch.until(busy=3)
    await set_faults(session, base, latency_ms=WORK_MS, capacity=1)
    late = [asyncio.create_task(post(session, base, user)) for user in range(10, 12)]
    await watch.until(busy=3, queued=2)  # the work under way finishes; nobody new starts
    await asyncio.gather(*early)
    await watch.until(busy=1, queued=1)
    assert [status for status, _ in await asyncio.gather(*late)] == [200, 200]


async def test_a_client_giving_up_in_line_frees_its_place(
    base: str, session: aiohttp.ClientSession
) -> None:
    await set_faults(session, base, latency_ms=WORK_MS, capacity=1)
    watch = Watch(session, base)
    first = asyncio.create_task(post(session, base, 1))
    await watch.until(busy=1)
    impatient = asyncio.create_task(post(session, base, 2))
    await watch.until(queued=1)
    impatient.cancel()
    await watch.until(queued=0, busy=1)
    assert (await first)[0] == 200
    await watch.until(busy=0)


def test_capacity_and_queue_limit_have_command_line_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--capacity", "8", "--queue-limit", "16"])
    assert (args.capacity, args.queue_limit) == (8, 16)
    assert Faults(capacity=args.capacity, queue_limit=args.queue_limit).capacity == 8
    with pytest.raises(ValueError, match="capacity"):
        Faults(capacity=-1)
