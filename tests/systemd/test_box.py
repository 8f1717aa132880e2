"""The harness itself: a real systemd as PID 1 on the box's own root, usable for Type=notify.

If these fail, the systemd tests of the daemon say nothing about the daemon.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.systemd.conftest import Box, wait_until

pytestmark = pytest.mark.timeout(600)  # the first test of a session may build the rootfs

NOTIFY_SCRIPT = """\
import os, socket, sys, time

def notify(message):
    address = os.environ["NOTIFY_SOCKET"]
    if address[0] == "@":
        address = "\\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)

time.sleep(1.5)
notify("READY=1\\nSTATUS=pinging")
for _ in range(3):
    time.sleep(0.5)
    notify("WATCHDOG=1")
notify("STATUS=hanging")
time.sleep(3600)
"""

NOTIFY_UNIT = """\
[Unit]
Description=harness self-test: Type=notify with a watchdog
[Service]
Type=notify
ExecStart=/usr/bin/python3 /usr/local/bin/notify-selftest.py
WatchdogSec=2
Restart=on-failure
RestartSec=1
"""


def test_box_runs_systemd_as_pid1_on_its_own_root_with_only_loopback(box: Box) -> None:
    assert box.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert box.systemctl("is-system-running", check=False).strip() in ("running", "degraded")
    assert box.run("findmnt", "-rno", "FSTYPE", "/").stdout.strip() == "overlay"
    assert box.run("hostname").stdout.strip() == "bsbox"
    # The host's /tmp (with this session's canary in it) is not the box's /tmp.
    canary = f"/tmp/background-sync-box-canary.{os.getpid()}"
    assert os.path.isdir(canary)
    assert box.run("test", "-e", canary, check=False).returncode != 0
    interfaces = box.run("ls", "/sys/class/net").stdout.split()
    assert interfaces == ["lo"], interfaces
    assert box.run("getent", "hosts", "localhost").stdout.strip()


def test_box_type_notify_start_blocks_until_ready_and_watchdog_restarts_a_hung_unit(
    box: Box,
) -> None:
    box.write("/usr/local/bin/notify-selftest.py", NOTIFY_SCRIPT)
    box.write("/etc/systemd/system/notify-selftest.service", NOTIFY_UNIT)
    box.systemctl("daemon-reload")
    try:
        t0 = time.monotonic()
        box.systemctl("start", "notify-selftest.service")
        blocked = time.monotonic() - t0
        props = box.show("notify-selftest.service", "ActiveState", "StatusText")
        assert blocked >= 1.4, f"start returned after {blocked:.2f}s, before READY=1"
        assert props == {"ActiveState": "active", "StatusText": "pinging"}

        def restarted() -> bool:
            n = box.show("notify-selftest.service", "NRestarts")["NRestarts"]
            return int(n or 0) >= 1

        wait_until(restarted, timeout=20, what="the watchdog to restart the unit")
        journal = box.journal("-u", "notify-selftest.service")
        assert "Watchdog timeout" in journal, journal
    finally:
        box.systemctl("stop", "notify-selftest.service", check=False)
        box.run("rm", "-f", "/etc/systemd/system/notify-selftest.service")
        box.systemctl("daemon-reload")
