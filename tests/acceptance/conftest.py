"""Shared fixtures for the process-level acceptance tests of the daemon.

Everything here is real: the daemon runs as a subprocess (`python -m daemon run`), signals
are sent with os.kill, the NOTIFY_SOCKET is a unix datagram socket the test binds, the
database is an SQLite file prepared with `python -m daemon migrate` and `seed-demo`, and
the reference backend is an aiohttp server on 127.0.0.1 (in a thread with its own loop).

Fixtures only (nothing autouse), so test_manage_script.py in this directory is unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from daemon.reference_backend import Faults, start_server
from tests.waiting import POLL_SECONDS, WAIT_SECONDS, wait_until

T = TypeVar("T")

# Variables that would change what the daemon does if the test runner's environment had them.
_SCRUBBED_PREFIXES = ("SYNC_",)
_SCRUBBED = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY"}
    | {"STATE_DIRECTORY", "LISTEN_FDS", "LISTEN_PID", "PYTHONWARNINGS"}
)


# -- processes ----------------------------------------------------------------------------


@dataclass
class Line:
    at: float  # time.monotonic() when the test read it
    text: str
    event: dict[str, Any] | None  # the parsed JSON object, if the line is one


class Proc:
    """A subprocess whose stdout and stderr are read line by line in background threads."""

    def __init__(self, name: str, args: list[str], *, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.args = args
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            # Its own session: a Ctrl-C at the test runner's terminal never reaches it.
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.stdout: list[Line] = []
        self.stderr: list[Line] = []
        self.exited_at: float | None = None
        self._lock = threading.Lock()
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.popen.stdout, self.stdout), daemon=True, name=name
            ),
            threading.Thread(
                target=self._read, args=(self.popen.stderr, self.stderr), daemon=True, name=name
            ),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, into: list[Line]) -> None:
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under us at teardown
            for raw in stream:
                text = raw.rstrip("\n")
                event = None
                if text.startswith("{"):
                    with contextlib.suppress(ValueError):
                        parsed = json.loads(text)
                        event = parsed if isinstance(parsed, dict) else None
                with self._lock:
                    into.append(Line(time.monotonic(), text, event))

    # -- what it printed --

    def lines(self, stream: str = "stdout") -> list[Line]:
        with self._lock:
            return list(self.stdout if stream == "stdout" else self.stderr)

    def events(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Parsed stdout objects, optionally only those with this event name and fields."""
        found = []
        for line in self.lines():
            event = line.event
            if event is None or (name is not None and event.get("event") != name):
                continue
            if all(event.get(k) == v for k, v in fields.items()):
                found.append({**event, "_at": line.at})
        return found

    def wait_for_event(
        self,
        name: str,
        *,
        count: int = 1,
        timeout: float = WAIT_SECONDS,
        **fields: Any,
    ) -> dict[str, Any]:
        """The `count`-th event with this name (and fields); fails at the deadline or exit."""

        def probe() -> dict[str, Any] | None:
            found = self.events(name, **fields)
            if len(found) >= count:
                return found[count - 1]
            if self.popen.poll() is not None:
                self._join_readers()
                found = self.events(name, **fields)
                if len(found) >= count:
                    return found[count - 1]
                pytest.fail(
                    f"{self.name} exited with {self.popen.returncode} before logging "
                    f"{name} {fields or ''} (#{count})\n{self.tail()}"
                )
            return None

        return wait_until(probe, timeout=timeout, what=f"{self.name}: {name}", describe=self.tail)

    def tail(self, count: int = 40) -> str:
        out = [f"  out| {line.text}" for line in self.lines("stdout")[-count:]]
        err = [f"  err| {line.text}" for line in self.lines("stderr")[-count:]]
        return "\n".join([f"--- {self.name} (pid {self.pid}) ---", *out, *err])

    def all_text(self) -> str:
        return "\n".join(line.text for line in self.lines("stdout") + self.lines("stderr"))

    # -- its life --

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, number: int) -> float:
        """Send a signal; return when it was sent (monotonic)."""
        assert self.alive, f"{self.name} is not running\n{self.tail()}"
        os.kill(self.pid, number)
        return time.monotonic()

    def wait_exit(self, timeout: float = WAIT_SECONDS) -> int:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() >= deadline:
                pytest.fail(f"{self.name} still running after {timeout:g}s\n{self.tail()}")
            time.sleep(POLL_SECONDS)
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        self._join_readers()
        return self.popen.returncode

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(timeout=5)

    def kill(self) -> None:
        """Finalizer: SIGKILL if still alive, reap it, close its pipes."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._join_readers()
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# -- the NOTIFY_SOCKET ----------------------------------------------------------------------


@dataclass
class Datagram:
    at: float
    text: str
    fields: list[tuple[str, str]]

    def get(self, key: str) -> str | None:
        for k, v in self.fields:
            if k == key:
                return v
        return None


class NotifySocket:
    """A unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.datagrams: list[Datagram] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True, name="notify-socket")
        self._reader.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode("utf-8", errors="replace")
            fields = [
                (key, value)
                for key, _, value in (line.partition("=") for line in text.split("\n") if line)
            ]
            with self._lock:
                self.datagrams.append(Datagram(time.monotonic(), text, fields))

    def messages(self, key: str | None = None, since: float = 0.0) -> list[Datagram]:
        with self._lock:
            found = list(self.datagrams)
        return [d for d in found if d.at >= since and (key is None or d.get(key) is not None)]

    def values(self, key: str, since: float = 0.0) -> list[str]:
        return [v for d in self.messages(key, since) if (v := d.get(key)) is not None]

    def wait_for(
        self,
        key: str,
        value: str | None = None,
        *,
        since: float = 0.0,
        timeout: float = WAIT_SECONDS,
        describe: Callable[[], str] | None = None,
    ) -> Datagram:
        def probe() -> Datagram | None:
            for datagram in self.messages(key, since):
                if value is None or datagram.get(key) == value:
                    return datagram
            return None

        return wait_until(
            probe,
            timeout=timeout,
            what=f"{key}={value or '*'} on NOTIFY_SOCKET",
            describe=describe or self.dump,
        )

    def dump(self) -> str:
        rows = [f"  {d.at:.2f} {d.text!r}" for d in self.messages()]
        return "\n".join(["--- NOTIFY_SOCKET datagrams ---", *rows[-40:]])

    def close(self) -> None:
        self._closing.set()
        self._reader.join(timeout=5)
        self.sock.close()


