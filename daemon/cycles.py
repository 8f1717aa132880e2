"""What starts a cycle, and what is left of the last one.

The timer (`schedule`), an operator's force, a circuit probe and a retry after a database
error all ask here; at most one cycle runs at a time, and a request while one runs is
skipped and logged, never queued or overlapped. This object keeps the running cycle, the
last report, and the results the database did not take in time (carried into the next
cycle). The app owns the resources and decides what a finished cycle means for the
daemon's health (`CycleHost.after_cycle`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

from daemon import control
from daemon.backend import BackendClient
from daemon.concurrency import Concurrency
from daemon.cycle import Clock, Cycle, DbRunner, dry_run
from daemon.errors import StoreError
from daemon.metrics import Metrics
from daemon.resilience import BackendGate
from daemon.scheduler import Scheduler
from daemon.settings import Settings
from daemon.store import Store
from daemon.values import Report, Result

FORCE_COOLDOWN_SECONDS = 10.0
# Runs and instances silent for this long are cleaned up as abandoned.
ABANDONED_AFTER = timedelta(minutes=10)
PRUNE_EVERY_SECONDS = 3600.0
PROBE_MARGIN_SECONDS = 0.05


class CycleHost(Protocol):
    """What a cycle needs from the app that runs it."""

    settings: Settings
    metrics: Metrics

    @property
    def store(self) -> Store: ...
    @property
    def client(self) -> BackendClient: ...
    @property
    def db_runner(self) -> DbRunner: ...
    @property
    def stop_event(self) -> asyncio.Event: ...
    @property
    def wake(self) -> asyncio.Event: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def gate(self) -> BackendGate: ...
    @property
    def concurrency(self) -> Concurrency: ...
    @property
    def switches(self) -> control.Switches: ...

    def after_cycle(self, report: Report) -> None: ...
    async def measure_freshness(self, *, after_a_cycle: bool) -> None: ...
    def cycle_crashed(self, error: BaseException) -> None: ...


class Cycles:
    """Starts cycles on request, one at a time; keeps the running one and the last report."""

    def __init__(
        self,
        host: CycleHost,
        log: Any,
        *,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host = host
        self._log = log
        self._rng = rng or random.Random()
        self._monotonic = monotonic
        self.scheduler: Scheduler | None = None
        self.current: Cycle | None = None
        self.task: asyncio.Task[Report] | None = None
        self.last_report: Report | None = None
        self._wanted: str | None = None
        self._carry: tuple[Result, ...] = ()
        self._probe_timer: asyncio.TimerHandle | None = None
        self._last_forced = -FORCE_COOLDOWN_SECONDS
        self._prune_due = 0.0

    # -- what the app reads ---------------------------------------------------------

    @property
    def running(self) -> Cycle | None:
        """The cycle in progress, if one is (a task beside the loop, or `once`'s)."""
        return self.current

    def seconds_until_next(self) -> float | None:
        return self.scheduler.seconds_until_next() if self.scheduler else None

    # -- requests -------------------------------------------------------------------

    def start_timer(self) -> None:
        self.scheduler = Scheduler(self._host.settings.interval_seconds, self._on_tick)

    def reschedule(self, interval: float) -> None:
        if self.scheduler is not None:
            self.scheduler.reschedule(interval)

    def request(self, reason: str) -> None:
        """Ask for a cycle now. One already running is never overlapped."""
        if self.task is not None:
            self._log.info("cycle_tick_skipped", reason=reason, detail="a cycle is running")
            self._host.metrics.ticks_skipped.inc()
            return
        self._wanted = reason
        self._host.wake.set()

    def request_later(self, delay: float, reason: str) -> None:
        asyncio.get_running_loop().call_later(delay, self.request, reason)

    def force(self, reason: str) -> None:
        """A forced cycle, debounced so that a burst of requests starts one cycle."""
        now = self._monotonic()
        if self.task is None and now - self._last_forced < FORCE_COOLDOWN_SECONDS:
            self._log.info("force_debounced", reason=reason)
            return
        if self.task is None:
            self._last_forced = now  # only a force that starts a cycle opens the cooldown
        self.request(reason)

    def poll(self) -> None:
        """From the main loop: fire the timer if due, start what was asked for."""
        reason = self.next_start()
        if reason is not None:
            self.launch(reason)

    def next_start(self) -> str | None:
        """The reason a cycle should start now, or None: the decision, apart from running.

        A request waits while a cycle runs; a pause or an open circuit refuses it (and a
        refused probe is scheduled again for when the circuit may close).
        """
        if self.scheduler is not None:
            self.scheduler.poll()
        if self._wanted is None or self.task is not None:
            return None
        reason, self._wanted = self._wanted, None
        return reason if self.may_start(reason) else None

    def _on_tick(self) -> None:
        self.request("schedule")

    def may_start(self, reason: str) -> bool:
        """Paused instances and an open circuit start no cycle (and say so)."""
        log = self._log
        if self._host.switches.paused:
            log.info("cycle_skipped", reason=reason, detail="paused by an operator")
            return False
        wait = self._host.gate.probe_in()
        if wait:
            log.info(
                "cycle_skipped", reason=reason, detail="circuit open", probe_in_s=round(wait, 1)
            )
            self._schedule_probe(wait)
            return False
        return True

    def _schedule_probe(self, delay: float) -> None:
        """One probe cycle at the breaker's reset time (a later call moves it, never adds)."""
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        loop = asyncio.get_running_loop()
        self._probe_timer = loop.call_later(
            delay + PROBE_MARGIN_SECONDS, self.request, "circuit_probe"
        )

    # -- running --------------------------------------------------------------------

    def launch(self, reason: str) -> None:
        """Start a cycle as a task beside the main loop."""
        self.current = self._new(reason)  # at once, so STATUS= never shows the last one
        task = asyncio.create_task(self._run(), name="cycle")
        self.task = task
        task.add_done_callback(self._ended)

    async def run_now(self, reason: str) -> Report:
        """Run one cycle to its end (`once`)."""
        self.current = self._new(reason)
        return await self._run()

    async def wait(self) -> None:
        """Until the running cycle, if any, has ended (its errors are reported elsewhere)."""
        if self.task is not None:
            await asyncio.wait([self.task])

    def _new(self, reason: str) -> Cycle:
        host = self._host
        settings = host.settings
        jittered = reason in ("startup", "schedule")
        cycle = Cycle(
            settings,
            host.store,
            host.client,
            host.db_runner,
            stop=host.stop_event,
            clock=host.clock,
            carry=self._carry,
            start_delay=self._rng.uniform(0, settings.jitter_seconds) if jittered else 0.0,
            paused=lambda: host.switches.paused,
            concurrency=host.concurrency,
        )
        self._carry = ()
        self._log.info("cycle_requested", reason=reason, run_id=cycle.run_id)
        return cycle

    async def _run(self) -> Report:
        cycle, host = self.current, self._host
        assert cycle is not None
        host.metrics.cycle_starting(host.clock.now())
        try:
            try:
                if host.settings.dry_run:
                    report = await self._dry(cycle)
                else:
                    with cycle.progress.bounded(host.settings.lease_seconds, "housekeeping"):
                        await self._housekeeping()
                    report = await cycle.run()
            finally:
                host.metrics.in_cycle.set(0)
            self.last_report = report
            self._carry = report.unrecorded
            host.after_cycle(report)  # still `running`: the host may read the cycle
            # Not after a database failure: the measurement would only wait out the same
            # outage (the freshness timer measures again once it is over).
            measurable = report.outcome != "crashed" and report.schema_error is None
            if measurable and not host.stop_event.is_set():
                await host.measure_freshness(after_a_cycle=True)
            probe_in = host.gate.probe_in()
            stopping = host.stop_event.is_set()
            if probe_in is not None and not stopping and report.schema_error is None:
                self._schedule_probe(probe_in)
            return report
        finally:
            self.current = None

    async def _dry(self, cycle: Cycle) -> Report:
        """SYNC_DRY_RUN: log who would be synced; call nothing, write nothing."""
        host = self._host
        begin = time.monotonic()
        due = await dry_run(host.settings, host.store, host.db_runner, host.clock)
        return Report(
            run_id=cycle.run_id,
            outcome="succeeded",
            claimed=due,
            succeeded=0,
            failed=0,
            skipped=due,
            duration_s=round(time.monotonic() - begin, 3),
        )

    async def _housekeeping(self) -> None:
        """Before a cycle: record what crashed instances left, prune old history."""
        host, log = self._host, self._log
        now = host.clock.now()
        try:
            cleaned = await host.db_runner(
                control.cleanup, host.store.db, now=now, stale_after=ABANDONED_AFTER
            )
            if cleaned.leases or cleaned.runs or cleaned.instances:
                log.warning(
                    "abandoned_work_cleaned",
                    leases=cleaned.leases,
                    runs=cleaned.runs,
                    instances=cleaned.instances,
                )
            if time.monotonic() >= self._prune_due:
                self._prune_due = time.monotonic() + PRUNE_EVERY_SECONDS
                keep = timedelta(days=host.settings.history_days)
                pruned = await host.db_runner(host.store.prune_history, before=now - keep)
                if pruned:
                    log.info("history_pruned", operations=pruned)
        except StoreError as exc:
            log.warning("housekeeping_failed", error=str(exc))

    def _ended(self, task: asyncio.Task[Report]) -> None:
        self.task = None
        self._host.wake.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._host.cycle_crashed(exc)
