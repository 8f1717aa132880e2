"""Acceptance tests of manage_background_sync.sh's own logic: usage, process management, demo.

The script derives its project root from its own location, so each test copies it into a temporary
directory whose `.venv/bin/background-sync` is a small Python stub. A stub is right here: the
subject under test is the shell script's process management (PID file, locking, signals, stale
PID detection, cleanup of the demo's background backend), not the daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
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
        prefixes = (
            *("SYNC_", "DEMO_", "STUB_", "FAKE_", "STOP_TIMEOUT", "START_WAIT_SECONDS", "LINES"),
            *("BACKGROUND_SYNC_", "WHEELHOUSE"),
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env["START_WAIT_SECONDS"] = "0.5"
        # Self-managed mode whatever the host: no systemd here, as far as the script can tell
        # (the systemd-mode tests below point these at directories of their own).
        env["BACKGROUND_SYNC_SYSTEMD_DIR"] = str(self.root / "no-systemd")
        env["BACKGROUND_SYNC_UNIT_FILE"] = str(self.root / "no-unit" / "background-sync.service")
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
    commands += ["logs-follow", "reload", "pause", "resume", "install", "uninstall", "wheelhouse"]
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


# ----------------------------------------------------------------------------- mode selection

# Stand-ins for systemd's tools: each call is appended to $FAKE_SYSTEMD_LOG; `systemctl show`
# answers from FAKE_<PROPERTY> (FAKE_ACTIVESTATE, FAKE_MAINPID, ...), the unit is active when
# FAKE_ACTIVESTATE says so, and FAKE_RC is the exit status of start/stop/restart/reload/kill.
FAKE_SYSTEMCTL = """#!/usr/bin/env bash
printf 'systemctl %s\\n' "$*" >>"$FAKE_SYSTEMD_LOG"
case $1 in
show)
    name=${2#--property=}
    var=FAKE_${name^^}
    printf '%s\\n' "${!var:-}"
    ;;
is-active)
    [[ ${FAKE_ACTIVESTATE:-inactive} == active || ${FAKE_ACTIVESTATE:-} == reloading ]]
    ;;
status)
    echo "* background-sync.service - fake ${FAKE_ACTIVESTATE:-inactive}"
    [[ ${FAKE_ACTIVESTATE:-inactive} == active ]] || exit 3
    ;;
