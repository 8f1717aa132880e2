"""Command line: parse, load settings, set up logging, run; map failures to exit codes.

Exit codes follow sysexits(3) where systemd cares: 78 (EX_CONFIG) for a bad setting,
which the unit lists in RestartPreventExitStatus= so a typo does not restart-loop;
69 when the database cannot be reached at start; 75 when it went away for too long;
3 when `once` or `force` finds syncing paused, so a script can tell "held back" from
"failed" (`once --ignore-pause` runs anyway).
64 (EX_USAGE) for a command-line value that would do harm, such as a `cleanup`
threshold shorter than the lease; bad arguments exit 2 (argparse), which no other status
uses. `status` exits with the state (0 healthy ... 6 not running: daemon.overview).
Every command's --help ends with its exit statuses (`_EXITS`).
67 (EX_NOUSER) when `status --user` or `retry` names a user that is not in the users
table; `retry` exits 75 (EX_TEMPFAIL) when it left a user alone because a live lease
holds it (an instance is calling that user right now).
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
from typing import Any

from sqlalchemy.exc import DBAPIError

from daemon import __version__, dberrors, envfile, logs
from daemon import settings as settings_module
from daemon.app import EX_CONFIG, EX_OK, EX_PAUSED, EX_UNAVAILABLE, App
from daemon.database import short_error
from daemon.errors import ConfigError, StoreError
from daemon.settings import Settings

EX_USAGE = 64
EX_ARGUMENTS = 2  # argparse's own, for bad command-line arguments
EX_NOUSER = 67
RETRY_EXIT_STATUSES = """exit status (the first that applies):
  3   --now while paused: users released, no cycle requested (as `force`)
  75  a user was left alone: a live lease holds it (it is being synced right now)
  67  an ID is not in the users table (the others were still released)
  0   every named user released, or it had nothing to release
  64  neither IDs nor --quarantined, or both
  69  the database cannot be reached; 78 a setting to fix
"""
# Past this, a threshold is not a time any more (and no longer fits a timedelta).
CLEANUP_MAX_STALE_AFTER = 1e9


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "reference-backend":
        from daemon import reference_backend

        return reference_backend.main_from_args(args)
    if args.command == "logs":  # reads no settings: works with no SYNC_* variable at all
        from daemon import logview

        return logview.main_from_args(args)
    env_file = getattr(args, "env_file", None)
    daemon = args.command in ("run", "once")  # their stdout is their log
    environ: Mapping[str, str] = os.environ
    try:
        environ = envfile.overlay(os.environ, env_file)
        settings = settings_module.load(environ)
    except ConfigError as exc:
        if daemon:
            logs.configure(fmt=environ.get("SYNC_LOG_FORMAT", "auto").strip().lower())
        return _failed(str(exc), EX_CONFIG, log=daemon)
    logs.configure(
        settings.log_level,
        settings.log_format,
        secrets=[settings.backend_token.reveal()] if settings.backend_token else [],
        gather=daemon,  # the daemon's per-user lines; other commands print beside theirs
    )
    _warn_unknown(environ, daemon=daemon)
    handler = _COMMANDS[args.command]
    try:
        return handler(settings, args)
    except ConfigError as exc:
        return _failed(str(exc), EX_CONFIG, log=daemon)
    except StoreError as exc:
        return _database_failed(exc, f"database: {exc}", log=daemon)
    except DBAPIError as exc:  # a command that talks to the database directly
        return _database_failed(exc, f"database: {short_error(exc)}", log=daemon)


def _failed(line: str, exit_status: int, *, log: bool = False) -> int:
    """The one stderr line of a failed command. `run` and `once` also log it, so that
    their log (the journal, the manage script's JSON file) says why they ended."""
    print(f"background-sync: {line}", file=sys.stderr)
    if log:
        event = "config_error" if exit_status == EX_CONFIG else "database_unavailable_at_start"
        logs.get_logger().error(event, error=line, exit_status=exit_status)
    return exit_status


def _warn_unknown(environ: Mapping[str, str], *, daemon: bool) -> None:
    """A misspelt SYNC_* name: a log line for the daemon, a stderr line for a command."""
    for warning in settings_module.unknown_variables(environ):
        if daemon:
            logs.get_logger().warning("unknown_variable", warning=warning)
        else:
            print(f"background-sync: warning: {warning}", file=sys.stderr)


def _database_failed(exc: BaseException, line: str, *, log: bool = False) -> int:
    """A refused login or a missing database is a setting to fix (78); the rest is 69."""
    refused = dberrors.configuration_problem(exc)
    if refused is not None:
        return _failed(f"SYNC_DATABASE_URL: the server refused: {refused}", EX_CONFIG, log=log)
    return _failed(line, EX_UNAVAILABLE, log=log)


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
    if args.user is not None:
        return _status_user(settings, args)
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


def _status_user(settings: Settings, args: argparse.Namespace) -> int:
    """One user's state, lease, attempts and retry record; 67 when it is not a user."""
    from daemon import schema, userview
    from daemon.database import utcnow

    db = _with_database(settings)
    now = utcnow()
    try:
        data = userview.collect(
            db, schema.inspect_users(db.engine, settings), settings, args.user, now=now
        )
    finally:
        db.dispose()
    _print(json.dumps(data, indent=2) if args.json else userview.render(data, now=now))
    return EX_OK if data["in_users_table"] else EX_NOUSER


def _retry(settings: Settings, args: argparse.Namespace) -> int:
    """Release users from backoff or quarantine; with --now, also force a cycle."""
    from daemon import control, retry, schema
    from daemon.app import EX_TEMPFAIL
    from daemon.database import utcnow

    if bool(args.users) == args.quarantined:
        print("background-sync retry: name users (ID...) or --quarantined", file=sys.stderr)
        return EX_USAGE
    by, now = _operator(), utcnow()
    db = _with_database(settings)
    try:
        if args.quarantined:
            done = retry.release_quarantined(db, settings, by=by, now=now)
        else:
            users = schema.inspect_users(db.engine, settings)
            done = retry.release(db, users, settings, args.users, by=by, now=now)
        switches = control.read(db)
        forced = args.now and not switches.paused
        if forced:
            control.request_force(db, by=by, now=now)
    finally:
        db.dispose()
    print("\n".join(retry.report(done, quarantined=args.quarantined, now=args.now, forced=forced)))
    logs.get_logger().info(
        "users_retried",
        by=by,
        count=len(done.released),
        leased=len(done.leased),
        unknown=len(done.unknown),
        quarantined=args.quarantined,
    )
    if args.now and switches.paused:
        from daemon import overview

        print(
            f"background-sync: no cycle requested: every instance is "
            f"{overview.pause_text(switches)}; the released users are taken after "
            "`background-sync resume`",
            file=sys.stderr,
        )
        return EX_PAUSED
    if done.leased:
        return EX_TEMPFAIL
    return EX_NOUSER if done.unknown else EX_OK


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
    "retry": _retry,
}


