"""A real systemd as PID 1, on a root filesystem of its own, for the systemd tests.

`box.sh` beside this file does the booting: private pid, mount, uts, ipc, net and cgroup
namespaces, an overlay over a cached Debian bookworm tree (made once with debootstrap, under
/var/tmp/background-sync-systemd-box, keyed by its package list), pivot_root into it with the
host's root detached, then /lib/systemd/systemd as PID 1. The cached tree is never written:
each session's changes go to the overlay's upper layer, removed at the end.

This module builds on it, once per session:

- `box`: a booted box. The project's wheels (requirements.txt, cached by its hash, plus a
  wheel of this checkout) are bound read-only at /wheelhouse, a copy of this checkout at
  /mnt/background-sync-src. Teardown powers the box off and checks that nothing is left:
  no process of the box, no mount, no cgroup, the host's /tmp intact.
- `installed`: background-sync installed in the box the way an operator does it
  (`WHEELHOUSE=/wheelhouse ./manage_background_sync.sh install --token-file /tmp/token`),
  the reference backend running as the transient unit `refbackend` (requiring the same
  token), and 200 demo users seeded with the service's own identity and environment.
- `service` (per test): the unit stopped and reset, the env file and the test drop-in
  restored, the backend's faults reset, and a journal cursor so a test sees its own lines.

The tests skip only when this machine cannot create the namespaces at all (`box.sh check`:
not root, no cgroup2, no overlay, unshare refused). Any later failure is a test failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.waiting import wait_until

T = TypeVar("T")

PROJECT = Path(__file__).resolve().parents[2]
BOX_SH = Path(__file__).resolve().with_name("box.sh")
BOX_DIR = Path(os.environ.get("BACKGROUND_SYNC_BOX_DIR", "/var/tmp/background-sync-systemd-box"))

# Where things are inside the box.
SRC_RO = "/mnt/background-sync-src"  # the bind of this checkout's copy (read-only)
SRC = "/root/background-sync"  # the operator's working copy, made from SRC_RO
WHEELHOUSE = "/wheelhouse"
TOKEN_FILE = "/tmp/token"
UNIT = "background-sync.service"
VENV = "/opt/background-sync/.venv"
ENV_FILE = "/etc/background-sync/background-sync.env"
DROPIN_DIR = "/etc/systemd/system/background-sync.service.d"
DROPIN = f"{DROPIN_DIR}/test.conf"
BACKEND = "http://127.0.0.1:8000"
BACKEND_LATENCY_MS = 200
USERS = 200

# Test-only unit settings: a watchdog that fires in seconds, quick restarts.
TEST_DROPIN = """\
# tests/systemd: fast watchdog and restarts
[Service]
WatchdogSec=3
RestartSec=1
"""
# Test-only daemon settings, appended to the installed env file. Every user is due in
# every cycle (stale after 0 s); one cycle at start, then the next a minute later.
TEST_ENV = {
    "SYNC_INTERVAL_SECONDS": "60",
    "SYNC_JITTER_SECONDS": "0",
    "SYNC_STALE_AFTER_SECONDS": "0",
    "SYNC_RETRY_DELAY_SECONDS": "0.2",
    "SYNC_SHUTDOWN_GRACE_SECONDS": "10",
}


def say(message: str) -> None:
    """A line for the person running the tests (`pytest -s` shows it)."""
    print(f"[systemd box] {message}", file=sys.stderr, flush=True)


class BoxCommandFailed(AssertionError):
    """A command in the box (or box.sh itself) failed; the message has its output."""


def _describe(args: list[str], proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"`{shlex.join(args)}` exited with status {proc.returncode}\n"
        f"--- stdout (tail)\n{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-4000:]}"
    )


def box_sh(
    env: dict[str, str], *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = [str(BOX_SH), *args]
    try:
        proc = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise BoxCommandFailed(f"`{shlex.join(argv)}` did not finish within {timeout:g}s") from None
    if check and proc.returncode != 0:
        raise BoxCommandFailed(_describe(argv, proc))
    return proc


@dataclass
class Box:
    """A booted box; every command runs in all of its namespaces (nsenter -t PID1 -a)."""

    name: str
    env: dict[str, str]
    pid1: int
    pid_namespace: str

    def run(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(BOX_SH), "exec", self.name, "--", *args]
        try:
            proc = subprocess.run(
                argv, env=self.env, input=input, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise BoxCommandFailed(
                f"in the box: `{shlex.join(args)}` did not finish within {timeout:g}s"
            ) from None
        if check and proc.returncode != 0:
            raise BoxCommandFailed("in the box: " + _describe(list(args), proc))
        return proc

    def write(self, path: str, text: str, *, mode: str = "0644") -> None:
        self.run(
            "sh",
            "-c",
            'umask 077 && cat >"$1.tmp" && chmod "$2" "$1.tmp" && mv -f "$1.tmp" "$1"',
            "sh",
            path,
            mode,
            input=text,
        )

    def read(self, path: str) -> str:
        return self.run("cat", "--", path).stdout

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return self.run("systemctl", *args, check=check, timeout=timeout).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(props)).stdout
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return {p: values.get(p, "") for p in props}

    def journal_cursor(self) -> str:
        """The cursor of the newest journal entry (entries after it are 'new')."""
        out = self.run("journalctl", "-q", "-n", "1", "-o", "json").stdout.strip()
        return str(json.loads(out)["__CURSOR"]) if out else ""

    def journal(self, *args: str, after: str = "") -> str:
        cursor = [f"--after-cursor={after}"] if after else []
        return self.run("journalctl", "-q", "--no-pager", *cursor, *args, timeout=60).stdout

    def curl(self, *args: str) -> str:
        return self.run("curl", "-fsS", "--max-time", "5", *args).stdout


# ----------------------------------------------------------------------------- the box


def _host_tmp_canary() -> Path:
    """Files in the host's /tmp that systemd's boot-time cleanup would remove, were it ours."""
    canary = Path(f"/tmp/background-sync-box-canary.{os.getpid()}")
    canary.mkdir(exist_ok=True)
    (canary / "fresh").write_text("fresh\n")
    old = canary / "forty-days-old"
    old.write_text("old\n")
    aged = time.time() - 40 * 86400
    os.utime(old, (aged, aged))
    return canary


def _copy_source(dest: Path) -> Path:
    """This checkout as a fresh clone has it: no venv, no caches, no build output."""
    top_level = {".git", ".venv", "var", "build", "dist", ".mypy_cache", ".ruff_cache"}
    top_level |= {".pytest_cache"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        if Path(directory) == PROJECT:
            skip |= {n for n in names if n in top_level or n.endswith(".egg-info")}
        return skip

    shutil.copytree(PROJECT, dest, ignore=ignore, symlinks=True)
    return dest


def _pip(*args: str, timeout: float = 600) -> None:
    argv = [sys.executable, "-m", "pip", *args]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BoxCommandFailed(_describe(argv, proc))


def _wheelhouse(session_dir: Path, src: Path) -> Path:
    """requirements.txt's wheels (cached by its hash) and a wheel of this checkout.

    The box's python3 is bookworm's 3.11 on the same architecture, so the host's
    binary wheels install there as they are.
    """
    requirements = PROJECT / "requirements.txt"
    tag = f"{sys.implementation.cache_tag}-{os.uname().machine}"
    key = hashlib.sha256(requirements.read_bytes() + tag.encode()).hexdigest()[:12]
    deps = BOX_DIR / f"wheels-{key}"
    if not (deps / ".complete").is_file():
        partial = deps.with_name(deps.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _pip("wheel", "--quiet", "-r", str(requirements), "-w", str(partial))
        (partial / ".complete").touch()
        shutil.rmtree(deps, ignore_errors=True)
        partial.rename(deps)
        for old in BOX_DIR.glob("wheels-*"):  # wheels of requirements.txt files gone by
            if old != deps and not old.name.endswith(".partial"):
                shutil.rmtree(old, ignore_errors=True)
    house = session_dir / "wheelhouse"
    house.mkdir()
    for wheel in deps.glob("*.whl"):
        os.link(wheel, house / wheel.name)
    _pip("wheel", "--quiet", "--no-deps", str(src), "-w", str(house))
    # pip builds in the tree: leave the copy as a clone would be.
    shutil.rmtree(src / "build", ignore_errors=True)
    for info in src.glob("*.egg-info"):
        shutil.rmtree(info)
    return house


def _host_mounts_under(path: Path) -> list[str]:
    out = subprocess.run(
        ["findmnt", "-rno", "TARGET"], capture_output=True, text=True, check=True
    ).stdout
    prefix = str(path).rstrip("/") + "/"
    return [m for m in out.splitlines() if (m + "/").startswith(prefix)]


def _cgroup2_mount() -> Path:
    out = subprocess.run(
        ["findmnt", "-rn", "-t", "cgroup2", "-o", "TARGET"], capture_output=True, text=True
    ).stdout.split()
    return Path(out[0]) if out else Path("/sys/fs/cgroup")


def _processes_in_namespace(namespace: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "pid") == namespace:
                    pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="session")
def box() -> Iterator[Box]:
    env = {**os.environ, "BOX_DIR": str(BOX_DIR), "BOX_OWNER": str(os.getpid())}
    check = subprocess.run([str(BOX_SH), "check"], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"cannot boot systemd in namespaces on this machine: {check.stderr.strip()}")
    box_sh(env, "reap", "pytest-")  # boxes of earlier sessions that died before teardown
    for stale in BOX_DIR.glob("sessions/pytest-*"):  # and their wheelhouses and sources
        if not Path(f"/proc/{stale.name.removeprefix('pytest-')}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    name = f"pytest-{os.getpid()}"
    session_dir = BOX_DIR / "sessions" / name
    canary = _host_tmp_canary()
    pid_namespace = ""
    try:
        t0 = time.monotonic()
        rootfs = box_sh(env, "build", timeout=900).stdout.strip()
        t1 = time.monotonic()
        shutil.rmtree(session_dir, ignore_errors=True)
        session_dir.mkdir(parents=True)
        src = _copy_source(session_dir / "src")
        house = _wheelhouse(session_dir, src)
        t2 = time.monotonic()
        box_sh(env, "boot", name, f"{house}:{WHEELHOUSE}", f"{src}:{SRC_RO}", timeout=180)
        t3 = time.monotonic()
        pid1 = int(box_sh(env, "pid", name).stdout)
        pid_namespace = os.readlink(f"/proc/{pid1}/ns/pid")
        say(
            f"rootfs {rootfs}: ready in {t1 - t0:.1f}s; wheelhouse {t2 - t1:.1f}s; "
            f"boot {t3 - t2:.1f}s (systemd pid {pid1})"
        )
        yield Box(name, env, pid1, pid_namespace)
    finally:
        t4 = time.monotonic()
        problems = []
        try:
            box_sh(env, "stop", name, timeout=120)
        except BoxCommandFailed as exc:
            problems.append(f"box.sh stop failed: {exc}")
        say(f"box stopped in {time.monotonic() - t4:.1f}s")
        shutil.rmtree(session_dir, ignore_errors=True)
        if pid_namespace and (left := _processes_in_namespace(pid_namespace)):
            problems.append(f"processes of the box are still running: {left}")
        if left_mounts := _host_mounts_under(BOX_DIR):
            problems.append(f"host mounts left under {BOX_DIR}: {left_mounts}")
        if (cgroup := _cgroup2_mount() / f"background-sync-box.{name}").exists():
            problems.append(f"the box's cgroup {cgroup} is still there")
        if not ((canary / "fresh").is_file() and (canary / "forty-days-old").is_file()):
            problems.append(f"the host's /tmp lost files: {canary} is not intact")
        shutil.rmtree(canary, ignore_errors=True)
        assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- the install


@dataclass
class Installed:
    box: Box
    token: str
    baseline_env: str
    env_mode: str
    install_seconds: float

    def backend_faults(self, **faults: Any) -> dict[str, Any]:
        """Replace the reference backend's faults (unset fields go back to defaults)."""
        body = json.dumps({"latency_ms": BACKEND_LATENCY_MS, **faults})
        out = self.box.curl("-X", "PUT", "--data", body, f"{BACKEND}/_control/faults")
        return dict(json.loads(out))

    def backend_stats(self) -> dict[str, Any]:
        return dict(json.loads(self.box.curl(f"{BACKEND}/_control/stats")))

    def seed(self, *, fresh: bool) -> None:
        """`seed-demo` as the service's user, with its state directory and env file.

        `fresh`: first remove the SQLite database and migrate it again, so that no lease or
        backoff of an earlier test (a daemon killed by the watchdog holds its leases until
        they expire) decides what this test's cycles claim.
        """
        python = f"{VENV}/bin/python"
        steps = [f"{python} -m daemon seed-demo --users {USERS}"]
        if fresh:
            steps[:0] = [
                'rm -f -- "$STATE_DIRECTORY"/background-sync.db*',
                f"{python} -m daemon migrate",
            ]
        proc = self.box.run(
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            *(arg for prop in _unit_identity(self.box) for arg in ("-p", prop)),
            "-p",
            f"EnvironmentFile=-{ENV_FILE}",
            "/bin/sh",
            "-ec",
            " && ".join(steps),
            check=False,
            timeout=120,
        )
        if proc.returncode != 0:
            raise BoxCommandFailed("seeding the database in the box: " + _describe(steps, proc))


