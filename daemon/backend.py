"""The backend client: one aiohttp session for the process, the contract's rules per answer.

Every failure a backend can produce (a timeout, a reset, a 5xx, a redirect, a body that is
not JSON, nested too deep or far too large once decompressed) ends as a CallOutcome for that
one user. Nothing here raises into the cycle except cancellation, which must propagate so
that shutdown can cut in-flight calls; anything else that goes wrong while handling one
answer fails that user, because the next user's answer may be fine.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from yarl import URL

from daemon import backoff
from daemon.logs import get_logger
from daemon.progress import Progress
from daemon.settings import Settings
from daemon.values import Claim, Outcome

RETRY_DELAY_CAP_SECONDS = 60.0
RETRY_AFTER_CAP_SECONDS = 300.0
POLL_INTERVAL_START_SECONDS = 0.2
# A failed circuit probe's user waits until this long after the next probe: time enough
# for that probe cycle to claim its users, even on a slow database.
PROBE_HOLD_MARGIN_SECONDS = 60.0
POLL_INTERVAL_CAP_SECONDS = 10.0
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# What aiohttp decompresses (brotli and zstd only when their modules are installed; when
# they are not, reading such a body fails). Any other Content-Encoding reaches us raw.
DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})
MAX_QUOTED_CHARS = 200  # how much of a header value chosen by the backend reaches an error


@dataclass(slots=True)
class CallOutcome:
    """How one user's call ended, after retries."""

    outcome: Outcome
    status: int | None
    attempts: int
    error: str | None = None
    counts: Mapping[str, Any] | None = None
    auth_problem: bool = False
    circuit_open: bool = False
    # The least this user's backoff may be: set when its call was the circuit's probe and
    # failed, so that the next probe is another user's call (see `BackendClient.sync_user`).
    hold_seconds: float = 0.0


@dataclass(slots=True)
class _Attempt:
    """One HTTP exchange, classified."""

    outcome: Outcome
    status: int | None
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    body: Any = None
    progress_url: str | None = None
    timed_out: bool = False


class CallMeter:
    """What sees every HTTP attempt of a sync call. The base meter sees nothing;
    `daemon.metrics.BackendCalls` counts them. Called on the hot path: keep it cheap."""

    def started(self) -> None:
        return None

    def finished(self, outcome: str, status: int | None, seconds: float) -> None:
        """`outcome` is one of `call_outcome`'s answers."""
        return None

    def abandoned(self) -> None:
        """The attempt ended without an answer (cancelled)."""
        return None


def call_outcome(attempt: _Attempt) -> str:
    """How one HTTP attempt ended, in the words of the request metrics.

    A 2xx that the contract cannot take (a body that is not a JSON object, too large, a
    202 without a usable progress URL) is an invalid answer; a 202 with one is a success
    of the request, whatever the polling then finds.
    """
    status = attempt.status
    if status is None:
        return "timeout" if attempt.timed_out else "connection_error"
    if 200 <= status < 300:
        ok = attempt.outcome is Outcome.SUCCESS or attempt.progress_url is not None
        return "success" if ok else "invalid_answer"
    if 300 <= status < 400:
        return "redirect"
    if status in (429, 503):
        return "throttled"
    if 400 <= status < 500:
        return "client_error"
    return "server_error" if 500 <= status < 600 else "invalid_answer"


class GateClosed(Exception):
    """The gate refuses to let a call out (the circuit breaker is open)."""


@dataclass(frozen=True, slots=True)
class Ticket:
    """What `Gate.wait` hands to an admitted call, and the call hands back with its answer.

    `epoch` names the gate's state at admission, so an answer arriving after the state
    changed can be told apart from one that speaks for the present; `probe` marks the one
    call let through to test a backend that was failing.
    """

    epoch: int = 0
    probe: bool = False


