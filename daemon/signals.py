"""The daemon's signals: installed for the process's life and restored afterwards.

SIGTERM and a first SIGINT ask for a clean stop (drain, release, exit 0); a second SIGINT
exits at once with 130 (leases expire on their own, nothing is lost). SIGHUP reloads the
configuration, one reload at a time; SIGUSR1 asks for a cycle now.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

EX_FORCED = 130


class Signals:
    """A context manager for the handlers, like uvicorn's `Server.capture_signals`."""

    def __init__(
        self,
        *,
        stop: Callable[[str], None],
        reload: Callable[[], Coroutine[Any, Any, None]],
        force: Callable[[str], None],
        log: Any,
    ) -> None:
        self._stop = stop
        self._reload = reload
        self._force = force
        self._log = log
        self._interrupts = 0
        self._reloading: asyncio.Task[None] | None = None

    def __enter__(self) -> Signals:
        loop = asyncio.get_running_loop()
        for number, handler in self._handlers().items():
            loop.add_signal_handler(number, handler)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        for number in self._handlers():
            loop.remove_signal_handler(number)

    def _handlers(self) -> dict[int, Callable[[], None]]:
        return {
            signal.SIGTERM: lambda: self._stop("SIGTERM"),
            signal.SIGINT: self._on_sigint,
            signal.SIGHUP: self._on_sighup,
            signal.SIGUSR1: lambda: self._force("SIGUSR1"),
        }

    def _on_sighup(self) -> None:
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self._reload(), name="reload")

    def _on_sigint(self) -> None:
        self._interrupts += 1
        if self._interrupts == 1:
            self._stop("SIGINT")
            return
        # A second Ctrl-C means now: leases expire on their own, nothing is lost.
        self._log.warning("forced_exit", reason="second SIGINT")
        sys.stdout.flush()
        os._exit(EX_FORCED)
