"""Reference implementation of the backend sync contract, with fault injection.

It exists so the daemon can be demonstrated, tested and benchmarked against something
that behaves like a real backend on a bad day, and so backend implementers have a
runnable example of docs/backend-contract.md. The request path stays cheap (no
per-request logging, O(1) bookkeeping) because benchmarks push tens of thousands of
requests through it; all per-request memory is bounded or keyed by user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import random
import sys
import time
import uuid
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.log import access_logger

_MAX_KEYS = 100_000  # bound on remembered Idempotency-Keys and on remembered jobs
_OVERSIZE_BODY = b'{"status": "synced"' + b" " * (2 * 1024 * 1024) + b"}"
# Outcomes drawn from one random number, in this order, so each rate is exact.
_OUTCOMES: tuple[str, ...] = ("reset", "garbage", "oversize", "error", "rate_limit")
_OUTCOMES += ("unavailable", "conflict", "hang", "accepted")
_OUTCOMES += ("redirect", "gzip_bomb", "bad_progress_url", "deep_json")
_MAX_GZIP_BOMB_BYTES = 1 << 30  # inflating is the client's problem; compressing is ours
_MAX_DEEP_JSON_DEPTH = 10_000_000
_USER_SETS = ("fail_users", "set_cookie_users")  # the fields that are sets of user ids
_PLAIN = {  # outcome -> (status, error); 429 and 503 also carry Retry-After
    "error": (500, "internal error"),
    "rate_limit": (429, "rate limited"),
    "unavailable": (503, "unavailable"),
    "conflict": (409, "sync already running"),
}
_COUNTERS: tuple[str, ...] = ("requests", "successes", "replays", "overlaps", "max_in_flight")
_COUNTERS += ("idempotency_keys_seen", "requests_without_idempotency_key", "auth_failures")
_COUNTERS += ("jobs_started", "jobs_succeeded", "jobs_failed", "progress_polls")
_COUNTERS += ("capacity_rejections",)


@dataclasses.dataclass(frozen=True)
class Faults:
    """What goes wrong, and how often. Frozen so a running handler sees one consistent set."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    unavailable_rate: float = 0.0
    reset_rate: float = 0.0
    garbage_rate: float = 0.0
    oversize_rate: float = 0.0
    hang_rate: float = 0.0
    conflict_rate: float = 0.0
    accepted_rate: float = 0.0
    job_failure_rate: float = 0.0
    redirect_rate: float = 0.0
    gzip_bomb_rate: float = 0.0
    bad_progress_url_rate: float = 0.0
    deep_json_rate: float = 0.0
    retry_after_seconds: int = 1
    hang_seconds: float = 3600.0
    job_seconds: float = 0.2
    redirect_status: int = 302
    redirect_location: str = "/health"  # a GET there answers 200: a follower would be fooled
    gzip_bomb_bytes: int = 200 * 1024 * 1024
    bad_progress_url: str = "http://[::1"
    deep_json_depth: int = 100_000
    fail_users: frozenset[str] = frozenset()
    set_cookie_users: frozenset[str] = frozenset()
    seed: int | None = None
    # Server-side capacity: at most `capacity` requests do their `latency_ms` of work at
    # once (0: no limit); the rest wait in line for a slot, so latency grows with the
    # queue, and a request finding `queue_limit` already waiting is answered 503 with
    # Retry-After (0: the line is unbounded).
    capacity: int = 0
    queue_limit: int = 0

    def __post_init__(self) -> None:
        for name in _USER_SETS:
            object.__setattr__(self, name, frozenset(str(u) for u in getattr(self, name)))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_rate") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name} must be between 0 and 1, got {value!r}")
            if isinstance(f.default, int | float) and value < 0:
                raise ValueError(f"{f.name} must not be negative, got {value!r}")
        if sum(getattr(self, f"{o}_rate") for o in _OUTCOMES) > 1.0 + 1e-9:
            raise ValueError(f"the sum of {', '.join(o + '_rate' for o in _OUTCOMES)} exceeds 1")
        if not 300 <= self.redirect_status <= 399:
            raise ValueError(f"redirect_status must be a 3xx, got {self.redirect_status!r}")
        if self.gzip_bomb_bytes > _MAX_GZIP_BOMB_BYTES:
            raise ValueError(f"gzip_bomb_bytes must be at most {_MAX_GZIP_BOMB_BYTES}")
        if not 1 <= self.deep_json_depth <= _MAX_DEEP_JSON_DEPTH:
            raise ValueError(f"deep_json_depth must be between 1 and {_MAX_DEEP_JSON_DEPTH}")

    def replace(self, **changes: Any) -> Faults:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Faults:
        """Build from untrusted JSON, so a typo in a test or a curl command fails loudly."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name not in defaults:
                raise ValueError(f"unknown fault field: {name!r}")
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if name in _USER_SETS:
                if not isinstance(value, list):
                    raise ValueError(f"{name} must be a list of user ids")
                value = frozenset(str(u) for u in value)
            elif isinstance(defaults[name], str):
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be a string")
            elif name == "seed":
                if value is not None and not (number and isinstance(value, int)):
                    raise ValueError("seed must be an integer or null")
            elif not number:
                raise ValueError(f"{name} must be a number")
            elif isinstance(defaults[name], int):
                if value != int(value):
                    raise ValueError(f"{name} must be an integer")
                value = int(value)
            else:
                value = float(value)
            kwargs[name] = value
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), **{n: sorted(getattr(self, n)) for n in _USER_SETS}}


@dataclasses.dataclass(slots=True, eq=False)
class _Job:
    user_id: str
    started: float
    duration: float
    total: int = 10
    handle: asyncio.TimerHandle | None = None
    result: dict[str, Any] | None = None


class _Slots:
    """The server's capacity: requests take a slot for their work, first come first served.

    A freed slot is handed straight to the first in line, so a newcomer never overtakes
    the queue. The capacity is read at every turn, so a change at run time applies to
    the requests already waiting.
    """

    def __init__(self) -> None:
        self.busy = 0
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.most_waiting = 0  # the longest the line has been since the last reset

    async def enter(self, capacity: int, queue_limit: int) -> bool:
        """Take a slot (waiting in line when all are busy); False: the line is full."""
        if not capacity or (self.busy < capacity and not self.waiting):
            self.busy += 1
            return True
        if queue_limit and len(self.waiting) >= queue_limit:
            return False
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        self.most_waiting = max(self.most_waiting, len(self.waiting))
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave(capacity)  # handed a slot just as the client gave up
            elif turn in self.waiting:
                self.waiting.remove(turn)
            raise
        return True  # the slot was handed over with the turn: busy already counts it

    def leave(self, capacity: int) -> None:
        if self.waiting and (not capacity or self.busy <= capacity):
            self.waiting.popleft().set_result(None)  # the slot passes on, busy unchanged
        else:
            self.busy -= 1

    def resize(self, capacity: int) -> None:
        """A new capacity: let in as many of those waiting as now fit."""
        while self.waiting and (not capacity or self.busy < capacity):
            self.busy += 1
            self.waiting.popleft().set_result(None)


class _State:
    """Everything mutable lives here, one per app, so tests can run servers side by side."""

    def __init__(self, faults: Faults, token: str | None) -> None:
        self.token = token
        self.slots = _Slots()
        self.set_faults(faults)
        self.stopping = asyncio.Event()  # lets hanging handlers end when the server stops
        self.user_active: Counter[str] = Counter()  # live requests and jobs per user
        self.in_flight = 0
        self.keys: OrderedDict[str, bytes | None] = OrderedDict()  # key -> replayable body
        self.jobs: OrderedDict[str, _Job] = OrderedDict()
        self.reset()

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.slots.resize(faults.capacity)

    def reset(self) -> None:
        """Forget history but not live requests: their handlers still decrement on exit."""
        for job in self.jobs.values():
            if job.result is None and job.handle is not None:
                job.handle.cancel()
                self.release(job.user_id)
        self.jobs.clear()
        self.keys.clear()
        self.n = dict.fromkeys(_COUNTERS, 0)
        self.n["max_in_flight"] = self.in_flight
        self.slots.most_waiting = len(self.slots.waiting)
        self.by_status: Counter[str] = Counter()
        self.per_user_calls: Counter[str] = Counter()
        self.per_user_successes: Counter[str] = Counter()
        self.last_headers: dict[str, Any] = {}
        self.last_body: Any = None
        self.per_user_cookies: dict[str, str] = {}  # the last Cookie header, by user

    def release(self, user_id: str) -> None:
        self.user_active[user_id] -= 1
        if self.user_active[user_id] <= 0:
            del self.user_active[user_id]

    def authorized(self, request: web.Request) -> bool:
        if self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        self.n["auth_failures"] += 1
        return False

    def answer(self, status: int, payload: Any, headers: Any = None) -> web.Response:
        self.by_status[str(status)] += 1
        if isinstance(payload, bytes):  # pre-encoded: successes, replays, garbage, oversize
            return web.Response(body=payload, status=status, content_type="application/json")
        return web.json_response(payload, status=status, headers=headers)

    def finish_job(self, job: _Job) -> None:
        success = self.rng.random() >= self.faults.job_failure_rate
        job.result = {"success": success, "message": "synced" if success else "sync failed"}
        job.handle = None
        self.release(job.user_id)
        self.n["jobs_succeeded" if success else "jobs_failed"] += 1
        if success:
            self.n["successes"] += 1
            self.per_user_successes[job.user_id] += 1

    def stats(self) -> dict[str, Any]:
        return {
            **self.n,
            "in_flight": self.in_flight,
            "busy": self.slots.busy,
            "queued": len(self.slots.waiting),
            "max_queued": self.slots.most_waiting,
            "by_status": dict(self.by_status),
            "per_user_calls": dict(self.per_user_calls),
            "per_user_successes": dict(self.per_user_successes),
            "last_headers_sample": self.last_headers,
            "last_body": self.last_body,
            "per_user_cookies": dict(self.per_user_cookies),
        }


_STATE = web.AppKey("reference_backend_state", _State)
_PROGRESS_PREFIX = web.AppKey("reference_backend_progress_prefix", str)
_USER = web.RequestKey("reference_backend_user", str)  # set once the body names a user


def _remember(mapping: OrderedDict[str, Any], key: str, value: Any) -> None:
    mapping[key] = value
    if len(mapping) > _MAX_KEYS:
        mapping.popitem(last=False)


@functools.lru_cache(maxsize=2)
def _gzip_bomb(size: int) -> bytes:
    """A gzip body that inflates to `size` bytes of a JSON object padded with spaces.

    About 1,000:1, so 200 MiB travels as 200 KB and a Content-Length that small says
    nothing about what the client ends up holding. Built once per size.
    """
    head, tail = b'{"status": "synced", "padding": "', b'"}'
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    parts, left = [squeeze.compress(head)], max(0, size - len(head) - len(tail))
    block = b" " * (1 << 20)
    while left > 0:
        parts.append(squeeze.compress(block[: min(left, len(block))]))
        left -= len(block)
    parts += [squeeze.compress(tail), squeeze.flush()]
    return b"".join(parts)


async def _start_sync(request: web.Request) -> web.StreamResponse:
    """The contract's start endpoint, plus the Set-Cookie switch for the user it served."""
    response = await _sync(request)
    user_id = request.get(_USER)
    if user_id is not None and user_id in request.app[_STATE].faults.set_cookie_users:
        response.set_cookie("backend_session", f"user-{user_id}", path="/")
    return response


