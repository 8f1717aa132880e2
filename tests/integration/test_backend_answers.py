"""Hostile backend answers fail one user at most and never confirm a sync that did not happen.

Each answer is served by a real server on 127.0.0.1: httpbin (a server we did not write)
or the reference backend with one of its fault switches, and read by the real client.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlencode

import pytest
from structlog.testing import capture_logs

from daemon import reference_backend
from daemon import settings as settings_module
from daemon.backend import BackendClient, CallOutcome, Gate, Ticket
from daemon.settings import Settings
from daemon.values import Claim, Outcome
from tests.conftest import AppDatabase, ReferenceBackend, SettingsFactory
from tests.integration.test_cycle import RecordingSleep, run_cycle, synced

MiB = 1024 * 1024
REDIRECTS = [301, 302, 303, 307, 308]


@pytest.fixture
def client_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for calling the backend alone: no database is opened by these tests."""

    def make(url: str, **env: str) -> Settings:
        base = {
            "SYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
            "SYNC_BACKEND_URL": url,
            "SYNC_STATUS_ADDRESS": "",
            "SYNC_RETRY_DELAY_SECONDS": "0.01",
            "SYNC_REQUEST_TIMEOUT_SECONDS": "5",
            "SYNC_MAX_RETRIES": "0",
        }
        return settings_module.load(base | env)

    return make


@asynccontextmanager
async def backend_client(settings: Settings) -> AsyncIterator[BackendClient]:
    session = BackendClient.open_session(settings)
    try:
        yield BackendClient(settings, session, sleep=RecordingSleep())
    finally:
        await session.close()


async def sync_one(settings: Settings, user_id: int = 1) -> CallOutcome:
    async with backend_client(settings) as client:
        claim = Claim(user_id, str(user_id), f"user{user_id}@example.com", "token")
        return await client.sync_user(claim, run_id="run-1")


def redirect_to(httpbin_url: str, target: str, status: int) -> str:
    """httpbin's /redirect-to answers any method with `status` and `Location: target`."""
    return f"{httpbin_url}/redirect-to?{urlencode({'url': target, 'status_code': status})}"


@pytest.mark.parametrize("status", REDIRECTS)
async def test_a_redirect_from_httpbin_fails_the_user_and_names_the_location(
    client_settings: Callable[..., Settings], httpbin_url: str, status: int
) -> None:
    # /anything answers every method with a 200 JSON object: a follower would see success.
    target = f"{httpbin_url}/anything"
    outcome = await sync_one(client_settings(redirect_to(httpbin_url, target, status)))
    assert (outcome.outcome, outcome.status, outcome.attempts) == (Outcome.FAILED, status, 1)
    assert outcome.error is not None
    assert f"redirected to {json.dumps(target)}, not followed" in outcome.error


async def test_a_redirect_location_is_clipped_in_the_error(
    client_settings: Callable[..., Settings], httpbin_url: str
) -> None:
    target = "/" + "x" * 5000
    outcome = await sync_one(client_settings(redirect_to(httpbin_url, target, 302)))
    assert outcome.outcome is Outcome.FAILED
    assert outcome.error is not None
    assert len(outcome.error) < 400
    assert '"/xxxx' in outcome.error and 'x..."' in outcome.error


async def test_a_redirect_from_the_reference_backend_fails_the_user_and_is_not_retried(
    client_settings: Callable[..., Settings], backend: ReferenceBackend
) -> None:
    await backend.faults(redirect_rate=1.0, redirect_status=301)
    outcome = await sync_one(client_settings(backend.url, SYNC_MAX_RETRIES="3"))
    stats = await backend.stats()
    assert (outcome.outcome, outcome.status, outcome.attempts) == (Outcome.FAILED, 301, 1)
    assert outcome.error is not None and 'redirected to "/health"' in outcome.error
    assert stats["requests"] == 1
    assert stats["per_user_successes"] == {}


