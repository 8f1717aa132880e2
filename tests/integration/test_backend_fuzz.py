"""Whatever bytes come back, sync_user returns a CallOutcome, and SUCCESS only for a true one.

A raw asyncio TCP server on 127.0.0.1 writes exactly the bytes of each case (broken status
lines, lying framing, bad encodings, odd redirects, hostile JSON) and closes the
connection; the real aiohttp client reads them. The cases that once crashed the daemon
(an unparseable Location, JSON nested too deep) are in the table; a seeded generator
mixes the same ingredients into a few hundred more answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import random
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon import settings as settings_module
from daemon.backend import BackendClient, CallOutcome
from daemon.settings import Settings
from daemon.values import Claim, Outcome
from tests.integration.test_cycle import RecordingSleep

CAP = 64 * 1024  # SYNC_RESPONSE_MAX_BYTES for these tests: big bodies stay cheap
OBJECT = b'{"status": "synced", "synced_items": 3}'


class SteppingClock:
    """Each reading is 5 s later: an endless "in progress" meets its deadline in a few polls."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 5.0
        return self.now


class RawServer:
    """Answers every request with preset bytes, then closes the connection.

    `answer` is sent for the sync POST, `poll_answer` (when set) for progress GETs;
    empty bytes close the connection without a word.
    """

    def __init__(self) -> None:
        self.answer = b""
        self.poll_answer: bytes | None = None
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    await reader.readexactly(int(value))
            is_poll = head.startswith(b"GET ")
            answer = self.poll_answer if is_poll and self.poll_answer is not None else self.answer
            if answer:
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def call(
    raw_server: RawServer, tmp_path: Path
) -> AsyncIterator[Callable[[bytes, bytes | None], asyncio.Future[CallOutcome]]]:
    """Send one user's sync to the raw server answering `answer`; the real client reads it."""
    settings: Settings = settings_module.load(
        {
            "SYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
            "SYNC_BACKEND_URL": f"http://127.0.0.1:{raw_server.port}/api/v1/sync/start",
            "SYNC_STATUS_ADDRESS": "",
            "SYNC_RETRY_DELAY_SECONDS": "0.01",
            "SYNC_REQUEST_TIMEOUT_SECONDS": "5",
            "SYNC_MAX_RETRIES": "1",
            "SYNC_RESPONSE_MAX_BYTES": str(CAP),
        }
    )
    claim = Claim(7, "7", "user7@example.com", "token")

    async def sync(answer: bytes, poll_answer: bytes | None) -> CallOutcome:
        # A session per answer: the raw server closes every connection after one answer,
        # so a pooled one would spend the first attempt on a dead socket.
        raw_server.answer, raw_server.poll_answer = answer, poll_answer
        session = BackendClient.open_session(settings)
        try:
            client = BackendClient(settings, session, sleep=RecordingSleep(), clock=SteppingClock())
            return await client.sync_user(claim, run_id="fuzz")
        finally:
            await session.close()

    def send(answer: bytes, poll_answer: bytes | None = None) -> asyncio.Future[CallOutcome]:
        return asyncio.ensure_future(sync(answer, poll_answer))

    yield send


