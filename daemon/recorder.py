"""One cycle's results on their way to the database, in batches, never lost on the way.

Per-user transactions would cost more CPU than the HTTP calls they record, so results
wait in `pending` and one transaction writes a batch (when it is full, or every 0.2 s).
A batch the database refuses stays pending and is written at the next try; what is
still pending when the cycle ends is carried to the next cycle by the app, under its own
run id. The recorder is never cancelled mid-write: a batch whose transaction started in
the database thread commits regardless, and must be accounted for exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

from daemon import backoff
from daemon.errors import SchemaError, StoreError
from daemon.settings import Settings
from daemon.store import Store
from daemon.values import Result

USER_BACKOFF_CAP_SECONDS = 6 * 3600.0
FLUSH_INTERVAL_SECONDS = 0.2


class Recorder:
    """Pending results, the batch writer loop, and whether the database takes them."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        write: Callable[..., Awaitable[Any]],
        *,
        now: Callable[[], Any],
        log: Any,
        carry: tuple[Result, ...] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.pending: list[Result] = list(carry)
        self.degraded = False
        self._store = store
        self._write = write  # the cycle's bounded database call
        self._now = now
        self._log = log
        self._rng = rng or random.Random()
        self._batch = max(1, min(settings.claim_batch_size, 4 * settings.concurrency))
        self._due = asyncio.Event()
        self._open = True

    def add(self, result: Result) -> None:
        self.pending.append(result)
        if len(self.pending) >= self._batch:
            self._due.set()

    async def loop(self) -> None:
        """Write batches until `close()`; what is left is written by `drain()`."""
        failures = 0
        while self._open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), FLUSH_INTERVAL_SECONDS)
            self._due.clear()
            if not self._open:
                return
            try:
                await self.flush()
                failures = 0
            except StoreError as exc:
                failures += 1
                self.degrade(exc)
                await asyncio.sleep(backoff.ceiling(0.5, failures, 10.0))

    def close(self) -> None:
        """The cycle's calls are over: the loop ends after the write it may be doing."""
        self._open = False
        self._due.set()

    async def drain(self, deadline: Callable[[], bool]) -> str | None:
        """Write what is pending until done or `deadline()`; a schema error ends it early.

        Returns the schema error, if the database refused the writes for the tables' shape.
        """
        attempt = 0
        while self.pending and not deadline():
            try:
                await self.flush()
            except SchemaError as exc:
                self._log.error("cycle_schema_error", error=str(exc))
                return str(exc)
            except StoreError as exc:
                attempt += 1
                self.degrade(exc)
                await asyncio.sleep(backoff.ceiling(0.2, attempt, 2.0))
        return None

    async def flush(self) -> None:
        """Write every pending result; on failure they stay pending for the next try."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            finished = await self._write(
                "finish",
                self._store.finish,
                batch,
                now=self._now(),
                backoff=self.user_backoff,
                quarantine_after=self.settings.quarantine_after,
            )
        except BaseException:
            self.pending[:0] = batch
            raise
        if self.degraded:
            self.degraded = False
            self._log.info("database_recovered")
        for gone in finished.quarantined:
            self._log.warning(
                "user_quarantined",
                user_id=gone.claim.user_id,
                consecutive_failures=self.settings.quarantine_after,
                probe_every_s=self.settings.quarantine_probe_seconds,
            )
        for lost in finished.lease_lost:
            self._log.warning(
                "user_sync_lease_lost",
                user_id=lost.claim.user_id,
                outcome=lost.outcome.value,
                detail="lease taken over by another instance; nothing written",
            )

    def user_backoff(self, failures: int) -> float:
        """Seconds until a failing user is due again; quarantined users are only probed."""
        s = self.settings
        if failures >= s.quarantine_after:
            return s.quarantine_probe_seconds * self._rng.uniform(0.9, 1.1)
        return backoff.user_backoff(
            failures, s.retry_delay_seconds * 12, USER_BACKOFF_CAP_SECONDS, self._rng
        )

    def degrade(self, exc: StoreError) -> None:
        if not self.degraded:
            self.degraded = True
            self._log.error("database_unavailable", error=str(exc), pending=len(self.pending))
