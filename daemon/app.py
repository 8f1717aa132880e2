"""The daemon's lifecycle, in one place: open, announce, loop, drain, close.

`App.run_forever()` is `background-sync run`; `App.run_once()` is `once`. Both open the
same resources in the same order and close them in reverse. The main loop waits on
"stop, or a wake-up, or the next tick" and never sleeps blindly; cycles run as a task
beside it so that signals, the watchdog and STATUS= stay live while users are synced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon import (
    ages,
    control,
    dberrors,
    envfile,
    freshness,
    health,
    logs,
    overview,
    scheduler,
    schema,
    statusweb,
    thresholds,
)
from daemon import settings as settings_module
from daemon.backend import BackendClient
from daemon.concurrency import Concurrency
from daemon.cycle import Clock, DbRunner
from daemon.cycles import Cycles
from daemon.database import SCHEMA_REVISION, Database, current_revision, engine_for, sqlite_file
from daemon.errors import ConfigError, StoreError
from daemon.metrics import Metrics
from daemon.resilience import BackendGate
from daemon.sessions import BackendSessions
from daemon.settings import Settings
from daemon.signals import Signals
from daemon.store import Store
from daemon.supervisor import Supervisor
from daemon.systemd import Notifier
from daemon.values import Report

EX_OK = 0
EX_FAILED = 1
EX_PAUSED = 3  # `once` or `force` while paused: nothing was synced or requested
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78

STARTUP_DATABASE_WAIT_SECONDS = 60.0
DATABASE_RETRY_SECONDS = 30.0
# While a cycle runs the loop looks every second (STATUS= shows its progress); between
# cycles it sleeps until the next tick, woken by the control poll, a signal or a request.
LOOP_WAKE_SECONDS = 1.0
CONTROL_POLL_SECONDS = control.POLL_SECONDS
# Without cycles (paused, circuit open, database retrying) freshness is still measured
# once an interval, at most this often, so the views and alerts never show a frozen share.
FRESHNESS_MIN_EVERY_SECONDS = 10.0
# A clean stop says so in the instance row; a database that does not answer in this
# long is not waited for (the row then ages into "lost" in `status`).
STOPPED_MARK_SECONDS = 3.0
# Settings that name the database or sockets the process already holds.
RESTART_ONLY = (
    "database_url",
    "users_table",
    "user_id_column",
    "user_email_column",
    "last_sync_column",
    "status_address",
    "lease_seconds",
    "database_prepared_statements",
)


class _StoppedEarly(Exception):
    """Stop was requested before the daemon was ready: exit cleanly, with status 0."""


def instance_name() -> str:
    """Who holds a lease: readable in `status`, unique per process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class App:
    def __init__(
        self,
        settings: Settings,
        *,
        environ: Mapping[str, str] | None = None,
        env_file: Path | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.instance = instance_name()
        self.metrics = Metrics()
        self._source = envfile.Source(dict(os.environ if environ is None else environ), env_file)
        self._clock = clock or Clock()
        self._notifier = Notifier(self._source.environ)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._log = logs.get_logger(instance=self.instance)
        self._db_runner = DbRunner()
        self._store: Store | None = None
        self._fatal: int | None = None
        self._health = health.Tracker()
        self._control = control.Poll(self._log, started_at=self._clock.now())
        self._cycles = Cycles(self, self._log)
        self._backend = BackendSessions(self._make_gate(settings), self.metrics.calls)
        self.metrics.follow(
            circuit=lambda: self.gate.state.value,
            credentials_rejected=lambda: self._health.stats.credentials_rejected,
            progress=lambda: cycle.progress if (cycle := self._cycles.running) else None,
        )
        self.concurrency = Concurrency(
            settings,
            on_change=lambda limiter, change: self.metrics.show_concurrency(limiter, change.reason),
        )
        self.metrics.show_concurrency(self.concurrency.limiter)
        self._state = "starting"
        self._shown: str | None = None  # the last STATUS= line, which the poll reports
        self._health_shown: str | None = None  # the health gauge's state, as last set
        self._census_shown: dict[str, int] = {}  # the instances gauge, as last set

    # -- what a cycle needs (daemon.cycles.CycleHost) ---------------------------------

    @property
    def store(self) -> Store:
        assert self._store is not None, "resources are not open"
        return self._store

    @property
    def client(self) -> BackendClient:
        assert self._backend.client is not None, "resources are not open"
        return self._backend.client

    @property
    def db_runner(self) -> DbRunner:
        return self._db_runner

    @property
    def stop_event(self) -> asyncio.Event:
        return self._stop

    @property
    def wake(self) -> asyncio.Event:
        return self._wake

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def gate(self) -> BackendGate:
        return self._backend.gate

    @property
    def switches(self) -> control.Switches:
        return self._control.switches

    # -- public entry points ---------------------------------------------------------

    async def run_forever(self) -> int:
        """`background-sync run`: cycles on schedule until stopped."""
        return await self._run(self._serve)

    async def run_once(self, *, ignore_pause: bool = False) -> int:
        """`once`: one cycle, then exit: 0 if every due user synced, 1 if any failed,
        3 (EX_PAUSED) if an operator's pause held it back, unless `ignore_pause`."""
        return await self._run(functools.partial(self._one_cycle, ignore_pause))

    async def _run(self, body: Callable[[], Awaitable[int]]) -> int:
        # Signals first: a SIGTERM or SIGHUP while waiting for the database must be heard.
        signals = Signals(
            stop=self.stop, reload=self.reload, force=self._cycles.force, log=self._log
        )
        with signals:
            try:
                async with self._resources():
                    exit_status = await body()
                    await self._mark_stopped()
                    return exit_status
            except _StoppedEarly:
                return EX_OK
            except ConfigError as exc:
                self._log.error("config_error", error=str(exc))
                print(f"background-sync: {exc}", file=sys.stderr)  # as for a bad setting
                return EX_CONFIG
            except StoreError as exc:
                self._log.error("database_unavailable_at_start", error=str(exc))
                return EX_UNAVAILABLE
            finally:
                self._notifier.close()

    async def _mark_stopped(self) -> None:
        """Best effort, bounded: `status` then shows this instance as stopped, not idle."""
        if self._store is None:
            return
        try:
            async with asyncio.timeout(STOPPED_MARK_SECONDS):
                await self._db_runner(control.mark_stopped, self._store.db, instance=self.instance)
        except (StoreError, ConfigError, TimeoutError) as exc:
            self._log.warning("instance_stop_not_recorded", error=str(exc) or "timed out")

    async def _one_cycle(self, ignore_pause: bool) -> int:
        if not ignore_pause:
            assert self._store is not None
            self._apply_control(await self._db_runner(control.read, self._store.db))
            if self.switches.paused:
                self._log.warning("cycle_skipped", reason="once", detail="paused by an operator")
                print(
                    f"background-sync: {overview.pause_text(self.switches.row)}; nothing synced "
                    "(use --ignore-pause to run anyway)",
                    file=sys.stderr,
                )
                return EX_PAUSED
        watch = asyncio.create_task(self._watch_pause(ignore_pause), name="pause-watch")
        self._state = "idle"
        try:
            report = await self._cycles.run_now("once")
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if report.outcome == "paused":
            print(
                f"background-sync: {overview.pause_text(self.switches.row)}; stopped after "
                f"{report.succeeded} synced, {report.failed} failed",
                file=sys.stderr,
            )
            return EX_PAUSED
        if report.schema_error is not None:
            return EX_CONFIG
        if self._database_file_lost():
            return EX_IOERR
        if report.outcome == "crashed":
            return EX_TEMPFAIL
        return EX_OK if report.outcome == "succeeded" else EX_FAILED

    async def _watch_pause(self, ignore_pause: bool) -> None:
        """`once` heeds a pause that comes while it runs, as the daemon's control poll does."""
        assert self._store is not None
        while not ignore_pause:
            await asyncio.sleep(CONTROL_POLL_SECONDS)
            with contextlib.suppress(StoreError):  # the cycle itself reports the database
                self._apply_control(await self._db_runner(control.read, self._store.db))

    def stop(self, reason: str) -> None:
        """Ask the daemon to finish; idempotent, only sets events."""
        if not self._stop.is_set():
            self._log.info("shutdown_requested", reason=reason)
            self._stop.set()
            self._wake.set()
            if self._store is not None:
                self._store.db.closing.set()

    # -- resources -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _resources(self) -> AsyncIterator[None]:
        database = Database(engine_for(self.settings))
        status_runner: web.AppRunner | None = None
        try:
            await self._wait_for_database(database)
            await self._check_schema(database)
            users = await self._db_runner(schema.inspect_users, database.engine, self.settings)
            self._store = Store(
                database, users, instance=self.instance, lease_seconds=self.settings.lease_seconds
            )
            await self._advise_index(self._store)
            await self.measure_freshness(after_a_cycle=False)
            self._backend.open(self.settings)
            if self.settings.status_address is not None:
                status_runner, port = await statusweb.start(
                    self.settings.status_address, self.snapshot, self.metrics
                )
                self._log.info(
                    "status_server_started", address=f"{self.settings.status_address[0]}:{port}"
                )
            yield
        finally:
            if status_runner is not None:
                await status_runner.cleanup()
            await self._backend.close()
            await asyncio.to_thread(self._db_runner.close)
            self._control.close()  # the database thread has ended: no unit uses it now
            database.dispose()

    async def _advise_index(self, store: Store) -> None:
        """Say once, at start-up, when the due scan cannot use an index (and what to run)."""
        statement = await self._db_runner(
            store.index_advice,
            stale_before=self._clock.now() - timedelta(seconds=self.settings.stale_after_seconds),
            limit=self.settings.claim_batch_size,
        )
        self._log.info(
            "users_table_inspected",
            table=store.users.qualified_name,
            id_sent_as=store.users.id_kind.value,
            last_sync_storage=store.users.storage.value,
        )
        if statement is not None:
            self._log.warning(
                "users_index_missing",
                detail="each due page reads and sorts the whole users table",
                run=statement,
            )

    @staticmethod
    def _make_gate(settings: Settings) -> BackendGate:
        return BackendGate(
            threshold=settings.max_consecutive_failures,
            reset_seconds=settings.circuit_reset_seconds,
            max_per_second=settings.max_requests_per_second,
        )

    async def _wait_for_database(self, database: Database) -> None:
        """READY=1 waits for this: retry with backoff, then give up so systemd restarts us."""
        give_up = time.monotonic() + STARTUP_DATABASE_WAIT_SECONDS
        delay = 0.5
        while True:
            try:
                await self._db_runner(database.ping)
                self.metrics.database_up.set(1)
                return
            except StoreError as exc:
                self.metrics.database_up.set(0)
                refused = dberrors.configuration_problem(exc)
                if refused is not None:  # the same answer on every restart: exit 78
                    raise ConfigError(f"SYNC_DATABASE_URL: the server refused: {refused}") from exc
                if time.monotonic() + delay > give_up:
                    raise
                self._notifier.status(f"waiting for the database: {exc}")
                self._log.warning("database_waiting", error=str(exc), retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    raise _StoppedEarly from None
                delay = min(delay * 2, 10.0)

    async def _check_schema(self, database: Database) -> None:
        from daemon.database import has_daemon_tables

        present = await self._db_runner(has_daemon_tables, database.engine)
        revision = await self._db_runner(current_revision, database.engine) if present else None
        if revision is None:
            raise ConfigError(
                "SYNC_DATABASE_URL: the daemon's tables are missing; run `background-sync migrate`"
            )
        if revision != SCHEMA_REVISION:
            raise ConfigError(
                f"SYNC_DATABASE_URL: the daemon's tables are at revision {revision}, this "
                f"version needs {SCHEMA_REVISION}; run `background-sync migrate`"
            )

    # -- the main loop ---------------------------------------------------------------

    async def _serve(self) -> int:
        self._cycles.start_timer()
        await self._poll_control()  # a paused instance must not start even one cycle
        self._state = "idle"
        if self._cycles.may_start("startup"):
            self._cycles.launch("startup")
        side_tasks = Supervisor(self._side_task_gave_up)
        if self._notifier.watchdog_interval is not None:
            side_tasks.start("watchdog", self._watchdog_loop)
        side_tasks.start("control", self._control_loop)
        side_tasks.start("freshness", self._freshness_loop)
        self._notifier.ready(self.status_line())
        self._log.info(
            "daemon_ready",
            interval_s=self.settings.interval_seconds,
            concurrency=self.settings.concurrency,
            dry_run=self.settings.dry_run,
            watchdog_interval_s=self._notifier.watchdog_interval,
        )
        try:
            while not self._stop.is_set() and self._fatal is None:
                if self._database_file_lost():
                    break
                self._cycles.poll()
                if self._cycles.running is None and self._backend.has_retired:
                    await self._backend.close_retired()
                self._show()
                self._wake.clear()
                wait = scheduler.loop_wait(
                    cycle_running=self._cycles.running is not None,
                    until_tick=self._cycles.seconds_until_next(),
                    busy_every=LOOP_WAKE_SECONDS,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
            return await self._shut_down()
        finally:
            await side_tasks.close()

    def _side_task_gave_up(self, name: str, error: BaseException) -> None:
        """A side task kept failing: end with 70 so that systemd starts a clean process."""
        if self._fatal is None:
            self._fatal = EX_SOFTWARE
        self._wake.set()

    async def _shut_down(self) -> int:
        self._state = "stopping"
        if self._store is not None:
            # A fatal exit (the outage bound, a lost file) ends like a stop: each database
            # unit still tried once, none waited out with retries.
            self._store.db.closing.set()
        self._notifier.stopping(self.status_line())
        await self._cycles.wait()
        self._log.info("daemon_stopped", exit_status=self._fatal or EX_OK)
        return self._fatal or EX_OK

    def _database_file_lost(self) -> bool:
        """An SQLite file deleted or replaced under us: stop, exit 74, never sync blind.

        Writes to it are refused from that moment (database.SqliteFile); the daemon then
        drains like on SIGTERM and exits with EX_IOERR, so systemd's restart finds the
        missing tables and stops with 78 instead of syncing everyone again.
        """
        assert self._store is not None
        file = sqlite_file(self._store.db.engine)
        problem = file.problem() if file is not None else None
        if problem is None:
            return False
        if self._fatal != EX_IOERR:
            self._fatal = EX_IOERR
            self._log.error("database_file_lost", error=problem)
            print(f"background-sync: SYNC_DATABASE_URL: {problem}", file=sys.stderr)
            self.stop("database file lost")
        return True

    async def _control_loop(self) -> None:
        """Its own task, so a slow or absent database never holds up the main loop.

        Each poll then refreshes STATUS= and the health gauge and looks at the SQLite
        file, as the main loop does: between cycles the main loop sleeps until the tick.
        """
        while True:
            await asyncio.sleep(CONTROL_POLL_SECONDS)
            try:
                await self._poll_control()
            finally:
                if not self._database_file_lost():  # lost: it stops the daemon itself
                    self._show()

    async def _poll_control(self) -> None:
        """Publish this instance's state; read pause and force."""
        verdict = self.health()  # one verdict for the row's health and its reasons
        try:
            switches = await self._control.report(
                self._db_runner,
                self.store.db,
                instance=self.instance,
                now=self._clock.now(),
                state=self._public_state(),
                circuit=self.gate.state.value,
                status=self._shown or self.status_line(verdict),  # STATUS= as last sent
                bound_s=self.settings.lease_seconds,
                settings=self.settings,
                live=self._live(verdict),
                health=verdict.state.value,
            )
        except StoreError as exc:
            if self._health.database_down_since is None:
                self._log.warning("control_unavailable", error=str(exc))
            self._note_database(False)
            return
        self._note_database(True)
        if self._control.instances != self._census_shown:
            self._census_shown = self._control.instances
            self.metrics.show_instances(self._census_shown)
        self._apply_control(switches)

    def _live(self, verdict: health.Health) -> thresholds.Live:
        """The moment's facts `status` shows beside the thresholds (the instance row)."""
        cycle = self._cycles.running
        return thresholds.Live(
            in_flight=self.concurrency.in_flight,
            run_id=cycle.run_id if cycle is not None else None,
            next_cycle_in_s=None if cycle is not None else self._cycles.seconds_until_next(),
            probe_in_s=self.gate.probe_in(),
            health_reasons=verdict.reasons,
            concurrency=self.concurrency.limiter.as_dict(),
        )

    def _apply_control(self, row: control.Control) -> None:
        forced = self.switches.apply(row)
        self.metrics.paused.set(1 if row.paused else 0)
        if forced is not None:
            self._cycles.force(forced)

    def after_cycle(self, report: Report) -> None:
        """What a finished cycle means for the daemon: statistics, metrics, health."""
        self._health.stats.record(report, self._clock.now())
        self.metrics.record(report, time.time())
        if report.schema_error is not None:
            self._schema_refused(report.schema_error)
            return
        self._track_database(report)

    async def _freshness_loop(self) -> None:
        """Measure when no cycle has for an interval: the share keeps moving while paused."""
        while True:
            every = max(self.settings.interval_seconds, FRESHNESS_MIN_EVERY_SECONDS)
            await asyncio.sleep(every)
            latest = self._health.freshness.latest
            since = None if latest is None else self._clock.now() - latest.measured_at
            stale = since is None or not 0 <= since.total_seconds() < every  # or stepped back
            if self._cycles.running is None and stale:
                await self.measure_freshness(after_a_cycle=False)

    async def measure_freshness(self, *, after_a_cycle: bool) -> None:
        """Measure how fresh the users are (once per cycle and at start-up).

        A failed measurement keeps the last one: it is a view, and the cycle that just
        ran reports database trouble on its own account.
        """
        s = self.settings
        begin = time.monotonic()
        try:
            found = await self._db_runner(
                self.store.freshness,
                target_s=s.freshness_target_s,
                objective=s.freshness_objective,
                quarantine_after=s.quarantine_after,
                now=self._clock.now(),
                hint=self._health.freshness.latest,
            )
        except (StoreError, ConfigError) as exc:
            self._log.warning("freshness_not_measured", error=str(exc))
            return
        took_ms = round((time.monotonic() - begin) * 1000, 1)  # the measurement alone
        crossed = self._health.freshness.record(found, after_a_cycle=after_a_cycle)
        self.metrics.show_freshness(found)
        await self._show_due()
        self._log.info(
            "freshness_measured",
            fresh_ratio=round(found.fresh_ratio, 6),
            users=found.users,
            overdue=found.overdue,
            never_synced=found.never_synced,
            quarantined=found.quarantined,
            oldest_overdue_s=None
            if found.oldest_overdue_s is None
            else round(found.oldest_overdue_s, 1),
            duration_ms=took_ms,
        )
        if crossed is not None:
            level = self._log.info if crossed == "freshness_objective_met" else self._log.warning
            level(
                crossed,
                fresh_ratio=round(found.fresh_ratio, 6),
                objective=found.objective,
                overdue=found.overdue,
            )

    async def _show_due(self) -> None:
        """Users a cycle would claim now, for the metrics (with each freshness measurement)."""
        now = self._clock.now()
        stale_before = now - timedelta(seconds=self.settings.stale_after_seconds)
        try:
            due = await self._db_runner(self.store.count_due, now=now, stale_before=stale_before)
        except (StoreError, ConfigError) as exc:
            self._log.warning("due_not_counted", error=str(exc))
            return
        self.metrics.show_due(due)

    def cycle_crashed(self, error: BaseException) -> None:
        """A bug, not a backend or database fault: let systemd restart a clean process."""
        self._log.error("cycle_crashed", error=repr(error), exc_info=error)
        self._fatal = EX_FAILED

    def _schema_refused(self, error: str) -> None:
        """The users table no longer fits the configuration: stop with EX_CONFIG.

        The cycle has already drained and released its leases. Restarting would fail the
        same way, so the exit status is 78, which the unit does not restart.
        """
        self._health.schema_problem = error
        self._log.error(
            "schema_error",
            error=error,
            detail="the users table does not match the configuration; exiting with 78",
        )
        print(f"background-sync: SYNC_USERS_TABLE: {error}", file=sys.stderr)
        self._fatal = EX_CONFIG
        self._wake.set()

    def _track_database(self, report: Report) -> None:
        cycle = self._cycles.running
        ok = report.outcome != "crashed" and not (cycle and cycle.degraded)
        self._note_database(ok)
        if not ok and self._fatal is None and not self._stop.is_set():
            # Try again soon rather than a whole interval later; the outage bound ends this.
            retry_in = min(self.settings.interval_seconds, DATABASE_RETRY_SECONDS)
            self._cycles.request_later(retry_in, "database_retry")

    def _note_database(self, ok: bool) -> None:
        """One account of database health, from cycles and the control poll alike.

        A database that stays away past SYNC_DATABASE_OUTAGE_SECONDS ends the process
        with status 75, so systemd restarts it: degraded for a while, never a spin.
        """
        self.metrics.database_up.set(1 if ok else 0)
        limit = self.settings.database_outage_seconds
        if self._health.database(ok, outage_limit_s=limit) and self._fatal is None:
            self._log.error(
                "database_outage_limit",
                limit_s=limit,
                detail="exiting so that systemd restarts the daemon",
            )
            self._fatal = EX_TEMPFAIL
            self._wake.set()

    async def _watchdog_loop(self) -> None:
        """Feed systemd's watchdog from the loop that does the work, only while it works."""
        interval = self._notifier.watchdog_interval
        if interval is None:
            return
        withheld: str | None = None
        while True:
            await asyncio.sleep(interval)
            stalled = self._control.watch.overdue()
            cycle = self._cycles.running
            if stalled is None and cycle is not None:
                stalled = cycle.progress.overdue()
            if stalled is not None:
                if withheld != stalled:
                    self._log.error("watchdog_withheld", stalled_on=stalled)
                withheld = stalled
                continue
            withheld = None
            self._notifier.watchdog()

    # -- signals and reload ----------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: re-read the environment and env file; a bad file changes nothing."""
        self._notifier.reloading()
        try:
            fresh = settings_module.load(self._source.read())
        except ConfigError as exc:
            self._log.error("reload_rejected", error=str(exc))
            self._notifier.reloaded()
            return
        kept = {name: getattr(self.settings, name) for name in RESTART_ONLY}
        ignored = [name for name in RESTART_ONLY if getattr(fresh, name) != kept[name]]
        if ignored:
            self._log.warning("reload_needs_restart", settings=ignored)
        fresh = dataclasses.replace(fresh, **kept)
        old, self.settings = self.settings, fresh
        logs.configure(
            fresh.log_level,
            fresh.log_format,
            secrets=[fresh.backend_token.reveal()] if fresh.backend_token else [],
        )
        if fresh.interval_seconds != old.interval_seconds:
            self._cycles.reschedule(fresh.interval_seconds)
        self.gate.configure(
            threshold=fresh.max_consecutive_failures,
            reset_seconds=fresh.circuit_reset_seconds,
            max_per_second=fresh.max_requests_per_second,
        )
        self.concurrency.configure(fresh)
        self.metrics.show_concurrency(self.concurrency.limiter)  # the maximum may change
        if self._backend.client is not None:
            # A running cycle keeps the old client; the session closes after it ends.
            self._backend.open(fresh)
        changed = sorted(
            f.name
            for f in dataclasses.fields(Settings)
            if f.compare and getattr(old, f.name) != getattr(fresh, f.name)
        )
        self._log.info("config_reloaded", changed=changed)
        self._notifier.reloaded()
        self._wake.set()

    # -- what operators see ----------------------------------------------------------

    def _public_state(self) -> str:
        """The state every view shows: syncing while a cycle runs; a pause outranks both."""
        state = self._state
        if state == "idle" and self._cycles.running is not None:
            state = "syncing"
        if self.switches.paused and state in ("idle", "syncing"):
            return "paused"
        return state

    def _show(self) -> None:
        """STATUS= and the health gauge as they are now, from one health verdict."""
        verdict = self.health()
        self._shown = self.status_line(verdict)
        self._notifier.status(self._shown)  # sent only when the text changed
        self._show_health(verdict.state.value)

    def _show_health(self, state: str) -> None:
        """The health gauge, set only when its state changes (the poll shows it each time)."""
        if state != self._health_shown:
            self._health_shown = state
            self.metrics.show_health(state)

    def status_line(self, verdict: health.Health | None = None) -> str:
        """STATUS=, the instances row and /status: the health first, unless healthy."""
        verdict = verdict or self.health()
        activity = self._activity()
        if verdict.state is health.HealthState.HEALTHY or not verdict.reasons:
            return activity
        if verdict.state is health.HealthState.STOPPED:
            return "stopping"
        return f"{verdict.state.value}: {'; '.join(verdict.reasons)}; {activity}"[:250]

    def _activity(self) -> str:
        """What the daemon is doing: paused, starting, syncing n of m, idle until the next."""
        cycle = self._cycles.running
        if self._public_state() == "paused":
            paused = overview.pause_text(self.switches.row)
            if cycle is not None:
                return f"{paused}, finishing {cycle.in_flight} call(s) in flight"
            return f"{paused}, next cycle on resume"
        if self._state in ("stopping", "starting"):
            return self._state
        if cycle is not None:
            line = cycle.progress.status_line()
            if self.concurrency.limit < self.settings.concurrency:
                line += f", concurrency {self.concurrency.limit} of {self.settings.concurrency}"
            return line
        next_in = ages.span(self._cycles.seconds_until_next() or 0)
        measured = self._health.freshness.latest
        fresh = f"{freshness.headline(measured)}, " if measured is not None else ""
        line = f"idle, {fresh}next cycle in {next_in}"
        last = self._cycles.last_report
        if last is not None and last.failed:
            line += f", last cycle failed {last.failed}"
        return line

    def facts(self) -> health.Facts:
        """What the daemon's health is decided from, as it is now."""
        cycle = self._cycles.running
        stalled = self._control.watch.overdue() or (cycle.progress.overdue() if cycle else None)
        return self._health.facts(
            stopping=self._state == "stopping" or self._stop.is_set(),
            circuit=self.gate.state.value,
            probe_in_s=self.gate.probe_in() or 0.0,
            stalled_on=stalled,
            failing_now=bool(cycle and cycle.degraded),
        )

    def health(self) -> health.Health:
        """The one health every view shows."""
        return health.assess(self.facts())

    def snapshot(self) -> dict[str, Any]:
        verdict = self.health()
        self._show_health(verdict.state.value)
        cycle = self._cycles.running
        last = self._cycles.last_report
        return {
            "instance": self.instance,
            "state": self._public_state(),
            "status": self.status_line(),
            "paused": self.switches.paused,
            "paused_by": self.switches.row.updated_by if self.switches.paused else None,
            "paused_at": self.switches.row.paused_at.isoformat()
            if self.switches.paused and self.switches.row.paused_at
            else None,
            "health": verdict.state.value,
            "health_reasons": list(verdict.reasons),
            "statistics": self._health.statistics(),
            "freshness": None
            if self._health.freshness.latest is None
            else self._health.freshness.latest.as_dict(),
            "cycle": None
            if cycle is None
            else {
                "run_id": cycle.run_id,
                "due": cycle.progress.total,
                "claimed": cycle.progress.claimed,
                "done": cycle.progress.done,
                "succeeded": cycle.progress.succeeded,
                "failed": cycle.progress.failed,
                "skipped": cycle.progress.skipped,
            },
            "last_cycle": dataclasses.asdict(last) if last else None,
            "next_cycle_in_s": self._cycles.seconds_until_next(),
            "concurrency": self.concurrency.as_dict(),
            "settings": self.settings.redacted(),
        }