def _unit_identity(box: Box) -> list[str]:
    """systemd-run properties that give a transient unit the service's user and state dir."""
    props = box.show(UNIT, "User", "DynamicUser", "StateDirectory", "UMask")
    out = [f"DynamicUser={props['DynamicUser'] or 'no'}", f"UMask={props['UMask'] or '0022'}"]
    # A dynamic user is named after its unit unless User= names it: the same name gives the
    # transient unit the service's UID, so the files it creates are the service's.
    user = props["User"] or (UNIT.removesuffix(".service") if props["DynamicUser"] == "yes" else "")
    if user:
        out.append(f"User={user}")
    for directory in props["StateDirectory"].split():
        out.append(f"StateDirectory={directory}")
    return out


@pytest.fixture(scope="session")
def installed(box: Box) -> Installed:
    box.run("cp", "-a", f"{SRC_RO}/.", SRC)
    token = f"bsync-box-token-{secrets.token_hex(16)}"
    box.write(TOKEN_FILE, token + "\n", mode="0600")

    t0 = time.monotonic()
    proc = box.run(
        "sh",
        "-c",
        f"cd {SRC} && WHEELHOUSE={WHEELHOUSE} ./manage_background_sync.sh install "
        f"--token-file {TOKEN_FILE}",
        check=False,
        timeout=300,
    )
    install_seconds = time.monotonic() - t0
    say(f"install exited {proc.returncode} after {install_seconds:.1f}s")
    for line in (proc.stdout + proc.stderr).splitlines()[-40:]:
        say(f"  install| {line}")
    if proc.returncode != 0:
        raise BoxCommandFailed("`manage_background_sync.sh install` failed in the box")
    if box.run("test", "-x", f"{VENV}/bin/python", check=False).returncode != 0:
        raise BoxCommandFailed(f"the install left no {VENV}/bin/python")
    if box.run("test", "-f", ENV_FILE, check=False).returncode != 0:
        raise BoxCommandFailed(f"the install left no {ENV_FILE}")
    env_mode = box.run("stat", "-c", "%a", ENV_FILE).stdout.strip()
    baseline_env = box.read(ENV_FILE)

    # The install may have started the daemon on an empty database; the tests start it.
    box.systemctl("stop", UNIT, check=False)
    box.systemctl("reset-failed", UNIT, check=False)

    box.run(
        "systemd-run",
        "--quiet",
        "--unit=refbackend",
        "-p",
        "Description=reference backend for the systemd tests",
        f"{VENV}/bin/python",
        "-m",
        "daemon.reference_backend",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--latency-ms",
        str(BACKEND_LATENCY_MS),
        "--token-file",
        TOKEN_FILE,
    )
    wait_until(
        lambda: box.run("curl", "-fsS", f"{BACKEND}/health", check=False).returncode == 0,
        timeout=30,
        what="the reference backend's /health in the box",
        describe=lambda: box.journal("-u", "refbackend", "-n", "30"),
    )

    installed = Installed(box, token, baseline_env, env_mode, install_seconds)
    t1 = time.monotonic()
    installed.seed(fresh=False)
    say(f"seeded {USERS} users in {time.monotonic() - t1:.1f}s")
    return installed


