"""Acceptance tests of manage_background_sync.sh's own logic: usage, process management, demo.

The script derives its project root from its own location, so each test copies it into a temporary
directory whose `.venv/bin/background-sync` is a small Python stub. A stub is right here: the
subject under test is the shell script's process management (PID file, locking, signals, stale
PID detection, cleanup of the demo's background backend), not the daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
SCRIPT = PROJECT / "manage_background_sync.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("setsid") is None or not Path("/proc").is_dir(),
    reason="needs bash, setsid and /proc (Linux)",
)

# The fake `background-sync` command. Every process records its PID and subcommand in
# $ROOT/stub-pids so the fixture can kill whatever is left over (`run` once its handlers are set).
STUB = """#!{python}
import http.server, os, pathlib, signal, sys, time

root = pathlib.Path(__file__).resolve().parents[2]
cmd = sys.argv[1] if len(sys.argv) > 1 else ""
mode = os.environ.get("STUB_MODE", "")


def record():
    (root / "stub-pids").mkdir(exist_ok=True)
    (root / "stub-pids" / str(os.getpid())).write_text(cmd)


if cmd != "run":
    record()


def say(message):
    print(message, flush=True)


def leave(*_):
    say(f"stub {{cmd}}: stopping")
    sys.exit(0)


if cmd == "run":
    if mode == "die":
        say("stub run: fatal: bad configuration")
        sys.exit(3)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    signal.signal(signal.SIGUSR1, lambda *_: say("stub run: forced cycle"))
    say(
        "stub run: started db=" + os.environ.get("SYNC_DATABASE_URL", "")
        + " format=" + os.environ.get("SYNC_LOG_FORMAT", "")
        + " backend=" + os.environ.get("SYNC_BACKEND_URL", "")
    )
    record()  # only now, so that the tests know the signal handlers are in place
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
elif cmd == "reference-backend":
    if mode == "backend-dies":
        say("stub reference-backend: cannot bind")
        sys.exit(1)
    port = int(sys.argv[sys.argv.index("--port") + 1])
    signal.signal(signal.SIGTERM, leave)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    server.timeout = 0.2
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        server.handle_request()
elif cmd == "once":
    say("stub once: backend=" + os.environ.get("SYNC_BACKEND_URL", ""))
    sys.exit(int(os.environ.get("STUB_ONCE_STATUS", "0")))
elif cmd in ("migrate", "seed-demo", "status"):
    say("stub " + " ".join(sys.argv[1:]) + ": ok")
else:
    say("stub: unknown command " + cmd)
    sys.exit(2)
"""

# `.venv/bin/python`: runs the real interpreter, but pip must never run in these tests.
VENV_PYTHON = """#!/usr/bin/env bash
if [ "${{1:-}}" = "-m" ] && [ "${{2:-}}" = "pip" ]; then
    echo "stub python: pip must not run here" >&2
    exit 97
fi
exec {python} "$@"
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