async def _sync(request: web.Request) -> web.StreamResponse:
    """Answer one sync request; the user is held from entry until the sync ends."""
    st = request.app[_STATE]
    st.n["requests"] += 1
    st.in_flight += 1
    st.n["max_in_flight"] = max(st.n["max_in_flight"], st.in_flight)
    held: str | None = None
    try:
        key = request.headers.get("Idempotency-Key")
        auth_present = "Authorization" in request.headers
        st.last_headers = {"authorization_present": auth_present, "idempotency_key": key}
        if not st.authorized(request):
            return st.answer(401, {"error": "missing or wrong bearer token"})
        try:
            body = await request.json()
        except ValueError:
            body = None
        st.last_body = body
        if not isinstance(body, dict) or body.get("user_id") is None:
            return st.answer(400, {"error": "body must be a JSON object with user_id"})
        user_id = str(body["user_id"])
        request[_USER] = user_id
        st.per_user_calls[user_id] += 1
        if (cookie := request.headers.get("Cookie")) is not None:
            st.per_user_cookies[user_id] = cookie
        if st.user_active[user_id]:
            st.n["overlaps"] += 1
            return st.answer(409, {"error": "sync already running"})
        st.user_active[user_id] += 1
        held = user_id
        if key is None:
            st.n["requests_without_idempotency_key"] += 1
        elif key not in st.keys:
            st.n["idempotency_keys_seen"] += 1
            _remember(st.keys, key, None)

        f = st.faults
        delay = f.latency_ms + st.rng.uniform(-f.latency_jitter_ms, f.latency_jitter_ms)
        if not await st.slots.enter(f.capacity, f.queue_limit):
            st.n["capacity_rejections"] += 1
            retry = {"Retry-After": str(f.retry_after_seconds)}
            return st.answer(503, {"error": "over capacity"}, retry)
        try:
            if delay > 0:
                await asyncio.sleep(delay / 1000)
        finally:
            st.slots.leave(st.faults.capacity)
        if key is not None and (replay := st.keys.get(key)) is not None:
            st.n["replays"] += 1
            return st.answer(200, replay)
        if user_id in f.fail_users:
            return st.answer(500, {"error": "this user always fails"})
        draw, outcome = st.rng.random(), "success"
        for name in _OUTCOMES:
            draw -= getattr(f, f"{name}_rate")
            if draw < 0:
                outcome = name
                break
        if outcome == "reset":
            st.by_status["reset"] += 1
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # aiohttp quietly drops it: the socket is closed
        if outcome in ("garbage", "oversize"):  # a 200 the daemon must not trust
            return st.answer(200, b"<html>oops" if outcome == "garbage" else _OVERSIZE_BODY)
        if outcome == "redirect":
            st.by_status[str(f.redirect_status)] += 1
            return web.Response(status=f.redirect_status, headers={"Location": f.redirect_location})
        if outcome == "gzip_bomb":  # would be a success to anyone who inflates it all
            st.by_status["200"] += 1
            bomb = _gzip_bomb(f.gzip_bomb_bytes)
            gzipped = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            return web.Response(body=bomb, status=200, headers=gzipped)
        if outcome == "bad_progress_url":
            payload = {"status": "started", "check_progress": f.bad_progress_url}
            return st.answer(202, payload, {"Location": f.bad_progress_url})
        if outcome == "deep_json":  # a JSON array nested deeper than any parser recurses
            return st.answer(200, b"[" * f.deep_json_depth + b"]" * f.deep_json_depth)
        if outcome in _PLAIN:
            status, error = _PLAIN[outcome]
            headers = {"Retry-After": str(f.retry_after_seconds)} if status in (429, 503) else None
            return st.answer(status, {"error": error}, headers)
        if outcome == "hang":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(f.hang_seconds):
                    await st.stopping.wait()
        if outcome == "accepted":
            job_id, job = uuid.uuid4().hex, _Job(user_id, time.monotonic(), f.job_seconds)
            job.handle = asyncio.get_running_loop().call_later(f.job_seconds, st.finish_job, job)
            _remember(st.jobs, job_id, job)
            st.n["jobs_started"] += 1
            held = None  # the job now holds the user until it finishes
            location = request.app[_PROGRESS_PREFIX] + job_id
            payload = {"status": "started", "check_progress": location}
            return st.answer(202, payload, {"Location": location})

        items = st.rng.randint(0, 50)
        synced = json.dumps({"status": "synced", "user_id": body["user_id"], "synced_items": items})
        if key is not None:
            st.keys[key] = synced.encode()
        st.n["successes"] += 1
        st.per_user_successes[user_id] += 1
        return st.answer(200, synced.encode())
    finally:
        st.in_flight -= 1
        if held is not None:
            st.release(held)


