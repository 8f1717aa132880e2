"""Polling with a deadline: how tests wait for a process, a socket or a database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

WAIT_SECONDS = 20.0
POLL_SECONDS = 0.05


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float = WAIT_SECONDS,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
    interval: float = POLL_SECONDS,
) -> T:
    """Poll `probe` with short sleeps until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{detail}", pytrace=False)
        time.sleep(interval)


async def wait_until_async(
    probe: Callable[[], T | None],
    *,
    seconds: float = WAIT_SECONDS,
    what: str = "condition",
    interval: float = POLL_SECONDS,
) -> T:
    """`wait_until` for a test whose subject runs in the same event loop: it yields."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {seconds:g}s waiting for {what}", pytrace=False)
        await asyncio.sleep(interval)
