"""structlog configuration: JSON lines on stdout for journald, a console form on a TTY.

Logs go to stdout only; systemd's journal (or the manage script's log file) keeps them.
Event names are stable snake_case strings so that operators and tests can grep them.
The JSON lines carry every field; the console form is the short one people read
(daemon/logline.py), the same that `background-sync logs` prints.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import weakref
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from daemon import logline
from daemon.logsink import GATHER_SECONDS, BatchedLines

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING}
_LEVELS["ERROR"] = logging.ERROR


class _Redactor:
    """Last line of defence: a secret that reaches a rendered line is replaced.

    Nothing logs the token on purpose; this catches it arriving inside an exception
    message or a backend's echo, which no code review can rule out.
    """

    def __init__(self, renderer: Processor, secrets: Iterable[str]) -> None:
        self._renderer = renderer
        self._secrets = [s for s in secrets if s]

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> str:
        line = self._renderer(logger, name, event)
        assert isinstance(line, str)
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, "<redacted>")
        return line


def _for_people(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    """Console only: a short run_id, and a per-user line cut to its summary."""
    return logline.for_people(event)


_METHOD_LEVELS = {"warn": "warning", "exception": "error"}


def _json_fallback(value: Any) -> Any:
    """What JSONRenderer does with a value JSON has no form for: its __structlog__, or repr."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


# Values the json module has no form for go to `_json_fallback` with orjson too, rather
# than orjson's own rendering of them.
_ORJSON_AS_JSON_MODULE = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


class _JsonLine:
    """The JSON form's whole chain as one processor, for one line per synced user.

    It does what merge_contextvars, add_log_level, TimeStamper(fmt="iso", utc=True),
    dict_tracebacks and the redacting JSONRenderer do one after another, in that order,
    so the keys and their order are the same; four processor calls fewer per line
    matter when a line is written for each of tens of thousands of users per cycle.

    The line is encoded by orjson, which takes a third of the json module's time
    (structlog's own performance advice); it is kept only when it is plain ASCII, so a
    line reads the same on a stdout of any encoding. Anything else (non-ASCII text, an
    integer beyond 64 bits, a key that is not a string) is encoded by the json module,
    which escapes it, as every line used to be.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # One encoder for every line: json.dumps(..., default=...) builds a new one per call.
        self._encode = json.JSONEncoder(default=_json_fallback).encode
        self._render = _Redactor(lambda _logger, _name, event: self._line(event), secrets)
        self._tracebacks = structlog.processors.dict_tracebacks

    def _line(self, event: EventDict) -> str:
        try:
            line = orjson.dumps(event, default=_json_fallback, option=_ORJSON_AS_JSON_MODULE)
        except (TypeError, orjson.JSONEncodeError):
            return self._encode(event)
        return line.decode("ascii") if line.isascii() else self._encode(event)

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> str:
        event = structlog.contextvars.merge_contextvars(logger, name, event)
        event["level"] = _METHOD_LEVELS.get(name, name)
        event["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        if "exc_info" in event:
            event = self._tracebacks(logger, name, event)
        return self._render(logger, name, event)


class _LibraryBridge(logging.Handler):
    """Warnings that libraries log through `logging` (psycopg, aiohttp, asyncio) become
    our own log lines on stdout, never bare text on stderr: stderr carries only the one
    line a failed start prints, and journald keeps one format."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger("background_sync").bind(component=record.name)
            write = log.error if record.levelno >= logging.ERROR else log.warning
            write("library_warning", message=record.getMessage()[:1000])
        except Exception:
            self.handleError(record)


class _Output:
    """The process's log output as last configured, and every sink still in use.

    A logger bound before a reconfiguration (SIGHUP) keeps the sink it was bound to, so
    one stream keeps one sink, and exit flushes every sink that is still referenced.
    """

    sink: BatchedLines | None = None
    gather = False
    sinks: weakref.WeakSet[BatchedLines] = weakref.WeakSet()


def flush() -> None:
    """Write the lines still gathered (see daemon.logsink); also run at exit."""
    for sink in list(_Output.sinks):
        sink.flush()


atexit.register(flush)


def configure(
    level: str = "INFO",
    fmt: str = "auto",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    gather: bool | None = None,
) -> None:
    """Configure structlog for the whole process; safe to call again on SIGHUP.

    `gather`: JSON lines written by the event loop at INFO and below go out together,
    a few milliseconds late (daemon.logsink), as the daemon's `run` and `once` want;
    None keeps what was configured before.
    """
    flush()
    if gather is not None:
        _Output.gather = gather
    out = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    processors: list[Processor]
    if console:
        processors = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _for_people,
            _Redactor(structlog.dev.ConsoleRenderer(colors=out.isatty(), sort_keys=False), secrets),
        ]
    else:
        processors = [_JsonLine(secrets)]
    factory: Any = structlog.WriteLoggerFactory(file=out)
    if _Output.gather:
        # The daemon's commands: a failed write never reaches the code that logged
        # (daemon.logsink). The console form is for a person watching: never gathered.
        seconds = 0.0 if console else GATHER_SECONDS
        if _Output.sink is None or _Output.sink.file is not out or _Output.sink.seconds != seconds:
            _Output.sink = BatchedLines(out, seconds=seconds)
            _Output.sinks.add(_Output.sink)
        sink = _Output.sink
        factory = lambda *_names: sink  # noqa: E731  (every logger name gets the one sink)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LibraryBridge)]:
        root.removeHandler(handler)
    root.addHandler(_LibraryBridge(logging.WARNING))


def get_logger(**context: Any) -> Any:
    """A bound logger; module code calls this rather than structlog directly."""
    return structlog.get_logger("background_sync").bind(**context)
