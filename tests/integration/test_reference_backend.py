"""The reference backend honours the backend contract and injects the faults it promises.

Every test talks to a real server on 127.0.0.1 through a real aiohttp client, because
the daemon's own tests rely on exactly this wire behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.reference_backend import Faults, add_arguments, main_from_args, start_server

START = "/api/v1/sync/start"
ROOT = Path(__file__).resolve().parents[2]
Backend = Callable[..., Awaitable[str]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    """Start servers on free ports; every one of them is cleaned up after the test."""
    runners = []

    async def start(**kwargs: Any) -> str:
        runner, port = await start_server("127.0.0.1", 0, **kwargs)
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def sync(
    session: aiohttp.ClientSession,
    base: str,
    user_id: Any = "u1",
    *,
    key: str | None = "k1",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    all_headers = {"Idempotency-Key": key} if key else {}
    all_headers.update(headers or {})
    body = {"user_id": user_id, "email": f"{user_id}@example.com", "plan": "pro"}
    async with session.post(base + START, json=body, headers=all_headers) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw), resp


async def stats(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(base + "/_control/stats") as resp:
        return await resp.json()


async def test_health_is_ok(backend: Backend, session: aiohttp.ClientSession) -> None:
    base = await backend()
    async with session.get(base + "/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_success_returns_200_with_synced_items(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend()
    status, body, _ = await sync(session, base, 7)
    assert status == 200
    assert body["status"] == "synced" and body["user_id"] == 7
    assert isinstance(body["synced_items"], int)
    s = await stats(session, base)
    assert s["requests"] == 1 and s["successes"] == 1 and s["by_status"] == {"200": 1}
    assert s["per_user_calls"] == {"7": 1} and s["per_user_successes"] == {"7": 1}
    assert s["last_body"]["plan"] == "pro"
    assert s["last_headers_sample"] == {"authorization_present": False, "idempotency_key": "k1"}


async def test_replayed_idempotency_key_does_not_count_a_second_sync(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend()
    first = await sync(session, base, key="cycle-1-u1")
    second = await sync(session, base, key="cycle-1-u1")
    third = await sync(session, base, key="cycle-2-u1")
    assert first[1] == second[1]
    assert third[0] == 200
    s = await stats(session, base)
    assert s["successes"] == 2 and s["replays"] == 1 and s["idempotency_keys_seen"] == 2
    assert s["per_user_calls"] == {"u1": 3} and s["per_user_successes"] == {"u1": 2}


async def test_failed_request_is_not_replayed_so_its_retry_syncs(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(error_rate=1.0))
    assert (await sync(session, base))[0] == 500
    await session.put(base + "/_control/faults", json={})
    assert (await sync(session, base))[0] == 200
    s = await stats(session, base)
    assert s["replays"] == 0 and s["successes"] == 1 and s["idempotency_keys_seen"] == 1


async def test_concurrent_requests_for_one_user_count_an_overlap(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(latency_ms=150))
    results = await asyncio.gather(sync(session, base, key="a"), sync(session, base, key="b"))
    assert sorted(r[0] for r in results) == [200, 409]
    assert {"error": "sync already running"} in [r[1] for r in results]
    s = await stats(session, base)
    assert s["overlaps"] == 1 and s["successes"] == 1 and s["in_flight"] == 0


async def test_concurrent_requests_for_different_users_are_not_overlaps(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(latency_ms=100))
    await asyncio.gather(*(sync(session, base, f"u{i}", key=f"k{i}") for i in range(5)))
    s = await stats(session, base)
    assert s["overlaps"] == 0 and s["successes"] == 5 and s["max_in_flight"] == 5


async def test_injected_conflict_is_409_but_not_an_overlap(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(conflict_rate=1.0))
    assert (await sync(session, base))[0] == 409
    assert (await stats(session, base))["overlaps"] == 0


async def test_accepted_job_is_polled_until_done(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(accepted_rate=1.0, job_seconds=0.3))
    status, body, resp = await sync(session, base)
    assert status == 202 and body["status"] == "started"
    assert resp.headers["Location"] == body["check_progress"]
    assert body["check_progress"].startswith("/api/v1/sync/progress/")
    # The job still holds the user, so a second start is a genuine overlap.
    assert (await sync(session, base, key="k2"))[0] == 409
    seen_running = False
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        async with session.get(base + body["check_progress"]) as progress:
            state = await progress.json()
        if not state["in_progress"]:
            break
        seen_running = True
        assert 0 <= state["progress"] < state["total"]
        await asyncio.sleep(0.05)
    assert seen_running
    assert state == {"in_progress": False, "last_result": {"success": True, "message": "synced"}}
    s = await stats(session, base)
    assert s["jobs_succeeded"] == 1 and s["successes"] == 1 and s["overlaps"] == 1
    assert s["per_user_successes"] == {"u1": 1}


async def test_failed_job_reports_failure_in_last_result(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(accepted_rate=1.0, job_seconds=0, job_failure_rate=1.0))
    _, body, _ = await sync(session, base)
    await asyncio.sleep(0.05)
    async with session.get(base + body["check_progress"]) as progress:
        state = await progress.json()
    assert state["last_result"]["success"] is False
    s = await stats(session, base)
    assert s["jobs_failed"] == 1 and s["successes"] == 0


async def test_unknown_job_is_404(backend: Backend, session: aiohttp.ClientSession) -> None:
    base = await backend()
    async with session.get(base + "/api/v1/sync/progress/nope") as resp:
        assert resp.status == 404


@pytest.mark.parametrize(("field", "status"), [("rate_limit_rate", 429), ("unavailable_rate", 503)])
async def test_rate_limit_carries_retry_after(
    backend: Backend, session: aiohttp.ClientSession, field: str, status: int
) -> None:
    base = await backend(faults=Faults.from_mapping({field: 1, "retry_after_seconds": 7}))
    code, _, resp = await sync(session, base)
    assert code == status and resp.headers["Retry-After"] == "7"


async def test_error_rate_and_fail_users_answer_500(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(fail_users=frozenset({"bad"})))
    assert (await sync(session, base, "bad"))[0] == 500
    assert (await sync(session, base, "good"))[0] == 200
    await session.put(base + "/_control/faults", json={"error_rate": 1.0})
    assert (await sync(session, base, "good", key="k2"))[0] == 500


async def test_reset_closes_the_connection_without_response(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(reset_rate=1.0))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await sync(session, base)
    s = await stats(session, base)
    assert s["by_status"] == {"reset": 1} and s["in_flight"] == 0 and s["successes"] == 0


async def test_garbage_body_is_not_json(backend: Backend, session: aiohttp.ClientSession) -> None:
    base = await backend(faults=Faults(garbage_rate=1.0))
    async with session.post(base + START, json={"user_id": "u1"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    with pytest.raises(ValueError):
        json.loads(raw)
    assert (await stats(session, base))["successes"] == 0


async def test_oversize_body_is_larger_than_one_mebibyte(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(oversize_rate=1.0))
    async with session.post(base + START, json={"user_id": "u1"}) as resp:
        assert resp.status == 200
        assert len(await resp.read()) > 2 * 1024 * 1024


async def test_hung_request_frees_the_user_when_the_client_gives_up(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(hang_rate=1.0))
    with pytest.raises(TimeoutError):
        async with session.post(
            base + START, json={"user_id": "u1"}, timeout=aiohttp.ClientTimeout(total=0.2)
        ):
            pass
    await asyncio.sleep(0.05)
    await session.put(base + "/_control/faults", json={})
    assert (await sync(session, base))[0] == 200
    s = await stats(session, base)
    assert s["overlaps"] == 0 and s["in_flight"] == 0


async def test_latency_delays_every_answer(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(faults=Faults(latency_ms=100))
    started = time.monotonic()
    await sync(session, base)
    assert time.monotonic() - started >= 0.09


async def test_missing_token_is_401(backend: Backend, session: aiohttp.ClientSession) -> None:
    base = await backend(token="s3cret")
    assert (await sync(session, base))[0] == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await sync(session, base, headers=wrong))[0] == 401
    right = {"Authorization": "Bearer s3cret"}
    assert (await sync(session, base, headers=right))[0] == 200
    s = await stats(session, base)
    assert s["auth_failures"] == 2 and s["successes"] == 1
    assert s["last_headers_sample"]["authorization_present"] is True


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'{"email": "x@example.com"}'])
async def test_body_that_is_not_an_object_with_user_id_is_400(
    backend: Backend, session: aiohttp.ClientSession, payload: bytes
) -> None:
    base = await backend()
    async with session.post(base + START, data=payload) as resp:
        assert resp.status == 400


async def test_faults_can_be_changed_at_runtime(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend()
    async with session.put(
        base + "/_control/faults", json={"error_rate": 1, "fail_users": ["x"]}
    ) as resp:
        assert resp.status == 200
    async with session.get(base + "/_control/faults") as resp:
        faults = await resp.json()
    assert faults["error_rate"] == 1.0 and faults["fail_users"] == ["x"]
    assert (await sync(session, base))[0] == 500


async def test_unknown_fault_field_is_rejected(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend()
    async with session.put(base + "/_control/faults", json={"eror_rate": 1}) as resp:
        assert resp.status == 400
        assert "eror_rate" in (await resp.json())["error"]


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"latency_ms": "fast"}, "latency_ms"),
        ({"retry_after_seconds": 1.5}, "retry_after_seconds"),
        ({"seed": True}, "seed"),
        ({"error_rate": 0.6, "reset_rate": 0.6}, "exceeds 1"),
    ],
)
def test_invalid_fault_values_name_the_problem(data: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Faults.from_mapping(data)


async def test_same_seed_gives_same_fault_sequence(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    sequences = []
    for _ in range(2):
        base = await backend(faults=Faults(error_rate=0.5, seed=42))
        sequences.append([(await sync(session, base, f"u{i}"))[0] for i in range(20)])
    assert sequences[0] == sequences[1] and set(sequences[0]) == {200, 500}


async def test_control_reset_clears_counters_and_idempotency(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend()
    await sync(session, base)
    await session.post(base + "/_control/reset")
    assert (await stats(session, base))["requests"] == 0
    await sync(session, base)
    s = await stats(session, base)
    assert s["successes"] == 1 and s["replays"] == 0


async def test_custom_path_puts_progress_next_to_it(
    backend: Backend, session: aiohttp.ClientSession
) -> None:
    base = await backend(path="/v2/jobs/begin", faults=Faults(accepted_rate=1.0))
    async with session.post(base + "/v2/jobs/begin", json={"user_id": 1}) as resp:
        assert resp.headers["Location"].startswith("/v2/jobs/progress/")


def test_command_line_options_become_faults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--port", "0", "--latency-ms", "50", "--retry-after-seconds", "3", "--fail-user", "7"]
    args = parser.parse_args(argv)
    assert (args.host, args.port, args.latency_ms, args.retry_after_seconds) == (
        "127.0.0.1",
        0,
        50.0,
        3,
    )
    assert args.fail_users == ["7"] and args.token_file is None and args.access_log is False


def test_impossible_fault_rates_exit_with_status_2_before_serving(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--error-rate", "0.7", "--reset-rate", "0.7"])
    assert main_from_args(args) == 2
    assert "exceeds 1" in capsys.readouterr().err


async def test_module_runs_as_a_subprocess_until_sigterm(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok\n")
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.reference_backend", "--port", "0",
        "--token-file", str(token_file),
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
        base = line.split("Running on ", 1)[1].strip()
        headers = {"Authorization": "Bearer tok"}
        assert (await sync(session, base, headers=headers))[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