async def _progress(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    if not st.authorized(request):
        return web.json_response({"error": "missing or wrong bearer token"}, status=401)
    job = st.jobs.get(request.match_info["job_id"])
    if job is None:
        return web.json_response({"error": "unknown job"}, status=404)
    st.n["progress_polls"] += 1
    if job.result is not None:
        return web.json_response({"in_progress": False, "last_result": job.result})
    elapsed = time.monotonic() - job.started
    done = min(job.total - 1, int(job.total * elapsed / job.duration)) if job.duration else 0
    return web.json_response({"in_progress": True, "progress": done, "total": job.total})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _faults(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    if request.method == "PUT":
        try:
            data = await request.json()
            if not isinstance(data, dict):
                raise ValueError("body must be a JSON object of fault fields")
            st.set_faults(Faults.from_mapping(data))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(st.faults.to_mapping())


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].stats())


async def _reset(request: web.Request) -> web.Response:
    request.app[_STATE].reset()
    return web.json_response({"status": "reset"})


def create_app(
    *, faults: Faults | None = None, token: str | None = None, path: str = "/api/v1/sync/start"
) -> web.Application:
    """Build the app; the progress URL sits next to `path` (``.../start`` -> ``.../progress/``)."""
    app = web.Application()
    state = _State(faults or Faults(), token)
    app[_STATE] = state
    app[_PROGRESS_PREFIX] = path.rstrip("/").rsplit("/", 1)[0] + "/progress/"

    async def on_shutdown(_: web.Application) -> None:
        state.stopping.set()

    async def on_cleanup(_: web.Application) -> None:
        for job in state.jobs.values():
            if job.handle is not None:
                job.handle.cancel()

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post(path, _start_sync)
    app.router.add_get(app[_PROGRESS_PREFIX] + "{job_id}", _progress)
    app.router.add_get("/health", _health)
    app.router.add_route("GET", "/_control/faults", _faults)
    app.router.add_route("PUT", "/_control/faults", _faults)
    app.router.add_get("/_control/stats", _stats)
    app.router.add_post("/_control/reset", _reset)
    return app