# -- the reference backend -------------------------------------------------------------------


class Backend:
    """The bundled reference backend: a real aiohttp server on 127.0.0.1, ephemeral port.

    It runs in a thread of the test process with its own event loop (started with
    `daemon.reference_backend.start_server`), which starts in milliseconds where a
    subprocess would cost an interpreter start-up per test. The tests talk to it only
    over HTTP, as the daemon does.
    """

    def __init__(self, faults: Faults, token: str | None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="reference-backend"
        )
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            start_server("127.0.0.1", 0, faults=faults, token=token), self._loop
        )
        self._runner, self.port = started.result(timeout=10)
        self._closed = False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sync_url(self) -> str:
        return f"{self.base}/api/v1/sync/start"

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/_control/stats")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        return self._request("PUT", "/_control/faults", faults)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shut_down() -> None:
            await self._runner.cleanup()  # ends hanging handlers, closes every connection
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shut_down(), self._loop).result(timeout=15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()


# -- the database ------------------------------------------------------------------------------


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as conn:
            return conn.execute(sql, params).fetchall()

    def last_sync(self) -> dict[int, str | None]:
        return dict(self.query("SELECT id, last_sync FROM users ORDER BY id"))

    def synced_ids(self) -> set[int]:
        return {uid for uid, when in self.last_sync().items() if when is not None}

    def held_leases(self) -> list[tuple[Any, ...]]:
        return self.query(
            "SELECT user_key, lease_owner, lease_expires_at FROM sync_user_state"
            " WHERE lease_owner IS NOT NULL"
        )


class _Templates:
    """Databases prepared once per session with the real CLI, copied into each test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple[int, bool], Path] = {}
        self._lock = threading.Lock()

    def get(self, users: int, migrated: bool) -> Path:
        with self._lock:
            key = (users, migrated)
            if key not in self._made:
                path = self.root / f"users{users}-{'migrated' if migrated else 'bare'}.db"
                env = base_env()
                env["SYNC_DATABASE_URL"] = f"sqlite:///{path}"
                commands = [["migrate"]] if migrated else []
                if users:
                    commands.append(["seed-demo", "--users", str(users)])
                for command in commands:
                    run_cli(command, env=env, cwd=self.root, check=True)
                self._made[key] = path
            return self._made[key]


def base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(
    args: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    timeout: float = 60,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`python -m daemon ARGS` to completion (killed by subprocess.run on timeout)."""
    done = subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        pytest.fail(
            f"`daemon {' '.join(args)}` exited {done.returncode}\n{done.stdout}{done.stderr}"
        )
    return done


def json_lines(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict):
                events.append(parsed)
    return events


@pytest.fixture(scope="session")
def _database_templates(tmp_path_factory: pytest.TempPathFactory) -> _Templates:
    return _Templates(tmp_path_factory.mktemp("db-templates"))


# -- the harness -------------------------------------------------------------------------------


@dataclass
class Harness:
    """One test's world: a directory, a database, a notify socket and the processes."""

    tmp: Path
    notify: NotifySocket
    templates: _Templates
    procs: list[Proc] = field(default_factory=list)
    backends: list[Backend] = field(default_factory=list)
    db: Database | None = None

    def database(self, users: int, *, migrated: bool = True, name: str = "sync.db") -> Database:
        """A copy of a database prepared with `migrate` and `seed-demo --users N`."""
        path = self.tmp / name
        template = self.templates.get(users, migrated)
        shutil.copyfile(template, path)
        wal = Path(f"{template}-wal")  # normally checkpointed away when the CLI exits
        if wal.exists():
            shutil.copyfile(wal, Path(f"{path}-wal"))
        database = Database(path)
        if self.db is None:
            self.db = database
        return database

    def env(self, backend: Backend | None = None, **settings: Any) -> dict[str, str]:
        """The daemon's environment: the runner's, scrubbed, plus SYNC_* for this test.

        A value of None removes the variable.
        """
        env = base_env()
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        env["SYNC_DATABASE_URL"] = self.db.url if self.db else f"sqlite:///{self.tmp}/sync.db"
        env["SYNC_STATUS_ADDRESS"] = "127.0.0.1:0"
        env["SYNC_LOG_FORMAT"] = "json"
        env["SYNC_RETRY_DELAY_SECONDS"] = "0.05"
        env["SYNC_JITTER_SECONDS"] = "0"  # no random delay before start-up and scheduled cycles
        if backend is not None:
            env["SYNC_BACKEND_URL"] = backend.sync_url
        for key, value in settings.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def start_backend(
        self, *, latency_ms: float = 20, token: str | None = None, **faults: Any
    ) -> Backend:
        """A reference backend with these fault switches (the fields of `Faults`)."""
        backend = Backend(Faults(latency_ms=latency_ms, **faults), token)
        self.backends.append(backend)
        return backend

    def start_daemon(self, env: dict[str, str], *args: str) -> Proc:
        proc = Proc("daemon", [sys.executable, "-m", "daemon", "run", *args], env=env, cwd=self.tmp)
        self.procs.append(proc)
        return proc

    def cli(
        self, *args: str, env: dict[str, str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), env=env, cwd=self.tmp, timeout=timeout)

    def status_url(self, daemon: Proc) -> str:
        event = daemon.wait_for_event("status_server_started")
        return f"http://{event['address']}"

    def status(self, daemon: Proc) -> dict[str, Any]:
        with urllib.request.urlopen(self.status_url(daemon) + "/status", timeout=5) as response:
            return json.loads(response.read())

    def wait_no_cycle(self, daemon: Proc) -> None:
        """Until the daemon's /status says no cycle task exists (so SIGUSR1 starts one)."""
        wait_until(
            lambda: self.status(daemon)["cycle"] is None,
            what="the daemon to have no cycle running",
            describe=daemon.tail,
        )

    def describe(self) -> str:
        return "\n".join([*(p.tail() for p in self.procs), self.notify.dump()])

    def cleanup(self) -> None:
        try:
            for proc in self.procs:
                proc.kill()
        finally:
            for backend in self.backends:
                backend.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    short_dir: str | None = None
    if len(str(path)) > 100:  # sun_path is 108 bytes
        short_dir = tempfile.mkdtemp(prefix="bs-notify-")
        path = Path(short_dir) / "notify.sock"
    notify = NotifySocket(path)
    try:
        yield notify
    finally:
        notify.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)


@pytest.fixture
def harness(
    tmp_path: Path, notify_socket: NotifySocket, _database_templates: _Templates
) -> Iterator[Harness]:
    world = Harness(tmp_path, notify_socket, _database_templates)
    try:
        yield world
    finally:
        world.cleanup()
