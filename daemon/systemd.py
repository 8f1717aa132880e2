"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING.

Wraps sdnotify so that it is a no-op without NOTIFY_SOCKET (a terminal, a test, the
manage script) and so that a failing socket is logged instead of silently ignored:
sdnotify swallows errors unless asked to raise them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import sdnotify

from daemon.logs import get_logger


class Notifier:
    """Sends state changes to systemd; never raises into the daemon."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET", "")
        self._enabled = bool(self._address)
        self._watchdog_usec = _watchdog_usec(env)
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._last_status: str | None = None
        self._log = get_logger(component="systemd")

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WatchdogSec, as sd_watchdog_enabled(3) advises."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")
        self._last_status = status

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def reloaded(self) -> None:
        self._send("READY=1")

    def stopping(self, status: str = "stopping") -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")

    def close(self) -> None:
        if self._notifier is not None and self._notifier.socket is not None:
            self._notifier.socket.close()
        self._notifier = None

    def _connect(self) -> sdnotify.SystemdNotifier:
        """sdnotify's notifier on a socket we connected ourselves.

        sdnotify's constructor drops its socket unclosed when the connect fails and, by
        default, hides the failure; connecting here keeps both under our control, and
        debug=True makes `notify` raise instead of swallowing send errors.
        """
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        notifier = sdnotify.SystemdNotifier.__new__(sdnotify.SystemdNotifier)
        notifier.debug = True
        notifier.socket = sock
        return notifier

    def _send(self, message: str) -> None:
        if not self._enabled:
            return
        try:
            if self._notifier is None:
                self._notifier = self._connect()
            self._notifier.notify(message)
        except OSError as exc:
            self.close()  # reconnect on the next message
            self._log.warning(
                "systemd_notify_failed", message=message.replace("\n", " "), error=str(exc)
            )


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC applies to us only if WATCHDOG_PID is unset or names this process."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec if usec > 0 else None