*) exit "${FAKE_RC:-0}" ;;
esac
"""
FAKE_JOURNALCTL = """#!/usr/bin/env bash
printf 'journalctl %s\\n' "$*" >>"$FAKE_SYSTEMD_LOG"
echo '{"event": "daemon_ready", "level": "info"}'
"""
FAKE_SYSTEMD_RUN = """#!/usr/bin/env bash
printf 'systemd-run %s\\n' "$*" >>"$FAKE_SYSTEMD_LOG"
"""


@dataclass
class FakeSystemd:
    """systemd "running" (its runtime directory exists) with the unit installed, and fake tools."""

    sandbox: Sandbox
    runtime_dir: Path
    unit_file: Path
    bin_dir: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "BACKGROUND_SYNC_SYSTEMD_DIR": str(self.runtime_dir),
            "BACKGROUND_SYNC_UNIT_FILE": str(self.unit_file),
            "PATH": f"{self.bin_dir}:{os.environ['PATH']}",
            "FAKE_SYSTEMD_LOG": str(self.log),
            **extra,
        }

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run(*args, **self.env(**extra))

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def fake_systemd(sandbox: Sandbox) -> FakeSystemd:
    base = sandbox.root / "fake-systemd"
    runtime_dir = base / "run" / "systemd" / "system"
    runtime_dir.mkdir(parents=True)
    unit_file = base / "etc" / "background-sync.service"
    unit_file.parent.mkdir(parents=True)
    unit_file.write_text((PROJECT / "systemd" / "background-sync.service").read_text())
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("systemctl", FAKE_SYSTEMCTL),
        ("journalctl", FAKE_JOURNALCTL),
        ("systemd-run", FAKE_SYSTEMD_RUN),
    ):
        tool = bin_dir / name
        tool.write_text(text)
        tool.chmod(0o755)
    return FakeSystemd(sandbox, runtime_dir, unit_file, bin_dir, base / "calls.log")


def test_mode_is_self_managed_without_systemd(sandbox: Sandbox) -> None:
    result = sandbox.run("mode")
    assert result.returncode == 0, result
    assert result.stdout.startswith("self-managed (systemd is not running")


def test_mode_is_self_managed_when_the_unit_is_not_installed(fake_systemd: FakeSystemd) -> None:
    fake_systemd.unit_file.unlink()
    result = fake_systemd.run("mode")
    assert result.returncode == 0, result
    assert result.stdout.startswith("self-managed (")
    assert "is not installed: sudo ./manage_background_sync.sh install" in result.stdout


def test_mode_is_systemd_when_systemd_runs_and_the_unit_is_installed(
    fake_systemd: FakeSystemd,
) -> None:
    assert fake_systemd.run("mode").stdout.startswith("systemd (")
    forced = fake_systemd.run("--no-systemd", "mode")
    assert forced.stdout.startswith("self-managed (--no-systemd)")


def test_no_systemd_runs_the_daemon_itself_even_with_the_unit_installed(
    fake_systemd: FakeSystemd,
) -> None:
    sandbox = fake_systemd.sandbox
    started = fake_systemd.run("--no-systemd", "start")
    assert started.returncode == 0, started
    pid = sandbox.wait_ready()
    assert f"started background-sync (pid {pid})" in started.stdout
    status = fake_systemd.run("--no-systemd", "status")
    assert status.returncode == 0, status
    assert f"running (pid {pid}, up " in status.stdout
    assert fake_systemd.run("--no-systemd", "stop").returncode == 0
    assert _wait_gone(pid)
    assert not any(call.startswith("systemctl") for call in fake_systemd.calls())


# ----------------------------------------------------------------------------- systemd mode


def test_systemd_start_waits_in_systemctl_and_prints_the_status_line(
    fake_systemd: FakeSystemd,
) -> None:
    result = fake_systemd.run(
        "start", FAKE_MAINPID="4242", FAKE_STATUSTEXT="idle, next cycle in 300 s"
    )
    assert result.returncode == 0, result
    assert "systemctl start -- background-sync.service" in fake_systemd.calls()
    assert "started background-sync (pid 4242: idle, next cycle in 300 s)" in result.stdout
    assert not fake_systemd.sandbox.pidfile.exists()


def test_systemd_start_of_a_running_unit_changes_nothing(fake_systemd: FakeSystemd) -> None:
    result = fake_systemd.run("start", FAKE_ACTIVESTATE="active", FAKE_MAINPID="7")
    assert result.returncode == 0, result
    assert "already running (pid 7" in result.stdout
    assert not any(call.startswith("systemctl start") for call in fake_systemd.calls())


def test_systemd_start_failure_explains_the_exit_status(fake_systemd: FakeSystemd) -> None:
    result = fake_systemd.run(
        "start", FAKE_RC="1", FAKE_RESULT="exit-code", FAKE_EXECMAINSTATUS="78"
    )
    assert result.returncode == 1
    assert "exit status 78: a bad setting" in result.stderr
    assert '{"event": "daemon_ready"' in result.stderr  # the unit's journal since the start
    journal = [c for c in fake_systemd.calls() if c.startswith("journalctl")]
    assert journal and "-u background-sync.service -o cat" in journal[0]


@pytest.mark.parametrize(
    ("active", "sub", "expected"),
    [
        ("active", "running", 0),
        ("reloading", "reload", 0),
        ("inactive", "dead", 3),
        ("failed", "failed", 1),
        ("activating", "auto-restart", 1),
    ],
)
def test_systemd_status_maps_the_unit_state_to_lsb_codes(
    fake_systemd: FakeSystemd, active: str, sub: str, expected: int
) -> None:
    result = fake_systemd.run("status", FAKE_ACTIVESTATE=active, FAKE_SUBSTATE=sub)
    assert result.returncode == expected, result
    assert "systemctl status --no-pager -- background-sync.service" in fake_systemd.calls()
    assert "* background-sync.service - fake" in result.stdout


def test_systemd_stop(fake_systemd: FakeSystemd) -> None:
    idle = fake_systemd.run("stop", FAKE_ACTIVESTATE="inactive")
    assert idle.returncode == 0
    assert "not running (inactive)" in idle.stdout
    assert not any(call.startswith("systemctl stop") for call in fake_systemd.calls())

    running = fake_systemd.run("stop", FAKE_ACTIVESTATE="active")
    assert running.returncode == 0, running
    assert "systemctl stop -- background-sync.service" in fake_systemd.calls()
    assert "stopped background-sync in " in running.stdout


def test_systemd_logs_read_the_journal_as_json_lines(fake_systemd: FakeSystemd) -> None:
    result = fake_systemd.run("logs", LINES="5")
    assert result.returncode == 0, result
    assert result.stdout == '{"event": "daemon_ready", "level": "info"}\n'
    assert fake_systemd.calls() == ["journalctl -u background-sync.service -o cat --no-pager -n 5"]
    bad = fake_systemd.run("logs", LINES="many")
    assert bad.returncode == 1
    assert "LINES must be a whole number" in bad.stderr


def test_systemd_logs_on_a_terminal_print_the_short_form(fake_systemd: FakeSystemd) -> None:
    _real_cli(fake_systemd.sandbox)
    status, shown = _on_a_terminal(fake_systemd.sandbox, "logs", **fake_systemd.env(NO_COLOR="1"))
    assert status == 0, shown
    assert shown.split() == ["[info", "]", "daemon_ready"]
    assert fake_systemd.calls() == [
        "journalctl -u background-sync.service -o cat --no-pager -n 100"
    ]


def test_systemd_force_signals_the_main_process_only(fake_systemd: FakeSystemd) -> None:
    stopped = fake_systemd.run("force")
    assert stopped.returncode == 1
    assert "not running: nothing to force" in stopped.stderr

    forced = fake_systemd.run("force", FAKE_ACTIVESTATE="active", FAKE_MAINPID="99")
    assert forced.returncode == 0, forced
    calls = fake_systemd.calls()
    assert "systemctl kill --signal=USR1 --kill-who=main -- background-sync.service" in calls
    assert "sent SIGUSR1 to background-sync (pid 99" in forced.stdout


def test_systemd_reload_needs_a_running_unit(fake_systemd: FakeSystemd) -> None:
    result = fake_systemd.run("reload")
    assert result.returncode == 1
    assert "not running: nothing to reload" in result.stderr
    assert not any(call.startswith("systemctl reload") for call in fake_systemd.calls())


@pytest.mark.skipif(
    Path("/opt/background-sync/.venv/bin/python").exists(), reason="background-sync is installed"
)
def test_systemd_pause_needs_the_installed_service(fake_systemd: FakeSystemd) -> None:
    result = fake_systemd.run("pause")
    assert result.returncode == 1
    assert "/opt/background-sync/.venv/bin/python is missing" in result.stderr
    assert "sudo ./manage_background_sync.sh install" in result.stderr


def test_reload_is_refused_in_self_managed_mode(sandbox: Sandbox) -> None:
    result = sandbox.run("reload")
    assert result.returncode == 1
    assert "reload needs the systemd unit" in result.stderr


def test_lifecycle_commands_take_no_arguments(sandbox: Sandbox) -> None:
    result = sandbox.run("stop", "now")
    assert result.returncode == 2
    assert "stop takes no arguments" in result.stderr


# ----------------------------------------------------------------------------- install / uninstall


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["install", "--bogus"], "install: unknown argument: --bogus"),
        (["install", "--token-file"], "install: --token-file needs a PATH"),
        (["install", "--env-file="], "install: --env-file needs a PATH"),
        (["--no-systemd", "install"], "--no-systemd makes no sense"),
        (["uninstall", "--everything"], "uninstall: unknown argument: --everything"),
        (["wheelhouse"], "wheelhouse needs a DIR"),
    ],
)
def test_install_argument_errors_exit_2(sandbox: Sandbox, args: list[str], message: str) -> None:
    result = sandbox.run(*args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Usage:" in result.stderr


def test_install_refuses_without_systemd(sandbox: Sandbox) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    result = sandbox.run("install")
    assert result.returncode == 1
    assert "systemd is not running on this host" in result.stderr
    assert "manage_background_sync.sh start" in result.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_install_and_uninstall_need_root(command: str) -> None:
    if os.geteuid() != 0:
        as_user: list[str] = []
    else:  # drop to nobody; the script must be readable by it
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    home = Path(tempfile.mkdtemp(prefix="bs-manage-"))
    try:
        home.chmod(0o755)
        script = home / SCRIPT.name
        shutil.copy2(SCRIPT, script)
        script.chmod(0o755)
        result = subprocess.run(
            [*as_user, str(script), command],
            cwd="/",
            env={"PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        shutil.rmtree(home)
    assert result.returncode == 1, result
    assert f"{command} must run as root (sudo ./manage_background_sync.sh {command} ...)" in (
        result.stderr
    )


# ----------------------------------------------------------------------------- pause / resume


def _real_cli(sandbox: Sandbox) -> None:
    """Make the sandbox's `.venv/bin/background-sync` the project's real command line."""
    stub = sandbox.root / ".venv" / "bin" / "background-sync"
    stub.write_text(f'#!/bin/sh\ncd "{PROJECT}" && exec "{sys.executable}" -m daemon "$@"\n')
    stub.chmod(0o755)


def _paused(database: Path) -> tuple[bool, str | None]:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        paused, by = conn.execute("SELECT paused, updated_by FROM sync_control").fetchone()
    return bool(paused), by


def test_self_managed_pause_and_resume_flip_the_flag_in_the_database(sandbox: Sandbox) -> None:
    _real_cli(sandbox)
    database = sandbox.root / "var" / "background-sync.db"
    database.parent.mkdir(parents=True)
    migrate = subprocess.run(
        [sys.executable, "-m", "daemon", "migrate"],
        cwd=PROJECT,
        env=sandbox.env(SYNC_DATABASE_URL=f"sqlite:///{database}", SYNC_LOG_FORMAT="json"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert migrate.returncode == 0, migrate

    paused = sandbox.run("--no-systemd", "pause", timeout=60)  # the script's default database
    assert paused.returncode == 0, paused
    assert paused.stdout.startswith("paused: ")
    assert _paused(database)[0] is True
    assert (_paused(database)[1] or "").endswith(f"@{socket.gethostname()}")

    resumed = sandbox.run("resume", timeout=60)
    assert resumed.returncode == 0, resumed
    assert resumed.stdout.startswith("resumed: ")
    assert _paused(database)[0] is False


def test_a_failed_start_leaves_only_json_lines_in_the_log_file(sandbox: Sandbox) -> None:
    """The daemon's one stderr line goes to a file of its own and is shown; the log file
    gets the same reason as a record, so every line of it stays JSON."""
    _real_cli(sandbox)
    result = sandbox.run("start", START_WAIT_SECONDS="60", SYNC_INTERVAL_SECONDS="soon", timeout=90)
    assert result.returncode == 1, result
    assert "exited during startup (exit status 78)" in result.stderr
    assert "\nbackground-sync: SYNC_INTERVAL_SECONDS: " in result.stderr
    records = [json.loads(line) for line in sandbox.logfile.read_text().splitlines()]
    assert [(r["event"], r["exit_status"]) for r in records] == [("config_error", 78)]
    assert records[0]["error"].startswith("SYNC_INTERVAL_SECONDS: ")
    stderr_file = sandbox.logfile.with_name("background-sync.stderr")
    assert stderr_file.read_text().startswith("background-sync: SYNC_INTERVAL_SECONDS: ")
    assert not sandbox.pidfile.exists()


def _on_a_terminal(sandbox: Sandbox, *args: str, **extra: str) -> tuple[int, str]:
    """Run the script with its stdout on a pseudo-terminal; its status and what it printed."""
    import pty

    master, slave = pty.openpty()
    with subprocess.Popen(
        [str(sandbox.script), *args],
        cwd="/",
        env=sandbox.env(**extra),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
    ) as proc:
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        status = proc.wait(timeout=60)
    os.close(master)
    return status, b"".join(chunks).decode().replace("\r\n", "\n")


def test_logs_on_a_terminal_prints_the_short_form(sandbox: Sandbox) -> None:
    _real_cli(sandbox)
    run_id = "0123456789abcdef0123456789abcdef"
    record = {"run_id": run_id, "user_id": 7, "status": 200, "duration_ms": 12}
    record |= {"result": {"emails": 3}, "event": "user_synced", "level": "info"}
    record["timestamp"] = "2026-12-01T12:00:01.000001Z"
    sandbox.logfile.parent.mkdir(parents=True)
    sandbox.logfile.write_text(json.dumps(record) + "\nnot json at all\n")

    status, shown = _on_a_terminal(sandbox, "logs", NO_COLOR="1")
    assert status == 0, shown
    assert shown.splitlines() == [
        "2026-12-01 12:00:01 [info     ] user_synced                    "
        "user_id=7 status=200 duration_ms=12 run_id=01234567",
        "not json at all",
    ]
    # Not a terminal: the lines as they were written (test_logs).
    assert sandbox.run("logs").stdout == sandbox.logfile.read_text()


def test_self_managed_pause_without_the_daemons_tables_fails_clearly(sandbox: Sandbox) -> None:
    _real_cli(sandbox)
    result = sandbox.run("pause", timeout=60)
    assert result.returncode == 1
    # no database file at all: refused, and none is created
    assert "SYNC_DATABASE_URL: no database file at" in result.stderr
    assert "run `background-sync migrate`" in result.stderr
    assert "'background-sync pause' failed (exit status 78)" in result.stderr


# ----------------------------------------------------------------------------- systemd/ files


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_passes_verify_and_its_exposure_is_at_most_1_5() -> None:
    result = subprocess.run(
        [str(PROJECT / "systemd" / "check-unit.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: clean" in result.stdout
    assert re.search(r"security: exposure \d+\.\d+ <= 1\.5: OK", result.stdout), result.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_the_scripts_are_shellcheck_clean() -> None:
    scripts = [SCRIPT, PROJECT / "systemd" / "check-unit.sh"]
    result = subprocess.run(
        ["shellcheck", *map(str, scripts)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout


def test_the_env_example_lists_every_setting_with_a_valid_default(tmp_path: Path) -> None:
    example = (PROJECT / "systemd" / "background-sync.env.example").read_text()
    reference = (PROJECT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(SYNC_[A-Z_]+)`", reference, re.M))
    listed = set(re.findall(r"^#(SYNC_[A-Z_]+)=", example, re.M))
    assert documented and listed == documented
    assert not re.search(r"^SYNC_", example, re.M), "every setting stays commented out"
    assert "TOKEN=" not in example.replace("SYNC_BACKEND_TOKEN_FILE=", "")

    # Every line uncommented, as an operator might: the values shown are valid.
    uncommented = tmp_path / "all.env"
    uncommented.write_text(re.sub(r"^#(SYNC_)", r"\1", example, flags=re.M))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNC_", "CREDENTIALS_"))}
    result = subprocess.run(
        # Offline: the example's database is not this machine's.
        [
            sys.executable,
            "-m",
            "daemon",
            "check-config",
            "--offline",
            "--env-file",
            str(uncommented),
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["concurrency"] == 16