async def test_a_progress_poll_that_redirects_is_not_followed(
    client_settings: Callable[..., Settings], backend: ReferenceBackend, httpbin_url: str
) -> None:
    elsewhere = redirect_to(httpbin_url, f"{httpbin_url}/anything", 302)
    await backend.faults(bad_progress_url_rate=1.0, bad_progress_url=elsewhere)
    outcome = await sync_one(client_settings(backend.url, SYNC_MAX_RETRIES="2"))
    assert (outcome.outcome, outcome.status) == (Outcome.FAILED, 302)
    assert outcome.error is not None
    assert outcome.error.startswith("progress polling: HTTP 302 FOUND: redirected to")


async def test_a_gzip_bomb_fails_the_user_and_is_not_inflated_past_the_cap(
    client_settings: Callable[..., Settings], backend: ReferenceBackend
) -> None:
    size = 200 * MiB
    compressed = reference_backend._gzip_bomb(size)  # built before measuring: server side
    assert len(compressed) < MiB  # its Content-Length is well within the cap
    await backend.faults(gzip_bomb_rate=1.0, gzip_bomb_bytes=size)
    tracemalloc.start()
    try:
        outcome = await sync_one(client_settings(backend.url))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (outcome.outcome, outcome.status) == (Outcome.FAILED, 200)
    assert outcome.error == f"response body larger than {MiB} bytes"
    # The read stopped near the cap: inflating it all would have held 200 MiB at least.
    assert peak < 32 * MiB, f"peak {peak / MiB:.0f} MiB of Python memory while reading"


async def test_a_gzip_body_is_capped_by_its_decoded_size_not_its_content_length(
    client_settings: Callable[..., Settings], backend: ReferenceBackend
) -> None:
    await backend.faults(gzip_bomb_rate=1.0, gzip_bomb_bytes=2 * MiB)
    assert len(reference_backend._gzip_bomb(2 * MiB)) < 1024 * 16
    outcome = await sync_one(client_settings(backend.url))
    assert outcome.error == f"response body larger than {MiB} bytes"
    decoded_fits = await sync_one(
        client_settings(backend.url, SYNC_RESPONSE_MAX_BYTES=str(3 * MiB))
    )
    assert decoded_fits.outcome is Outcome.SUCCESS  # a JSON object once decoded: a success


async def test_a_gzip_answer_from_httpbin_is_read_decoded(
    client_settings: Callable[..., Settings], httpbin_url: str
) -> None:
    settings = client_settings(f"{httpbin_url}/anything")
    async with backend_client(settings) as client:
        session = BackendClient.open_session(settings)
        try:
            async with session.get(f"{httpbin_url}/gzip") as response:
                assert response.headers["Content-Encoding"] == "gzip"
                raw, too_large = await client._read_capped(response)
        finally:
            await session.close()
    assert not too_large
    assert json.loads(raw)["gzipped"] is True


@pytest.mark.parametrize(
    ("location", "problem"),
    [
        ("http://[::1", "an invalid progress URL"),
        ("http://127.0.0.1:99999/progress/1", "an invalid progress URL"),
        ("ftp://127.0.0.1/progress/1", "a progress URL that is not http(s)"),
        ("mailto:ops@example.com", "a progress URL that is not http(s)"),
    ],
)
async def test_a_202_with_an_unusable_progress_url_fails_that_user(
    client_settings: Callable[..., Settings],
    backend: ReferenceBackend,
    location: str,
    problem: str,
) -> None:
    await backend.faults(bad_progress_url_rate=1.0, bad_progress_url=location)
    outcome = await sync_one(client_settings(backend.url, SYNC_MAX_RETRIES="1"))
    assert (outcome.outcome, outcome.status, outcome.attempts) == (Outcome.FAILED, 202, 1)
    assert outcome.error is not None
    assert outcome.error.startswith(f"202 with {problem} {json.dumps(location)}")


async def test_json_nested_deeper_than_the_parser_recurses_is_not_json(
    client_settings: Callable[..., Settings], backend: ReferenceBackend
) -> None:
    await backend.faults(deep_json_rate=1.0, deep_json_depth=100_000)  # 200 KB of brackets
    outcome = await sync_one(client_settings(backend.url))
    assert (outcome.outcome, outcome.status) == (Outcome.FAILED, 200)
    assert outcome.error == "response body is not a JSON object"