# ----------------------------------------------------------------------------- per test


def set_env_lines(text: str, values: dict[str, str]) -> str:
    """`text` with each KEY=... line of `values` replaced, or appended when absent."""
    lines = text.splitlines()
    for key, value in values.items():
        line = f"{key}={value}"
        pattern = re.compile(rf"^\s*(export\s+)?{re.escape(key)}\s*=")
        for i, old in enumerate(lines):
            if pattern.match(old):
                lines[i] = line
                break
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


@dataclass
class Service:
    """background-sync.service in the box, as one test sees it."""

    installed: Installed
    cursor: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def box(self) -> Box:
        return self.installed.box

    def set_env(self, **values: str) -> None:
        """Write the env file: the installed one, the test defaults, then `values`."""
        self.env.update(values)
        text = self.installed.baseline_env.rstrip("\n") + "\n\n# --- tests/systemd\n"
        self.box.write(ENV_FILE, set_env_lines(text, self.env), mode=self.installed.env_mode)

    def props(self, *names: str) -> dict[str, str]:
        return self.box.show(UNIT, *names)

    def start(self) -> float:
        """`systemctl start`, timed; returns the seconds it blocked."""
        t0 = time.monotonic()
        self.box.systemctl("start", UNIT, timeout=120)
        return time.monotonic() - t0

    def entries(self) -> list[dict[str, Any]]:
        """This test's journal entries of the unit (the daemon's lines and systemd's).

        What `journalctl -u` selects, filtered here: bookworm's journalctl, given both
        --after-cursor and -u, drops the first matching entry after the cursor when the
        cursor's own entry does not match (here: systemd's "Starting ..." line).
        """
        out = self.box.journal("-o", "json", after=self.cursor)
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [
            e
            for e in entries
            if e.get("_SYSTEMD_UNIT") == UNIT or (e.get("_PID") == "1" and e.get("UNIT") == UNIT)
        ]

    def output_lines(self) -> list[str]:
        """What the daemon wrote to stdout/stderr (the journal's stream transport)."""
        lines = []
        for entry in self.entries():
            if entry.get("_TRANSPORT") == "stdout":
                message = entry.get("MESSAGE", "")
                if isinstance(message, list):  # not UTF-8: journalctl gives the bytes
                    message = bytes(message).decode("utf-8", "replace")
                lines.append(message)
        return lines

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.output_lines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict) and "event" in value:
                    events.append(value)
        return events

    def systemd_messages(self) -> list[str]:
        """What systemd itself said about the unit (not the daemon's own output)."""
        return [
            str(e.get("MESSAGE", "")) for e in self.entries() if e.get("_TRANSPORT") != "stdout"
        ]

    def wait_event(
        self,
        name: str,
        *,
        timeout: float = 30,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
        count: int = 1,
    ) -> list[dict[str, Any]]:
        """Wait until the daemon has logged `count` events `name` matching `where`."""

        def probe() -> list[dict[str, Any]] | None:
            found = [e for e in self.events() if e.get("event") == name and where(e)]
            return found if len(found) >= count else None

        return wait_until(
            probe,
            timeout=timeout,
            interval=0.25,
            what=f"{count} x event {name!r} in the journal",
            describe=lambda: "\n".join(self.output_lines()[-30:]),
        )


@pytest.fixture
def service(installed: Installed) -> Iterator[Service]:
    """The unit stopped and reset, the env file and test drop-in as the tests expect."""
    box = installed.box
    box.systemctl("stop", UNIT, check=False)
    box.systemctl("reset-failed", UNIT, check=False)
    box.run("mkdir", "-p", DROPIN_DIR)
    box.write(DROPIN, TEST_DROPIN)
    svc = Service(installed, cursor="")
    svc.set_env(**TEST_ENV)
    box.systemctl("daemon-reload")
    installed.seed(fresh=True)
    installed.backend_faults()
    svc.cursor = box.journal_cursor()
    yield svc
    box.systemctl("stop", UNIT, check=False, timeout=90)
