"""Where the daemon's log lines go: stdout, gathered into one write per few milliseconds.

Writing and flushing every line on its own (structlog's WriteLogger) costs one system call
per line, and each lets the database thread take the GIL in the middle of the event
loop's work: about 60 µs of CPU per synced user, measured on a cycle of 20,000 users
(docs/performance.md), more than encoding the line. `BatchedLines` keeps the lines the
event loop writes at INFO and below for at most GATHER_SECONDS (or GATHER_CHARS) and
writes them together; a warning or an error writes what is gathered and itself at once,
in order, so nothing that says something went wrong ever waits. Lines from any other
thread, or with no event loop running, are written at once too.

What a gathered line can lose: if the process is killed (SIGKILL, or SIGABRT from the
systemd watchdog) within GATHER_SECONDS of writing it, that INFO line never reaches the
journal. A clean exit, a crash through an exception and SIGTERM all flush (`flush` runs
at exit). The console form on a terminal is never gathered.

A write that fails (the reader of a pipe went away, the journal's stream closed, the disk
of a redirected file is full) loses those lines and nothing else: they are counted
(`lines_lost`, the metric background_sync_log_lines_lost_total), the first loss is told
on stderr, and the daemon goes on. A log line is never worth a cycle: the write happens
inside whatever logged it, often between a backend's answer and recording it. A broken
pipe never heals, so the stream is then pointed at /dev/null: what is still buffered and
every later line are dropped without an error, and the process exits with its own status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from typing import TextIO

GATHER_SECONDS = 0.05
GATHER_CHARS = 64 * 1024


class _Dropped:
    """Lines every sink of the process has dropped: the metric is a counter, so it must
    not fall when a sink that lost lines is replaced (a reload to another format)."""

    lock = threading.Lock()
    lines = 0


def lines_lost() -> int:
    """Lines dropped by failed writes since the process started, every sink counted."""
    return _Dropped.lines


class BatchedLines:
    """A structlog logger (its methods take the rendered line) writing lines in batches.

    With `seconds` 0 every line is written at once; a write that fails is still dropped
    and counted rather than raised.
    """

    def __init__(
        self, file: TextIO, *, seconds: float = GATHER_SECONDS, chars: int = GATHER_CHARS
    ) -> None:
        self.file = file
        self.seconds = seconds
        self._chars = chars
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._size = 0
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # whose timer will write
        self.lines_lost = 0  # lines a failed write dropped

    def gather(self, message: str) -> None:
        """An INFO or DEBUG line: kept for a moment when the event loop wrote it (never,
        with `seconds` 0: the console form of the daemon's commands)."""
        if self.seconds <= 0:
            self.urgent(message)
            return
        try:
            loop = asyncio.get_running_loop()  # only this thread's: others write at once
        except RuntimeError:
            self.urgent(message)
            return
        with self._lock:
            self._lines.append(message)
            self._size += len(message)
            if self._size >= self._chars:
                self._write_locked()
            elif self._timer_loop is not loop:
                # None, or a loop that has ended (its timer never fires): this loop's timer.
                loop.call_later(self.seconds, self._fired)
                self._timer_loop = loop

    def urgent(self, message: str) -> None:
        """A line that must not wait: what is gathered, then it, written now."""
        with self._lock:
            self._lines.append(message)
            self._write_locked()

    def flush(self) -> None:
        """Write every gathered line now (at exit, or before reconfiguring)."""
        with self._lock:
            self._write_locked()

    def _fired(self) -> None:
        # A timer is never cancelled (any thread may write at once; a timer's loop is
        # not ours to touch from another): one that finds nothing gathered does nothing.
        with self._lock:
            self._timer_loop = None
            self._write_locked()

    def _write_locked(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        count = len(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as exc:
            self._lost(count, exc)

    def _lost(self, count: int, exc: OSError) -> None:
        self.lines_lost += count
        with _Dropped.lock:
            first = _Dropped.lines == 0
            _Dropped.lines += count
        if isinstance(exc, BrokenPipeError):
            _discard(self.file)
        if first:
            with contextlib.suppress(Exception):  # stderr is often the same broken stream
                print(
                    f"background-sync: writing log lines failed ({exc.strerror or exc});"
                    " lines that cannot be written are dropped and counted"
                    " (background_sync_log_lines_lost_total)",
                    file=sys.__stderr__,
                    flush=True,
                )

    # structlog calls the method named like the level; the line is its only argument.
    debug = info = msg = log = gather
    warning = warn = error = err = critical = fatal = exception = failure = urgent

    def __repr__(self) -> str:
        return f"<BatchedLines file={self.file!r}>"


def _discard(file: TextIO) -> None:
    """Point the stream's descriptor at /dev/null and drop what it still buffers."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, file.fileno())
        finally:
            os.close(null)
        file.flush()  # the buffered remains go to /dev/null