# Whole cycles: the database is the judge of what was confirmed.


@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("server", ["reference", "httpbin"])
async def test_redirect_never_confirms_a_sync(
    app_db: AppDatabase,
    make_settings: SettingsFactory,
    backend: ReferenceBackend,
    httpbin_url: str,
    server: str,
    status: int,
) -> None:
    app_db.seed(3)
    if server == "reference":  # to its /health, which answers a GET with a 200 JSON object
        await backend.faults(redirect_rate=1.0, redirect_status=status)
        url = backend.url
    else:
        url = redirect_to(httpbin_url, f"{httpbin_url}/anything", status)
    with capture_logs() as logs:
        report = await run_cycle(app_db, make_settings, url, SYNC_MAX_RETRIES="2")
    assert (report.outcome, report.failed, report.succeeded) == ("failed", 3, 0)
    assert synced(app_db) == set()
    failures = [e for e in logs if e["event"] == "user_sync_failed"]
    assert [(e["status"], e["attempt"]) for e in failures] == [(status, 1)] * 3  # no retry
    assert all("redirected to" in e["error"] for e in failures)


async def test_a_cookie_set_for_one_user_is_never_sent_for_another(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(4)
    await backend.faults(set_cookie_users=["1"])
    # By name, not by IP: a cookie jar refuses cookies from IP-address hosts anyway.
    url = backend.url.replace("127.0.0.1", "localhost")
    report = await run_cycle(app_db, make_settings, url, SYNC_CONCURRENCY="1")
    stats = await backend.stats()
    assert report.succeeded == 4
    assert set(stats["per_user_calls"]) == {"1", "2", "3", "4"}
    assert stats["per_user_cookies"] == {}


async def test_answers_that_once_crashed_the_daemon_fail_only_their_own_user(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(40)
    await backend.faults(
        deep_json_rate=0.15,
        bad_progress_url_rate=0.15,
        gzip_bomb_rate=0.15,
        gzip_bomb_bytes=8 * MiB,
        redirect_rate=0.15,
        seed=5,
    )
    report = await run_cycle(app_db, make_settings, backend.url, SYNC_MAX_RETRIES="0")
    stats = await backend.stats()
    assert report.succeeded + report.failed == 40
    assert 0 < report.failed < 40
    assert synced(app_db) == {int(u) for u in stats["per_user_successes"]}
    assert report.succeeded == stats["successes"]


class ExplodingGate(Gate):
    """A gate with a bug on its first answer: stands in for any error nobody foresaw."""

    def __init__(self) -> None:
        self.exploded = False

    def record(self, ticket: Ticket, healthy: bool, retry_after: float | None) -> None:
        if not self.exploded:
            self.exploded = True
            raise RuntimeError("bookkeeping bug")


async def test_an_unforeseen_error_on_one_answer_fails_that_user_and_the_cycle_goes_on(
    app_db: AppDatabase, make_settings: SettingsFactory, backend: ReferenceBackend
) -> None:
    app_db.seed(3)
    with capture_logs() as logs:
        report = await run_cycle(
            app_db, make_settings, backend.url, gate=ExplodingGate(), SYNC_CONCURRENCY="1"
        )
    assert (report.failed, report.succeeded) == (1, 2)
    assert synced(app_db) == {2, 3}
    [unexpected] = [e for e in logs if e["event"] == "backend_unexpected_error"]
    assert unexpected["user_id"] == 1
    assert unexpected["error"] == (
        "unexpected error handling the answer: RuntimeError: bookkeeping bug"
    )


async def test_cancellation_still_goes_through_the_per_user_boundary(
    client_settings: Callable[..., Settings], backend: ReferenceBackend
) -> None:
    await backend.faults(hang_rate=1.0)
    async with backend_client(client_settings(backend.url)) as client:
        call = asyncio.ensure_future(
            client.sync_user(Claim(1, "1", "a@example.com", "t"), run_id="r")
        )
        await wait_for_in_flight(backend)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call


async def wait_for_in_flight(backend: ReferenceBackend) -> None:
    for _ in range(400):
        if (await backend.stats())["in_flight"] == 1:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the request never reached the backend")
