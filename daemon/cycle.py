"""One sync cycle: claim due users page by page, call the backend, record the outcomes.

Three kinds of task share the work: a claimer that leases pages of due users ahead of
need, SYNC_CONCURRENCY callers that each take one user at a time (at most the adaptive
limit of them calling at once, see `daemon.concurrency`), and a recorder that writes
finished results in batches. A heartbeat renews the leases while this runs. The
database runs on a single worker thread (see `DbRunner`), so the event loop never blocks
on it and SQLite never sees two writers from one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from daemon import backlog
from daemon.backend import BackendClient
from daemon.backlog import DONE, Backlog
from daemon.concurrency import Concurrency, dropped
from daemon.ending import Ending, Tally, decide
from daemon.errors import SchemaError, StoreError
from daemon.logs import get_logger
from daemon.progress import Progress
from daemon.recorder import Recorder
from daemon.settings import Settings
from daemon.store import Cursor, RunCounts, Store, new_run_id
from daemon.values import Claim, Outcome, Report, Result

P = ParamSpec("P")
T = TypeVar("T")


class DbRunner:
    """Runs blocking store calls on one dedicated thread, off the event loop."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db")

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Clock:
    """Wall time for what is stored, monotonic time for what is measured."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class Cycle:
    """One run over every due user. Create, `await run()`, read the Report."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: BackendClient,
        db: DbRunner,
        *,
        stop: asyncio.Event,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        progress: Progress | None = None,
        carry: tuple[Result, ...] = (),
        start_delay: float = 0.0,
        paused: Callable[[], bool] = lambda: False,
        concurrency: Concurrency | None = None,
    ) -> None:
        self.settings = settings
        self.run_id = new_run_id()
        self.progress = progress or Progress()
        self._store = store
        self._client = client
        self._db = db
        self._stop = stop
        self._clock = clock or Clock()
        self._queue = Backlog(
            room=backlog.room(settings.claim_batch_size, settings.concurrency, None)
        )
        self._call_seconds: float | None = None  # a moving average: how far ahead to lease
        self._start_delay = start_delay
        self._paused = paused
        # The instance's limit (it outlives the cycle); a fixed one when none is given.
        self._slots = concurrency or Concurrency(
            dataclasses.replace(settings, adaptive_concurrency=False)
        )
        self._ending = Ending()
        self._log = get_logger(run_id=self.run_id)
        self._results = Recorder(
            settings,
            store,
            self._bounded_db,
            now=self._clock.now,
            log=self._log,
            carry=carry,
            rng=rng,
        )
        self._claim_error: StoreError | None = None
        self._busy = 0
        self._claiming_done = False
        self._idle = asyncio.Event()
        self._recorder: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        """The database does not take this cycle's writes right now."""
        return self._results.degraded

    async def run(self) -> Report:
        if self._start_delay > 0:
            # Jitter: instances restarted together must not all claim at the same instant.
            with (
                self.progress.bounded(self._start_delay, "start jitter"),
                contextlib.suppress(TimeoutError),
            ):
                await asyncio.wait_for(self._stop.wait(), self._start_delay)
        started = self._clock.now()
        start_mono = self._clock.monotonic()
        claims_before = (self._store.claim_transactions, self._store.claims_contended)
        stale_before = started - timedelta(seconds=self.settings.stale_after_seconds)
        error: str | None = None
        bug: Exception | None = None
        try:
            due: int | None = None
            with contextlib.suppress(StoreError):
                due = await self._bounded_db(
                    "count_due", self._store.count_due, now=started, stale_before=stale_before
                )
                self.progress.total = due
            await self._bounded_db(
                "start_run", self._store.start_run, self.run_id, now=started, due=due
            )
            self._log.info("cycle_started", due=self.progress.total)
            await self._work(stale_before)
        except SchemaError as exc:
            # Not an outage: retrying cannot help, the configuration or schema must change.
            error = self._ending.schema_error = str(exc)
            self._log.error("cycle_schema_error", error=error)
        except StoreError as exc:
            error = str(exc)
            self._results.degrade(exc)
            self._log.error("cycle_database_error", error=error)
        except Exception as exc:
            # A bug. The run row still gets its outcome (never left "running"), then the
            # error surfaces to the app, which ends the process for systemd to restart.
            bug = exc
            error = f"{type(exc).__name__}: {exc}"
        finally:
            await asyncio.shield(self._wind_down())
        report = await self._report(start_mono, error, claims_before)
        if bug is not None:
            raise bug
        return report

    async def _work(self, stale_before: datetime) -> None:
        workers = [
            asyncio.create_task(self._call_loop(), name=f"caller-{i}")
            for i in range(self.settings.concurrency)
        ]
        claimer = asyncio.create_task(self._claim_loop(stale_before), name="claimer")
        takeover = asyncio.create_task(self._takeover_loop(stale_before), name="takeover")
        recorder = asyncio.create_task(self._results.loop(), name="recorder")
        self._recorder = recorder
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="lease-heartbeat")
        stop_wait = asyncio.create_task(self._stop.wait(), name="stop-wait")
        all_done = asyncio.gather(claimer, *workers)
        try:
            side_tasks = (recorder, heartbeat, takeover)
            watched: list[asyncio.Future[Any]] = [all_done, stop_wait, *side_tasks]
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if all_done.done() and not all_done.cancelled() and all_done.exception():
                raise all_done.exception()  # type: ignore[misc]  # a caller died: a bug
            for side_task in side_tasks:
                if side_task.done():  # they loop until told to stop: ending is a bug
                    side_task.result()
                    raise RuntimeError(f"{side_task.get_name()} ended unexpectedly")
            if self._stop.is_set():
                await self._drain(workers)
            elif self._claim_error is not None:
                raise self._claim_error
        finally:
            for task in (claimer, stop_wait, *workers):
                task.cancel()
            await asyncio.gather(all_done, stop_wait, return_exceptions=True)
            heartbeat.cancel()
            takeover.cancel()
            await asyncio.gather(heartbeat, takeover, return_exceptions=True)
            # Never cancel the recorder: a batch write it started commits in the database
            # thread regardless, and must be accounted for exactly once.
            self._results.close()

    async def _drain(self, workers: list[asyncio.Task[None]]) -> None:
        """Stop requested: give in-flight calls the grace period, then cut them."""
        in_flight = [w for w in workers if not w.done()]
        self._log.info("cycle_draining", in_flight=len(in_flight))
        if in_flight:
            _, late = await asyncio.wait(in_flight, timeout=self.settings.shutdown_grace_seconds)
            if late:
                self._log.warning("cycle_drain_timeout", cancelled=len(late))

    async def _claim_loop(self, stale_before: datetime) -> None:
        """Lease pages until none is left; then tell every caller there is no more."""
        cursor = Cursor()
        try:
            while not self._stop.is_set() and self._ending.halt is None:
                if self._paused() and not cursor.done:
                    self._note_pause()
                    break
                # Lease only what fits: a lease claimed ahead of need is a user another
                # instance sharing the database could be calling now.
                free = await self._queue.wait_for_room(self._queue.room // 2)
                claims = await self._claim(cursor, stale_before, limit=free)
                if cursor.done and not claims:
                    break
            # Our calls still run; the takeover task may add orphans meanwhile.
            await self._wait_idle()
        except StoreError as exc:
            # Users already claimed are still called; the cycle then ends as crashed.
            self._claim_error = exc
        self._claiming_done = True
        for _ in range(self.settings.concurrency):
            self._queue.put_done()

    async def _claim(
        self,
        cursor: Cursor,
        stale_before: datetime,
        orphans: bool = False,
        limit: int | None = None,
    ) -> int:
        claims = await self._bounded_db(
            "claim",
            self._store.claim,
            cursor,
            min(limit or self.settings.claim_batch_size, self.settings.claim_batch_size),
            run_id=self.run_id,
            now=self._clock.now(),
            stale_before=stale_before,
            orphans=orphans,
        )
        if self._claiming_done:
            return 0  # too late for this cycle: release_all gives these leases back
        self.progress.claimed += len(claims)
        for claim in claims:
            if orphans:
                self._queue.put_urgent(claim)
            else:
                await self._queue.put(claim)
        return len(claims)

    async def _takeover_loop(self, stale_before: datetime) -> None:
        """Take over users whose lease expired under another instance (one that crashed),
        during this cycle rather than the next: every quarter lease, while the cycle runs."""
        while True:
            await asyncio.sleep(max(0.5, self.settings.lease_seconds / 4))
            if self._ending.halt is not None or self._paused():
                continue
            try:
                taken = await self._claim(Cursor(), stale_before, orphans=True)
            except StoreError as exc:
                self._results.degrade(exc)
                continue
            if taken:
                self._log.warning("orphaned_leases_taken_over", count=taken)

    async def _wait_idle(self) -> None:
        """Until no call runs and none is queued, or stop."""
        while (self._busy or not self._queue.empty()) and not self._stop.is_set():
            self._idle.clear()
            waits = [
                asyncio.ensure_future(self._stop.wait()),
                asyncio.ensure_future(self._idle.wait()),
            ]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()

    async def _call_loop(self) -> None:
        while True:
            claim = await self._queue.get()
            if claim is DONE or self._stop.is_set():
                return
            # When halted, keep draining the queue so that the claimer never blocks; the
            # lease of a claim skipped here is given back by release_all at the end.
            if self._ending.halt is not None:
                pass
            elif self._paused():
                self._release_for_pause(claim)
            else:
                started = await self._slots.acquire()  # at most `limit` calls in flight
                self._busy += 1
                verdict: tuple[bool, bool] | None = None
                try:
                    if self._stop.is_set():
                        return  # stopped while waiting for a slot: release_all gives it back
                    if self._paused():
                        self._release_for_pause(claim)  # paused while it waited for a slot
                    else:
                        verdict = await self._call(claim)
                finally:
                    self._busy -= 1
                    self._slots.release(
                        started,
                        dropped=None if verdict is None else verdict[0],
                        latency_counts=verdict is not None and verdict[1],
                    )
            if not self._busy and self._queue.empty():
                self._idle.set()

    async def _call(self, claim: Claim) -> tuple[bool, bool]:
        """Call, count, log and queue the result; return (dropped, latency counts) for the
        concurrency limit."""
        begin = self._clock.monotonic()
        try:
            outcome = await self._client.sync_user(
                claim, run_id=self.run_id, progress=self.progress
            )
        except asyncio.CancelledError:
            self._results.add(
                Result(
                    claim,
                    Outcome.RELEASED,
                    self._clock.now(),
                    error="cancelled by shutdown",
                    run_id=self.run_id,
                )
            )
            raise
        duration_ms = round((self._clock.monotonic() - begin) * 1000)
        self._follow_call_time(duration_ms / 1000)
        kind = outcome.outcome
        if outcome.circuit_open:
            self._ending.circuit_open = True
            self._halt_cycle("circuit open: the backend is failing")
        if outcome.auth_problem:
            # Credentials are not this user's fault: record no failure against them.
            kind = Outcome.RELEASED
            self._halt_cycle("the backend rejected our credentials")
        result = Result(
            claim,
            kind,
            self._clock.now(),
            http_status=outcome.status,
            attempts=outcome.attempts,
            error=outcome.error,
            duration_ms=duration_ms,
            run_id=self.run_id,
            backoff_at_least=outcome.hold_seconds,
        )
        self._count(result)
        self._log_result(result, outcome.counts, outcome.auth_problem)
        self._results.add(result)
        drop = dropped(kind, outcome.status, outcome.attempts, outcome.circuit_open)
        return drop, outcome.attempts == 1 and not outcome.circuit_open

    def _follow_call_time(self, seconds: float) -> None:
        """Lease about a second of calls ahead (daemon.backlog.room), as calls now take."""
        mean = self._call_seconds
        self._call_seconds = seconds if mean is None else 0.9 * mean + 0.1 * seconds
        settings = self.settings
        self._queue.resize(
            backlog.room(settings.claim_batch_size, settings.concurrency, self._call_seconds)
        )

    @property
    def in_flight(self) -> int:
        """Backend calls running now (STATUS= while a pause lets them finish)."""
        return self._busy

    def _note_pause(self) -> None:
        if not self._ending.paused:
            self._ending.paused = True
            self._log.warning(
                "cycle_paused",
                detail="paused by an operator: calls in flight finish, the rest is released",
                in_flight=self._busy,
            )

    def _release_for_pause(self, claim: Claim) -> None:
        """Paused: this claim is not called. Its lease goes back with the next batch, and
        nothing is held against the user (RELEASED decides nothing), so it is due again
        as soon as syncing resumes."""
        self._note_pause()
        self._ending.released_for_pause += 1
        result = Result(
            claim,
            Outcome.RELEASED,
            self._clock.now(),
            error="paused by an operator",
            run_id=self.run_id,
        )
        self._count(result)
        self._results.add(result)

    def _halt_cycle(self, reason: str) -> None:
        """Stop calling for the rest of this cycle; in-flight calls still finish."""
        if self._ending.halt_for(reason):
            self._log.error("cycle_halted", reason=reason)

    def _count(self, result: Result) -> None:
        p = self.progress
        p.done += 1
        if result.outcome is Outcome.SUCCESS:
            p.succeeded += 1
        elif result.outcome is Outcome.FAILED:
            p.failed += 1
        else:
            p.skipped += 1

    def _log_result(self, result: Result, counts: Any, auth_problem: bool) -> None:
        fields = {
            "user_id": result.claim.user_id,
            "attempt": result.attempts,
            "status": result.http_status,
            "duration_ms": result.duration_ms,
        }
        if result.outcome is Outcome.SUCCESS:
            self._log.info("user_synced", **fields, **({"result": counts} if counts else {}))
        elif result.outcome is Outcome.CONFLICT:
            self._log.info("user_sync_conflict", **fields)
        elif result.outcome is Outcome.RELEASED and not auth_problem:
            # Never called (the circuit opened while it waited at the gate): nothing is
            # held against the user, and the counts call it skipped, so the log does too.
            self._log.info("user_sync_skipped", **fields, reason=result.error)
        elif auth_problem:
            if not self._ending.auth_rejected:
                self._ending.auth_rejected = True
                self._log.error("backend_auth_rejected", **fields, error=result.error)
        elif result.backoff_at_least:
            self._log.warning(
                "user_sync_failed",
                **fields,
                error=result.error,
                circuit_probe=True,
                held_s=round(result.backoff_at_least),
                detail="this call was the circuit's probe; the user waits past the next one",
            )
        else:
            self._log.warning("user_sync_failed", **fields, error=result.error)

    async def _heartbeat_loop(self) -> None:
        interval = max(0.5, self.settings.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._bounded_db(
                    "heartbeat",
                    self._store.heartbeat,
                    self.run_id,
                    now=self._clock.now(),
                    counts=self._counts(),
                )
            except StoreError as exc:
                self._results.degrade(exc)

    def _counts(self) -> RunCounts:
        """The progress so far, for the run row (the heartbeat writes it)."""
        p = self.progress
        return RunCounts(
            due=max(p.total, p.claimed) if (p.total or p.claimed) else None,
            claimed=p.claimed,
            succeeded=p.succeeded,
            failed=p.failed,
            skipped=p.skipped,
        )

    async def _wind_down(self) -> None:
        """Record what finished, give back what did not, close the run row."""
        if self._recorder is not None:
            await asyncio.wait([self._recorder])
        deadline = self._clock.monotonic() + max(self.settings.shutdown_grace_seconds, 5.0)
        refused = await self._results.drain(lambda: self._clock.monotonic() >= deadline)
        self._ending.schema_error = self._ending.schema_error or refused
        pending = self._results.pending
        if pending:
            self._log.error("results_not_recorded", count=len(pending))
        try:
            keep = [r.claim.token for r in pending]
            released = await self._bounded_db("release_all", self._store.release_all, keep=keep)
            if released:
                self._log.info("leases_released", count=released)
        except StoreError as exc:
            self._log.error("leases_not_released", error=str(exc))

    async def _report(
        self, start_mono: float, error: str | None, claims_before: tuple[int, int]
    ) -> Report:
        p, ending = self.progress, self._ending
        tally = Tally(
            claimed=p.claimed,
            done=p.done,
            failed=p.failed,
            unrecorded=len(self._results.pending),
            stopped=self._stop.is_set(),
        )
        outcome, error = decide(ending, tally, error)
        report = Report(
            run_id=self.run_id,
            outcome=outcome,
            claimed=p.claimed,
            succeeded=p.succeeded,
            failed=p.failed,
            skipped=p.skipped,
            duration_s=round(self._clock.monotonic() - start_mono, 3),
            error=error,
            circuit_open=ending.circuit_open,
            schema_error=ending.schema_error,
            auth_rejected=ending.auth_rejected,
            unrecorded=tuple(self._results.pending),
        )
        try:
            await self._bounded_db(
                "finish_run",
                self._store.finish_run,
                self.run_id,
                now=self._clock.now(),
                outcome=outcome,
                claimed=p.claimed,
                succeeded=p.succeeded,
                failed=p.failed,
                skipped=p.skipped,
                error=error,
            )
        except StoreError as exc:
            self._log.error("run_not_recorded", error=str(exc))
        log = self._log.info if outcome == "succeeded" else self._log.warning
        log(
            "cycle_finished",
            outcome=outcome,
            claimed=p.claimed,
            succeeded=p.succeeded,
            failed=p.failed,
            skipped=p.skipped,
            duration_ms=round(report.duration_s * 1000),
            claim_transactions=self._store.claim_transactions - claims_before[0],
            claims_contended=self._store.claims_contended - claims_before[1],
        )
        return report

    async def _bounded_db(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # A unit of work that outlasts a lease cannot keep leases alive: it is wedged.
        with self.progress.bounded(self.settings.lease_seconds, f"database {what}"):
            return await self._db(fn, *args, **kwargs)


async def dry_run(settings: Settings, store: Store, db: DbRunner, clock: Clock) -> int:
    """Log every user a cycle would sync; call nothing, write nothing."""
    log = get_logger(dry_run=True)
    now = clock.now()
    stale_before = now - timedelta(seconds=settings.stale_after_seconds)
    cursor = Cursor()
    count = 0
    while not cursor.done:
        page = await db(
            store.due_page, cursor, settings.claim_batch_size, now=now, stale_before=stale_before
        )
        for claim in page:
            log.info("user_would_sync", user_id=claim.user_id)
        count += len(page)
    log.info("dry_run_finished", due=count)
    return count
