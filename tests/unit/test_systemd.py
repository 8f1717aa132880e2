"""The notify wrapper talks to a real unix datagram socket and never raises."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> list[str]:
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages


def test_ready_status_watchdog_and_stopping_reach_the_socket(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("idle")
    notifier.status("syncing 1 of 2")
    notifier.status("syncing 1 of 2")  # unchanged: not sent again
    notifier.watchdog()
    notifier.stopping()
    notifier.close()
    assert received(sock) == [
        "READY=1\nSTATUS=idle",
        "STATUS=syncing 1 of 2",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping",
    ]


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("idle")
    notifier.watchdog()
    notifier.stopping()


def test_a_vanished_socket_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "gone.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    with capture_logs() as logs:
        notifier.watchdog()
    assert [entry["event"] for entry in logs] == ["systemd_notify_failed"]


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() -> None:
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({}).watchdog_interval is None
