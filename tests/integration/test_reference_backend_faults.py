"""The reference backend's hostile-answer switches put exactly the promised bytes on the wire.

Read with a plain aiohttp client that follows nothing, decodes nothing and keeps no
cookies, so each test sees what the daemon's client is up against.
"""

from __future__ import annotations

import argparse
import gzip
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from daemon.reference_backend import Faults, add_arguments, start_server

START = "/api/v1/sync/start"
MiB = 1024 * 1024


@pytest.fixture
async def base() -> AsyncIterator[str]:
    runner, port = await start_server("127.0.0.1", 0, faults=Faults())
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def raw() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that shows the answer as sent: no decompression, no cookie jar."""
    async with aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=10),
    ) as session:
        yield session


async def set_faults(session: aiohttp.ClientSession, base: str, **faults: Any) -> None:
    async with session.put(f"{base}/_control/faults", json=faults) as response:
        assert response.status == 200, await response.text()


async def post(
    session: aiohttp.ClientSession, base: str, user_id: Any = 1, **headers: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with session.post(
        base + START, json={"user_id": user_id}, headers=headers, allow_redirects=False
    ) as response:
        return response, await response.read()


async def stats(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/_control/stats") as response:
        return dict(await response.json())


async def test_redirect_answers_the_configured_3xx_and_location(
    base: str, raw: aiohttp.ClientSession
) -> None:
    await set_faults(raw, base, redirect_rate=1.0)
    response, _ = await post(raw, base)
    assert (response.status, response.headers["Location"]) == (302, "/health")
    await set_faults(raw, base, redirect_rate=1.0, redirect_status=308, redirect_location="/x")
    response, _ = await post(raw, base)
    assert (response.status, response.headers["Location"]) == (308, "/x")
    s = await stats(raw, base)
    assert s["successes"] == 0 and s["by_status"] == {"302": 1, "308": 1}


async def test_gzip_bomb_is_small_on_the_wire_and_inflates_to_the_configured_size(
    base: str, raw: aiohttp.ClientSession
) -> None:
    await set_faults(raw, base, gzip_bomb_rate=1.0, gzip_bomb_bytes=4 * MiB)
    response, body = await post(raw, base)
    assert response.status == 200 and response.headers["Content-Encoding"] == "gzip"
    assert int(response.headers["Content-Length"]) == len(body) < 64 * 1024
    inflated = gzip.decompress(body)
    assert len(inflated) == 4 * MiB
    assert inflated.startswith(b'{"status": "synced"') and inflated.endswith(b'"}')
    assert (await stats(raw, base))["successes"] == 0


async def test_bad_progress_url_is_a_202_pointing_nowhere_usable(
    base: str, raw: aiohttp.ClientSession
) -> None:
    await set_faults(raw, base, bad_progress_url_rate=1.0)
    response, _ = await post(raw, base)
    assert (response.status, response.headers["Location"]) == (202, "http://[::1")
    assert (await stats(raw, base))["jobs_started"] == 0


async def test_deep_json_is_a_200_of_nested_arrays(base: str, raw: aiohttp.ClientSession) -> None:
    await set_faults(raw, base, deep_json_rate=1.0, deep_json_depth=50_000)
    response, body = await post(raw, base)
    assert response.status == 200
    assert body == b"[" * 50_000 + b"]" * 50_000


async def test_set_cookie_users_get_a_cookie_and_cookies_received_are_recorded(
    base: str, raw: aiohttp.ClientSession
) -> None:
    await set_faults(raw, base, set_cookie_users=["1"])
    first, _ = await post(raw, base, 1)
    second, _ = await post(raw, base, 2, Cookie="backend_session=user-1")
    assert "backend_session=user-1" in first.headers["Set-Cookie"]
    assert "Set-Cookie" not in second.headers
    assert (await stats(raw, base))["per_user_cookies"] == {"2": "backend_session=user-1"}


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"redirect_status": 200}, "redirect_status"),
        ({"redirect_location": 5}, "redirect_location"),
        ({"gzip_bomb_bytes": 2**31}, "gzip_bomb_bytes"),
        ({"deep_json_depth": 0}, "deep_json_depth"),
        ({"set_cookie_users": "1"}, "set_cookie_users"),
        ({"redirect_rate": 0.6, "gzip_bomb_rate": 0.6}, "exceeds 1"),
    ],
)
def test_invalid_new_fault_values_name_the_problem(data: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Faults.from_mapping(data)


def test_every_new_switch_has_a_command_line_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--redirect-rate=1",
            "--redirect-status=307",
            "--redirect-location=https://elsewhere.example/",
            "--gzip-bomb-bytes=1024",
            "--bad-progress-url=ftp://x/",
            "--deep-json-depth=10",
            "--set-cookie-user=7",
        ]
    )
    assert (args.redirect_status, args.redirect_location) == (307, "https://elsewhere.example/")
    assert (args.gzip_bomb_bytes, args.deep_json_depth) == (1024, 10)
    assert (args.bad_progress_url, args.set_cookie_users) == ("ftp://x/", ["7"])
    faults = Faults.from_mapping({"set_cookie_users": ["7"], "redirect_status": 307})
    assert faults.to_mapping()["set_cookie_users"] == ["7"]
