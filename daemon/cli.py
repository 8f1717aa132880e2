"""Command line: parse, load settings, set up logging, run; map failures to exit codes.

Exit codes follow sysexits(3) where systemd cares: 78 (EX_CONFIG) for a bad setting,
which the unit lists in RestartPreventExitStatus= so a typo does not restart-loop;
69 when the database cannot be reached at start; 75 when it went away for too long;
3 when `once` or `force` finds syncing paused, so a script can tell "held back" from
"failed" (`once --ignore-pause` runs anyway).
64 (EX_USAGE) for a command-line value that would do harm, such as a `cleanup`
threshold shorter than the lease, and for bad arguments (argparse's own 2 would read as
"degraded" from `status`, whose exit statuses 0-5 name the state: daemon.overview).
Every command's --help ends with its exit statuses (`_EXITS`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy.exc import DBAPIError

from daemon import __version__, dberrors, envfile, logs
from daemon import settings as settings_module
from daemon.app import EX_CONFIG, EX_OK, EX_PAUSED, EX_UNAVAILABLE, App
from daemon.database import short_error
from daemon.errors import ConfigError, StoreError
from daemon.settings import Settings

EX_USAGE = 64
# Past this, a threshold is not a time any more (and no longer fits a timedelta).
CLEANUP_MAX_STALE_AFTER = 1e9


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "reference-backend":
        from daemon import reference_backend

        return reference_backend.main_from_args(args)
    env_file = getattr(args, "env_file", None)
    try:
        environ = envfile.overlay(os.environ, env_file)
        settings = settings_module.load(environ)
    except ConfigError as exc:
        print(f"background-sync: {exc}", file=sys.stderr)
        return EX_CONFIG
    logs.configure(
        settings.log_level,
        settings.log_format,
        secrets=[settings.backend_token.reveal()] if settings.backend_token else [],
    )
    _warn_unknown(environ, daemon=args.command in ("run", "once"))
    handler = _COMMANDS[args.command]
    try:
        return handler(settings, args)
    except ConfigError as exc:
        print(f"background-sync: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StoreError as exc:
        return _database_failed(exc, f"database: {exc}")
    except DBAPIError as exc:  # a command that talks to the database directly
        return _database_failed(exc, f"database: {short_error(exc)}")


def _warn_unknown(environ: Mapping[str, str], *, daemon: bool) -> None:
    """A misspelt SYNC_* name: a log line for the daemon, a stderr line for a command."""
    for warning in settings_module.unknown_variables(environ):
        if daemon:
            logs.get_logger().warning("unknown_variable", warning=warning)
        else:
            print(f"background-sync: warning: {warning}", file=sys.stderr)


def _database_failed(exc: BaseException, line: str) -> int:
    """A refused login or a missing database is a setting to fix (78); the rest is 69."""
    refused = dberrors.configuration_problem(exc)
    if refused is not None:
        print(f"background-sync: SYNC_DATABASE_URL: the server refused: {refused}", file=sys.stderr)
        return EX_CONFIG
    print(f"background-sync: {line}", file=sys.stderr)
    return EX_UNAVAILABLE


def _run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(App(settings, env_file=args.env_file).run_forever())


def _once(settings: Settings, args: argparse.Namespace) -> int:
    app = App(settings, env_file=args.env_file)
    return asyncio.run(app.run_once(ignore_pause=args.ignore_pause))


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from daemon.database import engine_for, migrate

    engine = engine_for(settings)
    try:
        revision = migrate(engine)
    except Exception as exc:  # alembic and drivers raise many kinds; all end the same
        return _database_failed(exc, f"migrate failed: {short_error(exc)}")
    finally:
        engine.dispose()
    logs.get_logger().info("database_migrated", revision=revision)
    return EX_OK


def _check_config(settings: Settings, args: argparse.Namespace) -> int:
    """The effective settings, and what the users table looks like to the daemon.

    A users table the daemon cannot work with is a configuration error (78); a database
    that cannot be reached, or a SQLite file not created yet, is said and not an error.
    """
    shown = settings.redacted()
    if args.offline:
        shown["users_table"] = {"checked": False, "reason": "--offline"}
    else:
        shown["users_table"] = _inspect_users_table(settings)
    print(json.dumps(shown, indent=2, sort_keys=True, default=str))
    return EX_OK


def _inspect_users_table(settings: Settings) -> dict[str, Any]:
    from datetime import timedelta

    from sqlalchemy.engine import make_url

    from daemon import schema
    from daemon.database import Database, engine_for, utcnow
    from daemon.store import Store

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        # Opening it would create an empty database where the operator did not expect one.
        return {"checked": False, "reason": f"the database file {url.database} does not exist"}
    db = Database(engine_for(settings), attempts=1)
    try:
        users = schema.inspect_users(db.engine, settings)
        store = Store(db, users, instance="check-config", lease_seconds=settings.lease_seconds)
        advice = store.index_advice(
            stale_before=utcnow() - timedelta(seconds=settings.stale_after_seconds),
            limit=settings.claim_batch_size,
        )
    except StoreError as exc:
        if dberrors.configuration_problem(exc.__cause__ or exc) is not None:
            raise  # a refused login is a setting to fix: 78, as for every command
        print(f"background-sync: warning: users table not checked: {exc}", file=sys.stderr)
        return {"checked": False, "reason": str(exc)}
    finally:
        db.dispose()
    if advice is not None:
        print(
            f"background-sync: warning: the due scan on {users.qualified_name} cannot use an "
            f"index, so every page reads and sorts the whole table; run: {advice}",
            file=sys.stderr,
        )
    return {
        "checked": True,
        "table": users.qualified_name,
        "id_sent_as": users.id_kind.value,
        "last_sync_storage": users.storage.value,
        "index": "ok" if advice is None else f"missing: {advice}",
    }


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from daemon import overview, schema, screen
    from daemon.app import instance_name
    from daemon.database import SCHEMA_REVISION, current_revision, utcnow
    from daemon.store import Store

    db = _with_database(settings)
    try:
        revision = current_revision(db.engine)
        if revision != SCHEMA_REVISION:
            # Its columns are not there yet: a query error would read as an outage (69).
            raise ConfigError(
                f"SYNC_DATABASE_URL: the daemon's tables are at revision {revision}, this "
                f"version needs {SCHEMA_REVISION}; run `background-sync migrate`"
            )
        store = Store(
            db,
            schema.inspect_users(db.engine, settings),
            instance=instance_name(),
            lease_seconds=settings.lease_seconds,
        )
        data = overview.collect(db, store, settings, now=utcnow())
    finally:
        db.dispose()
    _print(json.dumps(data, indent=2, default=str) if args.json else screen.render(data))
    return int(data["verdict"]["exit_status"])


def _print(text: str) -> None:
    """Print, and leave quietly when the reader has gone (`status | head -1`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would print a traceback at exit when flushing the closed pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _operator() -> str:
    """Who changed a switch, as `status` shows it."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _with_database(settings: Settings) -> Any:
    from sqlalchemy.engine import make_url

    from daemon.database import Database, engine_for, has_daemon_tables

    url = make_url(settings.database_url)
    path = url.database or ""
    sqlite = url.get_backend_name() == "sqlite" and path not in ("", ":memory:")
    if sqlite and not Path(path).is_file():
        # Opening it would create an empty database where the operator expected theirs.
        raise ConfigError(
            f"SYNC_DATABASE_URL: no database file at {path}; check the path "
            "(the daemon's is in its StateDirectory) or run `background-sync migrate`"
        )
    db = Database(engine_for(settings), attempts=3)
    if not has_daemon_tables(db.engine):
        db.dispose()
        raise ConfigError(
            "SYNC_DATABASE_URL: the daemon's tables are missing; run `background-sync migrate`"
        )
    return db


def _pause(settings: Settings, args: argparse.Namespace) -> int:
    return _set_paused(settings, True)


def _resume(settings: Settings, args: argparse.Namespace) -> int:
    return _set_paused(settings, False)


def _set_paused(settings: Settings, paused: bool) -> int:
    from daemon import control, overview
    from daemon.database import utcnow

    db = _with_database(settings)
    try:
        before = control.read(db)
        if before.paused and paused:
            print(f"already {overview.pause_text(before)}: nothing changed")
            return EX_OK
        control.set_paused(db, paused, by=_operator(), now=utcnow())
    finally:
        db.dispose()
    if paused:
        print(
            "paused: within a few seconds every instance stops calling the backend; calls "
            "in flight finish, claimed users not yet called are released"
        )
    else:
        print("resumed: instances start claiming again at their next cycle (or `force` now)")
    return EX_OK


def _force(settings: Settings, args: argparse.Namespace) -> int:
    """A cycle now, unless paused: a forced cycle would not run, so none is requested."""
    from daemon import control, overview
    from daemon.database import utcnow

    db = _with_database(settings)
    try:
        switches = control.read(db)
        if not switches.paused:
            control.request_force(db, by=_operator(), now=utcnow())
    finally:
        db.dispose()
    if switches.paused:
        print(
            f"background-sync: not forced: every instance is {overview.pause_text(switches)}; "
            "no cycle runs until `background-sync resume`, then force again",
            file=sys.stderr,
        )
        return EX_PAUSED
    print("cycle requested: every running instance starts one within a few seconds")
    return EX_OK


def _cleanup(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from daemon import control
    from daemon.database import utcnow

    if not settings.lease_seconds <= args.stale_after <= CLEANUP_MAX_STALE_AFTER:  # and NaN
        # Live runs renew their heartbeat every third of a lease: a shorter threshold
        # would call running work abandoned.
        print(
            f"background-sync: cleanup --stale-after {args.stale_after:g}: must be seconds, "
            f"at least SYNC_LEASE_SECONDS ({settings.lease_seconds:g}), or live work "
            "looks abandoned",
            file=sys.stderr,
        )
        return EX_USAGE
    db = _with_database(settings)
    try:
        cleaned = control.cleanup(db, now=utcnow(), stale_after=timedelta(seconds=args.stale_after))
    finally:
        db.dispose()
    print(
        f"freed {cleaned.leases} expired lease(s), closed {cleaned.runs} abandoned run(s), "
        f"forgot {cleaned.instances} silent instance(s)"
    )
    return EX_OK


def _seed_demo(settings: Settings, args: argparse.Namespace) -> int:
    from daemon import demo
    from daemon.database import engine_for

    engine = engine_for(settings)
    try:
        added = demo.seed(engine, settings, args.users)
    finally:
        engine.dispose()
    logs.get_logger().info("demo_users_seeded", added=added, total=args.users)
    return EX_OK


_COMMANDS = {
    "run": _run,
    "once": _once,
    "migrate": _migrate,
    "check-config": _check_config,
    "status": _status,
    "seed-demo": _seed_demo,
    "pause": _pause,
    "resume": _resume,
    "force": _force,
    "cleanup": _cleanup,
}


class _Parser(argparse.ArgumentParser):
    """Bad arguments exit 64 (EX_USAGE), not argparse's 2, which `status` means degraded."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


# Every command's --help ends with its exit statuses; these close each list.
_DATABASE_EXITS = (
    (EX_UNAVAILABLE, "the database could not be reached"),
    (
        EX_CONFIG,
        "a setting to fix (named on stderr): a bad value, a missing SQLite file "
        "or tables, a refused login",
    ),
    (EX_USAGE, "bad command-line arguments"),
)
_EXITS: dict[str, tuple[tuple[int, str], ...]] = {
    "run": (
        (EX_OK, "stopped by SIGTERM or SIGINT after draining"),
        (1, "a cycle crashed (a bug): systemd restarts a clean process"),
        (EX_UNAVAILABLE, "the database was unreachable for 60 s at start"),
        (70, "a side task (control poll, watchdog feeder) kept failing"),
        (74, "the SQLite file was deleted or replaced while running"),
        (75, "the database stayed away past SYNC_DATABASE_OUTAGE_SECONDS"),
        (EX_CONFIG, "a setting to fix, or a users table changed under the daemon"),
        (EX_USAGE, "bad command-line arguments"),
    ),
    "once": (
        (EX_OK, "every due user synced"),
        (1, "some user failed, or the cycle could not complete"),
        (EX_PAUSED, "paused by an operator: nothing synced (see --ignore-pause)"),
        (74, "the SQLite file was deleted or replaced while running"),
        (75, "the cycle ended on a database outage"),
        *_DATABASE_EXITS,
    ),
    "migrate": ((EX_OK, "the tables are at this version's revision"), *_DATABASE_EXITS),
    "check-config": (
        (EX_OK, "the settings are valid (an unreachable database is only warned about)"),
        (EX_CONFIG, "a setting to fix, or a users table the daemon cannot work with"),
        (EX_USAGE, "bad command-line arguments"),
    ),
    "status": (
        (0, "healthy: every running instance is healthy"),
        (1, "warning: an instance's last cycles could not complete, or its circuit is half-open"),
        (2, "degraded: the circuit is open, the database is failing, or cycles keep failing"),
        (3, "paused by an operator (and nothing worse)"),
        (
            4,
            "unhealthy: credentials rejected, a stalled cycle, a configuration problem; "
            "or lost: no instance is live and one died without stopping",
        ),
        (5, "not running: no instance is live"),
        *_DATABASE_EXITS,
    ),
    "pause": ((EX_OK, "paused (or already paused)"), *_DATABASE_EXITS),
    "resume": ((EX_OK, "resumed (or not paused)"), *_DATABASE_EXITS),
    "force": (
        (EX_OK, "a cycle was requested from every running instance"),
        (EX_PAUSED, "paused: nothing requested"),
        *_DATABASE_EXITS,
    ),
    "cleanup": (
        (EX_OK, "cleaned up (the counts are printed)"),
        (EX_USAGE, "bad command-line arguments, or --stale-after shorter than SYNC_LEASE_SECONDS"),
        *_DATABASE_EXITS[:2],
    ),
    "seed-demo": ((EX_OK, "the demo table holds --users users"), *_DATABASE_EXITS),
}


def _epilog(command: str) -> str:
    rows = [
        textwrap.fill(meaning, 79, initial_indent=f"  {code:>3}  ", subsequent_indent=" " * 7)
        for code, meaning in sorted(_EXITS[command])
    ]
    return "\n".join(["exit statuses:", *rows])


def _command(
    sub: Any, name: str, *, parents: list[argparse.ArgumentParser], help: str
) -> argparse.ArgumentParser:
    """A subcommand whose --help lists its exit statuses."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        parents=parents,
        help=help,
        epilog=_epilog(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="background-sync",
        description="Keeps every user of an application freshly synced with its backend.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    env = argparse.ArgumentParser(add_help=False)
    env.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help="KEY=VALUE file layered over the environment, re-read on SIGHUP",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(sub, "run", parents=[env], help="run the daemon in the foreground")
    once = _command(
        sub, "once", parents=[env], help="run one cycle; exit 1 if any user failed, 3 if paused"
    )
    once.add_argument(
        "--ignore-pause",
        action="store_true",
        help="run even while an operator's pause holds (which otherwise exits 3)",
    )
    _command(sub, "migrate", parents=[env], help="create or upgrade the daemon's tables")
    check = _command(
        sub,
        "check-config",
        parents=[env],
        help="print the effective configuration and check the users table",
    )
    check.add_argument(
        "--offline",
        action="store_true",
        help="check the settings only; do not connect to the database",
    )
    status = _command(
        sub,
        "status",
        parents=[env],
        help="what every instance is doing, what failed and why, what happens next",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _command(sub, "pause", parents=[env], help="stop claiming users, on every instance")
    _command(sub, "resume", parents=[env], help="undo pause")
    _command(sub, "force", parents=[env], help="start a cycle now, on every instance")
    cleanup = _command(
        sub, "cleanup", parents=[env], help="record and free work that crashed instances left"
    )
    cleanup.add_argument(
        "--stale-after",
        type=float,
        default=600.0,
        help="seconds without heartbeat after which a run or instance counts as gone "
        "(at least SYNC_LEASE_SECONDS; live leases are never touched)",
    )
    seed = _command(sub, "seed-demo", parents=[env], help="create and fill a demo users table")
    seed.add_argument("--users", type=int, default=25, help="how many users the table should hold")
    backend = sub.add_parser(
        "reference-backend", help="run the bundled backend that implements the contract"
    )
    from daemon import reference_backend

    reference_backend.add_arguments(backend)
    return parser