def response(
    status: bytes | int = 200,
    body: bytes = OBJECT,
    headers: tuple[bytes, ...] = (),
    *,
    length: int | str | None = "auto",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """An HTTP/1.1 answer; `length` None sends no Content-Length (the body ends at close)."""
    line = status if isinstance(status, bytes) else f"{version.decode()} {status} X".encode()
    lines = [line, *headers]
    if length == "auto":
        lines.append(b"Content-Length: %d" % len(body))
    elif length is not None:
        lines.append(b"Content-Length: %s" % str(length).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(status: int, pieces: list[bytes], tail: bytes = b"0\r\n\r\n") -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + tail
    return response(status, framed, (b"Transfer-Encoding: chunked",), length=None)


def deflated(data: bytes) -> bytes:
    return zlib.compress(data)


def nested(depth: int, opening: bytes = b"[", closing: bytes = b"]") -> bytes:
    return opening * depth + closing * depth


@dataclass(frozen=True)
class Case:
    name: str
    answer: bytes
    genuine: bool  # a real 2xx whose body is empty or a JSON object: SUCCESS is right
    poll_answer: bytes | None = None


def _progress(answer: dict[str, object]) -> bytes:
    return response(200, json.dumps(answer).encode())


POLL_DONE = _progress({"in_progress": False, "last_result": {"success": True}})

CASES = [
    # Genuine answers: the success path still works through all of this.
    Case("200 JSON object", response(200), True),
    Case("201 JSON object", response(201), True),
    Case("204 no content", response(204, b"", length=None), True),
    Case("200 empty body", response(200, b""), True),
    Case("200 whitespace body", response(200, b" \r\n\t "), True),
    Case("200 body until close", response(200, length=None), True),
    Case("HTTP/1.0 200 body until close", response(200, version=b"HTTP/1.0", length=None), True),
    Case("200 chunked JSON object", chunked(200, [OBJECT[:5], OBJECT[5:]]), True),
    Case(
        "200 gzip JSON object",
        response(200, gzip.compress(OBJECT), (b"Content-Encoding: gzip",)),
        True,
    ),
    Case(
        "200 deflate JSON object",
        response(200, deflated(OBJECT), (b"Content-Encoding: deflate",)),
        True,
    ),
    Case("200 JSON object, text/html", response(200, OBJECT, (b"Content-Type: text/html",)), True),
    Case("200 UTF-8 BOM JSON object", response(200, b"\xef\xbb\xbf" + OBJECT), True),
    Case(
        "202 then a successful poll",
        response(202, b"", (b"Location: /progress/1",)),
        True,
        POLL_DONE,
    ),
    # Broken status lines.
    Case("connection closed at once", b"", False),
    Case("closed after the status line", b"HTTP/1.1 200 OK\r\n", False),
    Case("no status line (HTTP/0.9 style)", OBJECT, False),
    Case("non-numeric status", response(b"HTTP/1.1 2OO OK"), False),
    Case("negative status", response(b"HTTP/1.1 -200 OK"), False),
    Case("four-digit status", response(b"HTTP/1.1 2000 OK"), False),
    Case("status 999", response(999), False),
    Case("status 600", response(600), False),
    Case("unknown HTTP version", response(b"HTTP/9.9 200 OK"), False),
    Case("garbage instead of HTTP", b"\x00\xff\xfe garbage \r\n\r\n", False),
    Case("status line without CRLF", b"HTTP/1.1 200 OK", False),
    # Lying framing and encodings.
    Case("body shorter than Content-Length", response(200, OBJECT, length=len(OBJECT) + 50), False),
    Case("Content-Length not a number", response(200, OBJECT, length="lots"), False),
    Case("negative Content-Length", response(200, OBJECT, length=-1), False),
    Case("two different Content-Lengths", response(200, OBJECT, (b"Content-Length: 3",)), False),
    Case(
        "chunk size not hex",
        response(200, b"zz\r\n{}\r\n0\r\n\r\n", (b"Transfer-Encoding: chunked",), length=None),
        False,
    ),
    Case("chunked, closed before the last chunk", chunked(200, [OBJECT], tail=b""), False),
    Case(
        "chunk longer than announced",
        response(200, b"2\r\n{}xx\r\n0\r\n\r\n", (b"Transfer-Encoding: chunked",), length=None),
        False,
    ),
    Case(
        "chunked and Content-Length",
        response(200, b"2\r\n{}\r\n0\r\n\r\n", (b"Transfer-Encoding: chunked",), length=11),
        False,
    ),
    Case("gzip label on a plain body", response(200, OBJECT, (b"Content-Encoding: gzip",)), False),
    Case(
        "truncated gzip",
        response(200, gzip.compress(OBJECT)[:-12], (b"Content-Encoding: gzip",)),
        False,
    ),
    Case(
        "deflate label on garbage",
        response(200, b"\x78\x9c\xff\xff", (b"Content-Encoding: deflate",)),
        False,
    ),
    Case(
        "unknown Content-Encoding",
        response(200, b"\x01\x02\x03", (b"Content-Encoding: x-custom",)),
        False,
    ),
    Case(
        "unknown Content-Encoding, JSON-looking body",
        response(200, OBJECT, (b"Content-Encoding: x-rot13",)),
        False,
    ),
    Case(
        "gzip twice, decoded once",
        response(200, gzip.compress(OBJECT), (b"Content-Encoding: gzip, gzip",)),
        False,
    ),
    Case(
        "zstd without zstd support",
        response(200, b"(\xb5/\xfd\x00", (b"Content-Encoding: zstd",)),
        False,
    ),
    Case("header line too long", response(200, OBJECT, (b"X-Big: " + b"a" * 20_000,)), False),
    Case(
        "too many headers",
        response(200, OBJECT, tuple(b"X-H%d: v" % i for i in range(5000))),
        False,
    ),
    Case("header without a colon", response(200, OBJECT, (b"this is not a header",)), False),
    Case("NUL in a header", response(200, OBJECT, (b"X-A: a\x00b",)), False),
    # Bodies that are not a JSON object.
    Case("JSON array", response(200, b"[1, 2]"), False),
    Case("JSON string", response(200, b'"synced"'), False),
    Case("JSON number", response(200, b"42"), False),
    Case("JSON null", response(200, b"null"), False),
    Case("JSON true", response(200, b"true"), False),
    Case("bare NaN", response(200, b"NaN"), False),
    Case("object holding NaN", response(200, b'{"synced_items": NaN}'), False),
    Case("object holding -Infinity", response(200, b'{"took": -Infinity}'), False),
    Case("truncated JSON object", response(200, OBJECT[:-1]), False),
    Case("two JSON objects", response(200, OBJECT + OBJECT), False),
    Case("HTML", response(200, b"<html>oops</html>"), False),
    Case("latin-1 inside a JSON string", response(200, b'{"name": "Andr\xe9"}'), False),
    Case("invalid UTF-8 lead bytes", response(200, b"\xff\xfe\xfd{}"), False),
    Case("UTF-16 without BOM that is not JSON", response(200, "{".encode("utf-16-le")), False),
    Case("huge integer", response(200, b'{"n": ' + b"9" * 5000 + b"}"), False),
    Case("JSON arrays nested 30k deep", response(200, nested(30_000)), False),
    Case(
        "JSON objects nested 10k deep",
        response(200, b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        False,
    ),
    Case("10 MB without a length", response(200, b" " * (10 * 1024 * 1024), length=None), False),
    Case("10 MB chunked", chunked(200, [b" " * (1024 * 1024)] * 10), False),
    Case("Content-Length over the cap", response(200, OBJECT + b" " * CAP), False),
    Case(
        "gzip inflating past the cap",
        response(200, gzip.compress(b"{" + b" " * 50 * CAP + b"}"), (b"Content-Encoding: gzip",)),
        False,
    ),
    # Redirects and 202s with odd Locations.
    Case("302 to a 200 elsewhere", response(302, b"", (b"Location: /anything",)), False),
    Case("301 without Location", response(301, b""), False),
    Case("303 with an invalid Location", response(303, b"", (b"Location: http://[::1",)), False),
    Case("307 with a 20 KB Location", response(307, b"", (b"Location: /" + b"x" * 7000,)), False),
    Case("308 with a latin-1 Location", response(308, b"", (b"Location: /caf\xe9",)), False),
    Case("304 not modified", response(304, b"", length=None), False),
    Case(
        "202 Location unparseable",
        response(202, b"", (b"Location: http://[::1",)),
        False,
        POLL_DONE,
    ),
    Case(
        "202 Location port out of range",
        response(202, b"", (b"Location: http://127.0.0.1:99999/p",)),
        False,
        POLL_DONE,
    ),
    Case(
        "202 Location ftp", response(202, b"", (b"Location: ftp://127.0.0.1/p",)), False, POLL_DONE
    ),
    Case(
        "202 Location javascript",
        response(202, b"", (b"Location: javascript:alert(1)",)),
        False,
        POLL_DONE,
    ),
    Case(
        "202 Location latin-1", response(202, b"", (b"Location: http://caf\xe9.invalid/p",)), False
    ),
    Case("202 check_progress a number", response(202, b'{"check_progress": 5}'), False, POLL_DONE),
    Case(
        "202 check_progress unparseable",
        response(202, b'{"check_progress": "http://[::1"}'),
        False,
        POLL_DONE,
    ),
    Case("202 without any progress URL", response(202, b""), False, POLL_DONE),
    Case(
        "202, the poll redirects",
        response(202, b"", (b"Location: /progress/1",)),
        False,
        response(302, b"", (b"Location: /done",)),
    ),
    Case(
        "202, the poll answers NaN",
        response(202, b"", (b"Location: /progress/1",)),
        False,
        response(200, b'{"in_progress": false, "last_result": {"success": NaN}}'),
    ),
    Case(
        "202, the poll answers deep JSON",
        response(202, b"", (b"Location: /progress/1",)),
        False,
        response(200, nested(30_000)),
    ),
    Case(
        "202, the poll is a gzip bomb",
        response(202, b"", (b"Location: /progress/1",)),
        False,
        response(200, gzip.compress(b" " * 50 * CAP), (b"Content-Encoding: gzip",)),
    ),
    Case(
        "202, the poll closes at once", response(202, b"", (b"Location: /progress/1",)), False, b""
    ),
    Case(
        "202, success is the string true",
        response(202, b"", (b"Location: /progress/1",)),
        False,
        _progress({"in_progress": False, "last_result": {"success": "true"}}),
    ),
]


def describe(outcome: CallOutcome) -> str:
    return f"{outcome.outcome} status={outcome.status} error={outcome.error!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_an_odd_answer_never_confirms_a_sync_and_never_raises(
    call: Callable[[bytes, bytes | None], asyncio.Future[CallOutcome]], case: Case
) -> None:
    with capture_logs() as logs:
        outcome = await asyncio.wait_for(call(case.answer, case.poll_answer), timeout=30)
    assert isinstance(outcome, CallOutcome)
    assert (outcome.outcome is Outcome.SUCCESS) == case.genuine, describe(outcome)
    # Every case here is a known kind of bad answer, handled on purpose, not by the
    # last-resort boundary.
    assert [e for e in logs if e["event"] == "backend_unexpected_error"] == []


# The generator: the same ingredients, combined at random, each answer knowing whether
# it is genuine.

STATUSES = [200, 200, 201, 204, 202, 301, 302, 303, 307, 308, 400, 404, 409, 429, 500, 503, 999]
BODIES: list[tuple[bytes, bool]] = [  # (body, is it empty or a strict JSON object?)
    (b"", True),
    (OBJECT, True),
    (b"{}", True),
    (b'{"nested": {"deep": [1, 2, {"x": null}]}}', True),
    (b"[]", False),
    (b'"s"', False),
    (b"3.5", False),
    (b"NaN", False),
    (b'{"a": Infinity}', False),
    (b"{", False),
    (b"<html>", False),
    (b'{"k": "\xff"}', False),
    (nested(30_000), False),
    (b'{"a":' * 30_000 + b"0" + b"}" * 30_000, False),
    (b" " * (CAP + 1), False),
]
LOCATIONS = [
    b"/progress/1",
    b"progress/2",
    b"//127.0.0.1/x",
    b"http://[::1",
    b"http://127.0.0.1:70000/",
    b"ftp://127.0.0.1/",
    b"",
    b"   ",
    b"http://caf\xe9/",
    b"/" + b"y" * 3000,
    b"http://user:pw@127.0.0.1:1/",
]
ENCODINGS = ["none", "gzip", "deflate", "mislabeled", "unknown"]
FRAMINGS = ["length", "close", "chunked", "short", "bad-chunk", "junk-length"]


@dataclass(frozen=True)
class Random:
    answer: bytes
    status: int  # 0 for a status line that is none
    well_formed: bool  # framing, encoding and headers are all correct
    body: bytes  # before encoding and framing

    @property
    def confirms(self) -> bool:
        """A genuine 2xx (not 202) whose body is empty or a strict JSON object."""
        if not (self.well_formed and 200 <= self.status < 300 and self.status != 202):
            return False
        if self.status == 204 or not self.body:
            return True
        return len(self.body) <= CAP and (not self.body.strip() or _strict_object(self.body))

    @property
    def confirms_progress(self) -> bool:
        """A genuine 200 progress answer saying the background sync succeeded."""
        if not (self.well_formed and self.status == 200 and _strict_object(self.body)):
            return False
        body = json.loads(self.body)
        last = body.get("last_result")
        return (
            not body.get("in_progress") and isinstance(last, dict) and last.get("success") is True
        )


def _strict_object(raw: bytes) -> bool:
    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        return isinstance(json.loads(raw, parse_constant=refuse), dict) and len(raw) <= CAP
    except (ValueError, RecursionError):
        return False


def random_answer(rng: random.Random, *, for_poll: bool = False) -> Random:
    """One answer mixed from the ingredients above, with what it truly says."""
    well_formed = True
    if rng.random() < 0.08:  # a status line that is not one
        line = rng.choice([b"HTTP/1.1 OK", b"HTTP/1.1 20x Fine", b"HTTX/1.1 200 OK", b"\xff\xfe"])
        line += bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
        status, well_formed = 0, False
    else:
        status = 200 if for_poll and rng.random() < 0.6 else rng.choice(STATUSES)
        line = b"HTTP/1.1 %d Reason" % status
    body, _ = rng.choice(BODIES)
    if for_poll and rng.random() < 0.6:
        progress = {
            "in_progress": rng.random() < 0.3,
            "last_result": {"success": rng.random() < 0.7},
        }
        body = json.dumps(progress).encode()
    headers: list[bytes] = []
    redirecting = status in range(300, 400) or status == 202 or rng.random() < 0.1
    if redirecting and rng.random() < 0.85:
        headers.append(b"Location: " + rng.choice(LOCATIONS))
    if rng.random() < 0.2:
        headers.append(b"Retry-After: " + rng.choice([b"1", b"-5", b"soon", b"99999999999"]))
    if rng.random() < 0.1:
        headers.append(b"Set-Cookie: s=" + str(rng.randrange(10**6)).encode())
    if rng.random() < 0.04:
        headers.append(b"X-Huge: " + b"h" * 10_000)
        well_formed = False
    if rng.random() < 0.04:
        headers.append(rng.choice([b"no colon here", b"X-Nul: \x00", b": empty-name"]))
        well_formed = False
    no_body = status in (204, 304)
    encoding = rng.choice(ENCODINGS)
    wire = body
    if encoding == "gzip":
        wire = gzip.compress(body)
        headers.append(b"Content-Encoding: gzip")
    elif encoding == "deflate":
        wire = zlib.compress(body)
        headers.append(b"Content-Encoding: deflate")
    elif encoding == "mislabeled" and body:
        headers.append(rng.choice([b"Content-Encoding: gzip", b"Content-Encoding: deflate"]))
        well_formed = well_formed and no_body
    elif encoding == "unknown" and body:
        headers.append(b"Content-Encoding: x-rot13")
        well_formed = well_formed and no_body
    framing = rng.choice(FRAMINGS)
    payload = wire
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(wire))
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        cut = rng.randrange(len(wire) + 1)
        pieces = [p for p in (wire[:cut], wire[cut:]) if p]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif framing == "short":
        headers.append(b"Content-Length: %d" % (len(wire) + rng.randrange(1, 100)))
        well_formed = well_formed and no_body
    elif framing == "bad-chunk":
        headers.append(b"Transfer-Encoding: chunked")
        payload = b"%x\r\n%s\r\n" % (len(wire) + 7, wire)  # announces more than it sends
        well_formed = well_formed and no_body
    elif framing == "junk-length":
        headers.append(b"Content-Length: " + rng.choice([b"x1", b"1.5", b"-3", b"+2"]))
        well_formed = False
    if no_body and payload:  # a 204 or 304 has no content: bytes after it are garbage
        well_formed = False
    rng.shuffle(headers)
    answer = b"\r\n".join([line, *headers]) + b"\r\n\r\n" + payload
    return Random(answer, status, well_formed, b"" if no_body else body)


async def test_two_hundred_random_answers_never_confirm_a_sync_that_did_not_happen(
    call: Callable[[bytes, bytes | None], asyncio.Future[CallOutcome]],
) -> None:
    rng = random.Random(20261201)  # fixed: CI sees the same answers every run
    wrong: list[str] = []
    for index in range(200):
        start, poll = random_answer(rng), random_answer(rng, for_poll=True)
        outcome = await asyncio.wait_for(call(start.answer, poll.answer), timeout=30)
        assert isinstance(outcome, CallOutcome)
        via_progress = start.status == 202 and start.well_formed and poll.confirms_progress
        if outcome.outcome is Outcome.SUCCESS and not (start.confirms or via_progress):
            wrong.append(f"#{index}: {start.answer[:100]!r} -> {describe(outcome)}")
        if start.confirms and outcome.outcome is not Outcome.SUCCESS:  # and no false refusal
            wrong.append(f"#{index}: genuine {start.answer[:100]!r} -> {describe(outcome)}")
    assert wrong == [], "\n".join(wrong)