async def start_server(host: str, port: int, **create_app_kwargs: Any) -> tuple[web.AppRunner, int]:
    """Start in the running loop; return the runner (call ``cleanup()``) and the bound port.

    Handler cancellation is on so that a client giving up on a hung request frees that
    user, as a real backend's request timeout would; otherwise every retry after a
    client timeout would be reported as an overlap.
    """
    app = create_app(**create_app_kwargs)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site.port


def serve(
    host: str, port: int, *, faults: Faults, token: str | None, access_log: bool = False
) -> None:
    """Run until SIGINT/SIGTERM, announcing the bound URL on one stderr line."""
    if access_log:
        access_logger.setLevel(logging.INFO)
        access_logger.addHandler(logging.StreamHandler(sys.stderr))

    def announce(message: str) -> None:  # aiohttp's banner, reduced to its first line
        print(f"reference-backend: {message.splitlines()[0].strip('= ')}", file=sys.stderr)
        sys.stderr.flush()

    web.run_app(
        create_app(faults=faults, token=token),
        host=host,
        port=port,
        print=announce,
        access_log=access_logger if access_log else None,
        handle_signals=True,
        handler_cancellation=True,
        shutdown_timeout=5.0,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's options; every Faults field has a flag of the same name."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    for f in dataclasses.fields(Faults):
        if f.name not in (*_USER_SETS, "seed"):
            kind = type(f.default)  # int, float or str
            doc = "probability 0..1" if f.name.endswith("_rate") else "default %(default)s"
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, type=kind, default=f.default, help=doc)
    fail_help = "a user_id that always gets 500 (repeatable)"
    parser.add_argument("--fail-user", action="append", dest="fail_users", help=fail_help)
    cookie_help = "set a cookie on the answers for this user_id (repeatable)"
    parser.add_argument(
        "--set-cookie-user", action="append", dest="set_cookie_users", help=cookie_help
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible faults")
    parser.add_argument("--token-file", type=Path, help="require this bearer token")
    parser.add_argument("--access-log", action="store_true", help="log every request")


def main_from_args(args: argparse.Namespace) -> int:
    names = [f.name for f in dataclasses.fields(Faults) if getattr(args, f.name, None) is not None]
    try:
        faults = Faults(**{name: getattr(args, name) for name in names})
        token = args.token_file.read_text().strip() if args.token_file else None
    except (ValueError, OSError) as exc:
        print(f"reference-backend: {exc}", file=sys.stderr)
        return 2
    serve(args.host, args.port, faults=faults, token=token or None, access_log=args.access_log)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m daemon.reference_backend")
    add_arguments(_parser)
    sys.exit(main_from_args(_parser.parse_args()))