class Gate:
    """What every call passes before it is sent. The base gate lets everything through;
    `daemon.resilience.BackendGate` adds the circuit breaker, slow-down and rate limit."""

    async def wait(self) -> Ticket:
        """Return a ticket when a call may be sent; raise GateClosed when none may."""
        return Ticket()

    def record(self, ticket: Ticket, healthy: bool, retry_after: float | None) -> None:
        """Account the answer to the call admitted with `ticket`: `healthy` is False for
        transport errors and 5xx."""
        return None

    def abandon(self, ticket: Ticket) -> None:
        """The call admitted with `ticket` ended without an answer (cancelled)."""
        return None

    def probe_in(self) -> float | None:
        """Seconds until the next probe while calls are refused; None while they go out."""
        return None


class BackendClient:
    """Calls SYNC_BACKEND_URL for one user, retrying what the contract says to retry."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        *,
        gate: Gate | None = None,
        meter: CallMeter | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._session = session
        self._gate = gate or Gate()
        self._meter = meter or CallMeter()
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout_seconds)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.backend_token is not None:
            self._headers["Authorization"] = f"Bearer {settings.backend_token.reveal()}"
        self._payload = dict(settings.backend_payload)
        # The longest a call may wait at the gate. While half-open it waits for the probe's
        # answer: the probe's own turn (a Retry-After pause, its place under the rate limit
        # with every other caller ahead of it) and its request. Then its own turn, as the
        # probe's answer may have carried a new Retry-After.
        turn = RETRY_AFTER_CAP_SECONDS
        if settings.max_requests_per_second:
            turn += settings.concurrency / settings.max_requests_per_second
        self._gate_bound = 2 * turn + settings.request_timeout_seconds
        self._log = get_logger(component="backend")

    @staticmethod
    def open_session(settings: Settings) -> aiohttp.ClientSession:
        """The process-wide session: a connection pool sized to the concurrency.

        It keeps no cookies: the session is shared by every user, so a cookie the backend
        sets while answering for one user would otherwise be sent with everyone else's.
        """
        connector = aiohttp.TCPConnector(
            limit=settings.concurrency, limit_per_host=settings.concurrency, ttl_dns_cache=300
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=settings.request_timeout_seconds),
            raise_for_status=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def sync_user(
        self, claim: Claim, *, run_id: str, progress: Progress | None = None
    ) -> CallOutcome:
        """Call the backend for one user until it succeeds, refuses, or retries run out.

        Each wait is declared to `progress` with its bound, so a call that hangs past
        its own timeout shows up as a stalled cycle (and starves the watchdog). An
        unexpected error while handling an answer fails this user only; cancellation is
        not an Exception and goes through.
        """
        watch = progress or Progress()
        # Bytes: aiohttp sends them as they are (a str would be encoded again, as text/plain).
        body = _ENCODE({**self._payload, "user_id": claim.user_id, "email": claim.email}).encode()
        headers = self._headers | {"Idempotency-Key": f"{run_id}-{claim.key}"}
        attempts = 0
        hold = 0.0
        result = _Attempt(Outcome.FAILED, None)
        try:
            while True:
                try:
                    with watch.bounded(self._gate_bound, "backend gate"):
                        ticket = await self._gate.wait()
                except GateClosed as exc:
                    if attempts == 0:
                        return CallOutcome(Outcome.RELEASED, None, 0, str(exc), circuit_open=True)
                    return CallOutcome(
                        Outcome.FAILED,
                        result.status,
                        attempts,
                        result.error,
                        circuit_open=True,
                        hold_seconds=hold,
                    )
                attempts += 1
                answered = False
                self._meter.started()
                sent = time.perf_counter()
                try:
                    with watch.bounded(self._settings.request_timeout_seconds, "backend call"):
                        result = await self._post(body, headers)
                    answered = True
                finally:
                    if not answered:
                        self._meter.abandoned()
                        self._gate.abandon(ticket)
                self._meter.finished(
                    call_outcome(result), result.status, time.perf_counter() - sent
                )
                healthy = result.status is not None and result.status < 500
                self._gate.record(ticket, healthy, result.retry_after)
                if ticket.probe and not healthy:
                    # The users first in line are often the ones the backend fails on
                    # their own (never synced, so first by id). Held until after the next
                    # probe, this one lets another user's call be that probe, instead of
                    # re-opening the circuit for one account while the backend is well.
                    hold = (self._gate.probe_in() or 0.0) + PROBE_HOLD_MARGIN_SECONDS
                if result.progress_url is not None:
                    bound = self._settings.poll_max_seconds + self._settings.request_timeout_seconds
                    with watch.bounded(bound, "backend progress polling"):
                        result = await self._poll(result.progress_url, headers, result.body)
                if not result.retryable or attempts > self._settings.max_retries:
                    return self._finish(result, attempts, hold)
                delay = backoff.full_jitter(
                    self._settings.retry_delay_seconds, attempts, RETRY_DELAY_CAP_SECONDS, self._rng
                )
                if result.retry_after is not None:
                    delay = max(delay, result.retry_after)
                self._log.info(
                    "backend_retry",
                    user_id=claim.user_id,
                    run_id=run_id,
                    attempt=attempts,
                    status=result.status,
                    error=result.error,
                    delay_ms=round(delay * 1000),
                )
                with watch.bounded(delay, "backend retry delay"):
                    await self._sleep(delay)
        except Exception as exc:  # the per-user boundary: never let one answer end the cycle
            error = f"unexpected error handling the answer: {_describe(exc)}"
            self._log.error(
                "backend_unexpected_error",
                user_id=claim.user_id,
                run_id=run_id,
                attempt=attempts,
                error=error,
                exc_info=True,
            )
            return CallOutcome(Outcome.FAILED, result.status, attempts, error, hold_seconds=hold)

    def _finish(self, result: _Attempt, attempts: int, hold: float) -> CallOutcome:
        counts = _counts(result.body) if result.outcome is Outcome.SUCCESS else None
        return CallOutcome(
            outcome=result.outcome,
            status=result.status,
            attempts=attempts,
            error=result.error,
            counts=counts,
            auth_problem=result.status in (401, 403),
            hold_seconds=hold if result.outcome is Outcome.FAILED else 0.0,
        )

    async def _post(self, body: bytes, headers: Mapping[str, str]) -> _Attempt:
        try:
            async with self._session.post(
                self._settings.backend_url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,  # a redirected POST becomes a GET whose 200 proves nothing
            ) as response:
                return await self._classify(response)
        except TimeoutError:
            return _Attempt(
                Outcome.FAILED,
                None,
                f"timed out after {self._settings.request_timeout_seconds:g}s",
                retryable=True,
                timed_out=True,
            )
        except aiohttp.ClientError as exc:
            return _Attempt(Outcome.FAILED, None, _describe(exc), retryable=True)

    async def _classify(self, response: aiohttp.ClientResponse) -> _Attempt:
        status = response.status
        raw, too_large = await self._read_capped(response)
        if too_large:
            return _Attempt(
                Outcome.FAILED,
                status,
                f"response body larger than {self._settings.response_max_bytes} bytes",
            )
        encoding = _foreign_encoding(response)
        if encoding is not None and raw:
            if 200 <= status < 300 and status != 202:
                return _Attempt(
                    Outcome.FAILED,
                    status,
                    f"response body in a Content-Encoding that is not decoded: {encoding}",
                )
            raw = b""  # what it says cannot be read: only the headers count
        if status == 202:
            body = _json_or_none(raw)
            link = response.headers.get("Location") or (
                body.get("check_progress") if isinstance(body, dict) else None
            )
            if not isinstance(link, str) or not link:
                return _Attempt(Outcome.FAILED, status, "202 without a progress URL")
            url, problem = _progress_url(response.url, link)
            if url is None:
                return _Attempt(Outcome.FAILED, status, f"202 with {problem}")
            return _Attempt(Outcome.FAILED, status, progress_url=url, body=body)
        if 300 <= status < 400:
            hint = "set SYNC_BACKEND_URL to the address that answers"
            return _Attempt(Outcome.FAILED, status, f"{_redirect_error(response)} ({hint})")
        if 200 <= status < 300:
            if not raw.strip():
                return _Attempt(Outcome.SUCCESS, status)
            body = _json_or_none(raw)
            if not isinstance(body, dict):
                return _Attempt(Outcome.FAILED, status, "response body is not a JSON object")
            return _Attempt(Outcome.SUCCESS, status, body=body)
        if status == 409:
            return _Attempt(Outcome.CONFLICT, status, "a sync for this user is already running")
        error = f"HTTP {status} {response.reason or ''}".strip()
        if status in RETRYABLE_STATUSES:
            wait = None
            if status in (429, 503):
                wait = backoff.retry_after(
                    response.headers.get("Retry-After"),
                    datetime.now(UTC),
                    RETRY_AFTER_CAP_SECONDS,
                )
            return _Attempt(Outcome.FAILED, status, error, retryable=True, retry_after=wait)
        if status in (401, 403):
            error = f"{error}: the backend refused our credentials (check SYNC_BACKEND_TOKEN_FILE)"
        return _Attempt(Outcome.FAILED, status, error)

    async def _read_capped(self, response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        """Read at most SYNC_RESPONSE_MAX_BYTES of the decoded body; more is a failure.

        The cap holds on what aiohttp has already decompressed (`response.content`), never
        on Content-Length: for a gzip body that is the compressed size, and 200 KB of gzip
        can inflate to 200 MiB. Reading stops at the first byte past the cap, whatever
        the headers say; aiohttp inflates only as far as it is read.
        """
        cap = self._settings.response_max_bytes
        content = response.content
        chunks: list[bytes] = []
        size = 0
        while size <= cap:
            chunk = await content.read(cap + 1 - size)
            if not chunk:
                return b"".join(chunks), False
            chunks.append(chunk)
            size += len(chunk)
            if size <= cap and content.at_eof():  # the whole body (the usual small answer)
                return b"".join(chunks), False
        return b"", True

    async def _poll(self, url: str, headers: Mapping[str, str], accepted: Any) -> _Attempt:
        """Follow a 202 until the backend's background sync is no longer in progress.

        The deadline adapts to the work announced: base + per item, clamped between a
        minimum and a maximum, so a large sync is not cut short and a stuck one does
        not hold its user forever. The lease heartbeat keeps the claim alive meanwhile.
        """
        started = self._clock()
        deadline = started + self.poll_budget(_total(accepted))
        interval = POLL_INTERVAL_START_SECONDS
        poll_headers = {k: v for k, v in headers.items() if k != "Content-Type"}
        failures = 0
        while True:
            await self._sleep(min(interval, max(0.0, deadline - self._clock())))
            if self._clock() >= deadline:
                return _Attempt(Outcome.FAILED, 202, "progress polling deadline passed")
            interval = min(interval * 2, POLL_INTERVAL_CAP_SECONDS)
            try:
                async with self._session.get(
                    url, headers=poll_headers, timeout=self._timeout, allow_redirects=False
                ) as response:
                    status = response.status
                    if 300 <= status < 400:
                        return _Attempt(
                            Outcome.FAILED, status, f"progress polling: {_redirect_error(response)}"
                        )
                    raw, too_large = await self._read_capped(response)
                    too_large = too_large or (bool(raw) and _foreign_encoding(response) is not None)
            except (TimeoutError, aiohttp.ClientError) as exc:
                failures += 1
                if failures > self._settings.max_retries:
                    return _Attempt(Outcome.FAILED, None, f"progress polling: {_describe(exc)}")
                continue
            body = None if too_large else _json_or_none(raw)
            if status != 200 or not isinstance(body, dict):
                failures += 1
                if failures > self._settings.max_retries:
                    return _Attempt(Outcome.FAILED, status, "progress polling: bad answer")
                continue
            if body.get("in_progress"):
                deadline = started + self.poll_budget(_total(body))
                continue
            last = body.get("last_result")
            if isinstance(last, dict) and last.get("success") is True:
                return _Attempt(Outcome.SUCCESS, 200, body=last)
            message = last.get("message") if isinstance(last, dict) else None
            return _Attempt(
                Outcome.FAILED, 200, f"background sync failed: {message or 'no result'}"
            )

    def poll_budget(self, items: int | None) -> float:
        """How long one user's background sync may take before we give up on it."""
        s = self._settings
        budget = s.poll_base_seconds + (items or 0) * s.poll_per_item_seconds
        return min(s.poll_max_seconds, max(s.poll_min_seconds, budget))


