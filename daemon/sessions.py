"""The backend client over one aiohttp session, renewed by a reload without cutting a cycle.

A reload (SIGHUP) may change the token, the URL or the timeouts: it opens a new session
and client for the next cycle. The running cycle keeps the client it started with; the
old session is closed once no cycle can be using it any more.
"""

from __future__ import annotations

import aiohttp

from daemon.backend import BackendClient, CallMeter
from daemon.resilience import BackendGate
from daemon.settings import Settings


class BackendSessions:
    """The gate every call passes, the current client, and the sessions retired by reloads
    but not closed yet."""

    def __init__(self, gate: BackendGate, meter: CallMeter | None = None) -> None:
        self.gate = gate
        self.meter = meter
        self._session: aiohttp.ClientSession | None = None
        self.client: BackendClient | None = None
        self._retired: list[aiohttp.ClientSession] = []

    def open(self, settings: Settings) -> BackendClient:
        """A new session and client for `settings`; the previous session is retired."""
        if self._session is not None:
            self._retired.append(self._session)
        self._session = BackendClient.open_session(settings)
        self.client = BackendClient(settings, self._session, gate=self.gate, meter=self.meter)
        return self.client

    @property
    def has_retired(self) -> bool:
        return bool(self._retired)

    async def close_retired(self) -> None:
        """Close the sessions reloads replaced; call only when no cycle runs."""
        retired, self._retired = self._retired, []
        for session in retired:
            await session.close()

    async def close(self) -> None:
        await self.close_retired()
        if self._session is not None:
            await self._session.close()
            self._session = None