@dataclass
class Sandbox:
    root: Path
    extra_pids: list[int] = field(default_factory=list)

    @property
    def script(self) -> Path:
        return self.root / "manage_background_sync.sh"

    @property
    def pidfile(self) -> Path:
        return self.root / "var" / "run" / "background-sync.pid"

    @property
    def logfile(self) -> Path:
        return self.root / "var" / "log" / "background-sync.log"

    def env(self, **extra: str) -> dict[str, str]:
        prefixes = ("SYNC_", "DEMO_", "STUB_", "STOP_TIMEOUT", "START_WAIT_SECONDS", "LINES")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env["START_WAIT_SECONDS"] = "0.5"
        env.update(extra)
        return env

    def run(
        self, *args: str, timeout: float = 30, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.script), *args],
            cwd="/",
            env=self.env(**extra),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stub_pids(self, command: str | None = None) -> list[int]:
        directory = self.root / "stub-pids"
        if not directory.is_dir():
            return []
        return [
            int(p.name) for p in directory.iterdir() if command is None or p.read_text() == command
        ]

    def daemon_pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def wait_ready(self, timeout: float = 15.0) -> int:
        """Wait until the started stub daemon has its signal handlers in place; return its PID."""
        pid = self.daemon_pid()
        deadline = time.monotonic() + timeout
        while pid not in self.stub_pids("run") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid in self.stub_pids("run"), "the stub daemon never got ready"
        return pid

    def kill_everything(self) -> None:
        for pid in [*self.stub_pids(), *self.extra_pids]:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def _stamp(*files: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    root = tmp_path / "project"
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(SCRIPT, root / SCRIPT.name)
    for name in ("requirements.txt", "pyproject.toml", "requirements-dev.txt"):
        (root / name).write_text(f"# {name} of the sandbox\n")
    stub = bin_dir / "background-sync"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    venv_python = bin_dir / "python"
    venv_python.write_text(VENV_PYTHON.format(python=sys.executable))
    venv_python.chmod(0o755)
    # Stamps as `setup` writes them: nothing to install.
    (root / ".venv" / ".background-sync-setup.sha256").write_text(
        _stamp(root / "requirements.txt", root / "pyproject.toml") + "\n"
    )
    box = Sandbox(root)
    try:
        yield box
    finally:
        box.kill_everything()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- usage


def test_unknown_command_prints_usage_on_stderr_and_exits_2(sandbox: Sandbox) -> None:
    result = sandbox.run("frobnicate")
    assert result.returncode == 2
    assert "unknown command: frobnicate" in result.stderr
    assert "Usage:" in result.stderr
    assert result.stdout == ""


def test_missing_command_exits_2(sandbox: Sandbox) -> None:
    result = sandbox.run()
    assert result.returncode == 2
    assert "Usage:" in result.stderr


def test_help_lists_every_command(sandbox: Sandbox) -> None:
    result = sandbox.run("help")
    assert result.returncode == 0
    commands = ["setup", "test", "demo", "start", "stop", "restart", "status", "logs", "force"]
    commands.append("logs-follow")
    for command in commands:
        assert f"\n  {command} " in result.stdout


# ----------------------------------------------------------------------------- lifecycle


def test_status_is_3_when_nothing_runs(sandbox: Sandbox) -> None:
    result = sandbox.run("--no-systemd", "status")
    assert result.returncode == 3, result
    assert "stopped" in result.stdout


def test_start_status_stop_cycle(sandbox: Sandbox) -> None:
    started = sandbox.run("start")
    assert started.returncode == 0, started
    pid = sandbox.wait_ready()
    assert f"pid {pid}" in started.stdout
    assert _alive(pid)
    # Detached: its own session and process group.
    assert os.getsid(pid) == pid
    assert os.getpgid(pid) == pid

    status = sandbox.run("status")
    assert status.returncode == 0, status
    assert f"running (pid {pid}, up " in status.stdout
    assert "stub status: ok" in status.stdout  # the daemon's own status, best effort

    log = sandbox.logfile.read_text()
    expected_db = f"db=sqlite:///{sandbox.root}/var/background-sync.db"
    assert expected_db in log
    assert "format=json" in log

    again = sandbox.run("start")
    assert again.returncode == 0
    assert "already running" in again.stdout
    assert sandbox.daemon_pid() == pid

    stopped = sandbox.run("stop")
    assert stopped.returncode == 0, stopped
    assert f"stopped background-sync (pid {pid}) in " in stopped.stdout
    assert _wait_gone(pid)
    assert not sandbox.pidfile.exists()
    assert "stub run: stopping" in sandbox.logfile.read_text()

    assert sandbox.run("status").returncode == 3
    second_stop = sandbox.run("stop")
    assert second_stop.returncode == 0
    assert "not running" in second_stop.stdout


def test_restart_replaces_the_daemon(sandbox: Sandbox) -> None:
    assert sandbox.run("start").returncode == 0
    first = sandbox.daemon_pid()
    restarted = sandbox.run("restart")
    assert restarted.returncode == 0, restarted
    second = sandbox.daemon_pid()
    assert second != first
    assert _wait_gone(first)
    assert _alive(second)


def test_stale_pid_file_of_a_foreign_process_is_not_ours(sandbox: Sandbox) -> None:
    with subprocess.Popen(["sleep", "300"]) as sleeper:
        try:
            sandbox.pidfile.parent.mkdir(parents=True)
            sandbox.pidfile.write_text(f"{sleeper.pid}\n")

            status = sandbox.run("status")
            assert status.returncode == 1, status
            assert "dead but its PID file exists" in status.stdout
            assert sandbox.run("force").returncode == 1

            stopped = sandbox.run("stop")
            assert stopped.returncode == 0, stopped
            assert "stale PID file" in stopped.stdout
            assert "not running" in stopped.stdout
            assert not sandbox.pidfile.exists()
            assert sleeper.poll() is None, "stop must not signal a process that is not ours"

            sandbox.pidfile.write_text(f"{sleeper.pid}\n")
            started = sandbox.run("start")
            assert started.returncode == 0, started
            assert "stale PID file" in started.stdout
            assert sandbox.daemon_pid() != sleeper.pid
            assert sleeper.poll() is None
        finally:
            sleeper.kill()


def test_pid_file_of_a_dead_process_is_stale(sandbox: Sandbox) -> None:
    with subprocess.Popen(["true"]) as gone:
        gone.wait()
    sandbox.pidfile.parent.mkdir(parents=True)
    sandbox.pidfile.write_text(f"{gone.pid}\n")
    assert sandbox.run("status").returncode == 1
    assert sandbox.run("stop").returncode == 0
    assert not sandbox.pidfile.exists()
    assert sandbox.run("status").returncode == 3


def test_stop_kills_a_daemon_that_ignores_sigterm(sandbox: Sandbox) -> None:
    assert sandbox.run("start", STUB_MODE="ignore-term").returncode == 0
    pid = sandbox.wait_ready()
    began = time.monotonic()
    stopped = sandbox.run("stop", STOP_TIMEOUT="2")
    took = time.monotonic() - began
    assert stopped.returncode == 0, stopped
    assert "SIGKILL" in stopped.stderr
    assert 2 <= took < 10
    assert _wait_gone(pid)
    assert not sandbox.pidfile.exists()
    assert sandbox.run("status").returncode == 3


def test_start_without_setup_says_so(sandbox: Sandbox) -> None:
    (sandbox.root / ".venv" / "bin" / "background-sync").unlink()
    result = sandbox.run("start")
    assert result.returncode == 1
    assert "run ./manage_background_sync.sh setup first" in result.stderr
    assert not sandbox.pidfile.exists()


def test_start_reports_a_daemon_that_dies(sandbox: Sandbox) -> None:
    result = sandbox.run("start", STUB_MODE="die", START_WAIT_SECONDS="10")
    assert result.returncode == 1
    assert "exited during startup" in result.stderr
    assert "fatal: bad configuration" in result.stderr
    assert not sandbox.pidfile.exists()
    assert sandbox.run("status").returncode == 3


def test_concurrent_starts_run_one_daemon(sandbox: Sandbox) -> None:
    procs = [
        subprocess.Popen(
            [str(sandbox.script), "start"],
            env=sandbox.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        with proc:
            out, err = proc.communicate(timeout=30)
            outputs.append(out)
            assert proc.returncode == 0, err
    assert sum("started background-sync" in out for out in outputs) == 1
    running = [pid for pid in sandbox.stub_pids("run") if _alive(pid)]
    assert running == [sandbox.daemon_pid()]


def test_force_sends_sigusr1(sandbox: Sandbox) -> None:
    not_running = sandbox.run("force")
    assert not_running.returncode == 1
    assert "not running" in not_running.stderr

    assert sandbox.run("start").returncode == 0
    sandbox.wait_ready()
    forced = sandbox.run("force")
    assert forced.returncode == 0, forced
    deadline = time.monotonic() + 5
    while "forced cycle" not in sandbox.logfile.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "stub run: forced cycle" in sandbox.logfile.read_text()


def test_logs(sandbox: Sandbox) -> None:
    missing = sandbox.run("logs")
    assert missing.returncode == 1
    assert "no log yet" in missing.stderr

    sandbox.logfile.parent.mkdir(parents=True)
    sandbox.logfile.write_text("".join(f"line {i}\n" for i in range(200)))
    assert sandbox.run("logs").stdout.splitlines() == [f"line {i}" for i in range(100, 200)]
    last3 = sandbox.run("logs", LINES="3").stdout.splitlines()
    assert last3 == ["line 197", "line 198", "line 199"]


def test_works_through_a_symlink_from_any_directory(sandbox: Sandbox, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = elsewhere / "manage"
    link.symlink_to(sandbox.script)
    result = subprocess.run(
        [str(link), "logs"],
        cwd=elsewhere,
        env=sandbox.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert str(sandbox.root / "var" / "log" / "background-sync.log") in result.stderr


# ----------------------------------------------------------------------------- setup


def test_setup_skips_pip_when_the_stamp_matches(sandbox: Sandbox) -> None:
    result = sandbox.run("setup")
    assert result.returncode == 0, result
    assert "up to date" in result.stdout


def test_setup_rejects_an_old_python(sandbox: Sandbox, tmp_path: Path) -> None:
    shutil.rmtree(sandbox.root / ".venv")
    old_python = tmp_path / "python3.9"
    old_python.write_text("#!/bin/sh\necho 3.9\n")
    old_python.chmod(0o755)
    result = sandbox.run("setup", PYTHON=str(old_python))
    assert result.returncode == 1
    assert "Python 3.9" in result.stderr
    assert ">= 3.11" in result.stderr
    assert not (sandbox.root / ".venv").exists()


# ----------------------------------------------------------------------------- demo


def _start_demo(sandbox: Sandbox, port: int, **extra: str) -> subprocess.Popen[str]:
    env = sandbox.env(DEMO_BACKEND_PORT=str(port), **extra)
    return subprocess.Popen(
        [str(sandbox.script), "demo"],
        cwd="/",
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # like `setsid`: the demo leads its own process group
    )


def _wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_backend_and_daemon_on_signal(sandbox: Sandbox, sig: signal.Signals) -> None:
    port = _free_port()
    with _start_demo(sandbox, port) as demo:
        try:
            assert _wait_for(lambda: sandbox.stub_pids("run")), "the daemon never started"
            backend = sandbox.stub_pids("reference-backend")
            daemon = sandbox.stub_pids("run")
            assert len(backend) == 1 and len(daemon) == 1
            os.killpg(demo.pid, sig)
            out, _ = demo.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 128 + sig, out
    assert "stopped the reference backend" in out
    assert f"backend=http://127.0.0.1:{port}/api/v1/sync/start" in out
    assert _wait_gone(backend[0]), "orphaned reference backend"
    assert _wait_gone(daemon[0])
    with pytest.raises(ProcessLookupError):
        os.killpg(demo.pid, 0)  # nothing left in the demo's process group


def test_demo_once_exits_with_the_cycle_status_and_stops_the_backend(sandbox: Sandbox) -> None:
    port = _free_port()
    with _start_demo(sandbox, port, DEMO_ONCE="1", STUB_ONCE_STATUS="4", DEMO_USERS="7") as demo:
        try:
            out, _ = demo.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 4, out
    assert "stub migrate: ok" in out
    assert "stub seed-demo --users 7: ok" in out
    assert f"stub once: backend=http://127.0.0.1:{port}/api/v1/sync/start" in out
    assert "stopped the reference backend" in out
    backend = sandbox.stub_pids("reference-backend")
    assert len(backend) == 1
    assert _wait_gone(backend[0])
    assert (sandbox.root / "var" / "log" / "reference-backend.log").exists()


def test_demo_fails_clearly_when_the_backend_dies(sandbox: Sandbox) -> None:
    result = sandbox.run(
        "demo", DEMO_ONCE="1", DEMO_BACKEND_PORT=str(_free_port()), STUB_MODE="backend-dies"
    )
    assert result.returncode == 1
    assert "reference backend exited" in result.stderr
    assert "cannot bind" in result.stderr
    assert not sandbox.stub_pids("once")