MAX_LOGGED_COUNTS = 10


def _counts(body: Any) -> dict[str, int | float] | None:
    """The numbers in a success body (items synced, ...): what is worth logging of it.

    A body may be up to SYNC_RESPONSE_MAX_BYTES of anything; only a few top-level
    numeric fields reach the log line.
    """
    if not isinstance(body, dict):
        return None
    numbers = {
        str(key)[:64]: value
        for key, value in body.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    return dict(list(numbers.items())[:MAX_LOGGED_COUNTS]) or None


def _total(body: Any) -> int | None:
    """The size of the announced work, if the backend said (`total` or `expected_items`)."""
    if not isinstance(body, dict):
        return None
    for key in ("total", "expected_items"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _json_or_none(raw: bytes) -> Any:
    """The parsed body, or None when it is not JSON (RFC 8259: no NaN or Infinity).

    Nesting too deep for the parser (a RecursionError) is "not JSON" too: 200 KB of
    brackets is well within the size cap.
    """
    try:
        # What json.loads does with bytes, with one decoder made once (loads with a keyword
        # argument builds a new one per call).
        return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_ENCODE = json.JSONEncoder().encode


def _progress_url(request_url: URL, link: str) -> tuple[str | None, str]:
    """Resolve a 202's progress link against the request URL, or say why it is unusable.

    It must parse, be absolute http(s) with a host once resolved, and must not downgrade
    an https backend to http: the bearer token is sent with every poll.
    """
    try:
        url = request_url.join(URL(link))
        url.port  # noqa: B018  (parses the port: an out-of-range one raises here)
    except ValueError as exc:
        return None, f"an invalid progress URL {_quote(link)} ({_describe(exc)})"
    if url.scheme not in ("http", "https") or not url.host:
        return None, f"a progress URL that is not http(s) {_quote(link)}"
    if request_url.scheme == "https" and url.scheme != "https":
        return None, f"a progress URL that downgrades https to http {_quote(link)}"
    return str(url), ""


def _foreign_encoding(response: aiohttp.ClientResponse) -> str | None:
    """A Content-Encoding aiohttp left undecoded (quoted), or None: such a body is opaque."""
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    return None if encoding in DECODED_ENCODINGS else _quote(encoding)


def _redirect_error(response: aiohttp.ClientResponse) -> str:
    """A 3xx is never followed: say where it pointed, so the operator can fix the URL."""
    status = f"HTTP {response.status} {response.reason or ''}".strip()
    location = response.headers.get("Location")
    if location is None:
        return f"{status}: a 3xx without a Location, not followed"
    return f"{status}: redirected to {_quote(location)}, not followed"


def _quote(value: str) -> str:
    """A backend-chosen string made safe for an error: escaped, quoted, clipped."""
    clipped = value[:MAX_QUOTED_CHARS]
    quoted = json.dumps(clipped)
    return quoted if clipped == value else quoted[:-1] + '..."'


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}"[:300] if text else name