# Every command's --help ends with its exit statuses; these close each list.
_DATABASE_EXITS = (
    (EX_UNAVAILABLE, "the database could not be reached"),
    (
        EX_CONFIG,
        "a setting to fix (named on stderr): a bad value, a missing SQLite file "
        "or tables, a refused login",
    ),
    (EX_ARGUMENTS, "bad command-line arguments"),
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
        (EX_ARGUMENTS, "bad command-line arguments"),
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
        (EX_ARGUMENTS, "bad command-line arguments"),
    ),
    "status": (
        (0, "healthy: every running instance is healthy"),
        (
            1,
            "warning: an instance's last cycles could not complete, its circuit is "
            "half-open, or freshness is below the objective",
        ),
        (3, "paused by an operator (and nothing worse)"),
        (
            4,
            "degraded: the circuit is open, the database is failing, cycles keep "
            "failing, or freshness is far below the objective",
        ),
        (
            5,
            "unhealthy: credentials rejected, a stalled cycle, a configuration problem; "
            "or lost: no instance is live and one died without stopping",
        ),
        (6, "not running: no instance is live"),
        (
            67,
            "--user ID: ID is not in the users table (with --user, 0 when it is, "
            "whatever the state)",
        ),
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
        (EX_USAGE, "--stale-after shorter than SYNC_LEASE_SECONDS"),
        *_DATABASE_EXITS,
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
    parser = argparse.ArgumentParser(
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
    status.add_argument(
        "--user",
        metavar="ID",
        default=None,
        help="one user: state, lease, last attempts, next attempt, quarantine, retry "
        "(exit 67 if ID is not in the users table)",
    )
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
    retry = sub.add_parser(
        "retry",
        parents=[env],
        help="release users from backoff or quarantine",
        description="Clear the backoff and quarantine of the named users (or of every\n"
        "quarantined user): the next cycle claims them if their last_sync is stale.\n"
        "A user being synced right now (live lease) is left alone. Who asked and when\n"
        "is recorded, and shown by `status --user ID`.",
        epilog=RETRY_EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    retry.add_argument("users", nargs="*", metavar="ID", help="user ids to release")
    retry.add_argument("--quarantined", action="store_true", help="release every quarantined user")
    retry.add_argument("--now", action="store_true", help="also request a cycle now, like `force`")
    seed = _command(sub, "seed-demo", parents=[env], help="create and fill a demo users table")
    seed.add_argument("--users", type=int, default=25, help="how many users the table should hold")
    from daemon import logview

    logview.add_arguments(sub.add_parser("logs", help="print JSON log lines for people, filtered"))
    backend = sub.add_parser(
        "reference-backend", help="run the bundled backend that implements the contract"
    )
    from daemon import reference_backend

    reference_backend.add_arguments(backend)
    return parser
