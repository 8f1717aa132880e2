"""Interleaved runs: A B C, A B C, ... against one backend process, in one bench run.

The machine is noisy (other work shares its cores), so figures of different clients
are only compared within one run, round by round: a burst of load then hits every
client of a round alike, rather than one client's whole series.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.backend import ReferenceBackend
from bench.clients import Client, Target
from bench.procs import Usage, run_measured
from bench.workload import Workload


@dataclass
class Run:
    """One client's run: what the process used, what it did, what the backend saw."""

    client: str
    round: int
    users: int
    concurrency: int
    latency_ms: float
    usage: Usage
    work_wall_s: float | None = None
    succeeded: int | None = None
    success_lines: int = 0
    unsynced: int | None = None
    backend: dict[str, Any] = field(default_factory=dict)
    backend_cpu_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ideal_s(self) -> float:
        """All slots busy all the time, the client costing nothing: users x latency / C."""
        return self.users * self.latency_ms / 1000 / self.concurrency

    @property
    def cpu_us_per_user(self) -> float | None:
        return self.usage.cpu_s / self.users * 1e6 if self.users else None

    @property
    def efficiency(self) -> float | None:
        """Ideal over the client's own work wall time (1.0 is the backend saturated)."""
        return self.ideal_s / self.work_wall_s if self.work_wall_s else None

    @property
    def throughput(self) -> float | None:
        """Users per second of work wall time."""
        return self.users / self.work_wall_s if self.work_wall_s else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["usage"]["cpu_s"] = self.usage.cpu_s
        data.update(
            ideal_s=self.ideal_s,
            cpu_us_per_user=self.cpu_us_per_user,
            efficiency=self.efficiency,
            throughput=self.throughput,
        )
        return data


def problems(run: Run) -> list[str]:
    """What makes a run's figures meaningless: failures, users left, overlaps."""
    found: list[str] = []
    if run.usage.timed_out:
        found.append("timed out")
    if run.usage.exit_status != 0:
        found.append(f"exit status {run.usage.exit_status}")
    if run.succeeded != run.users:
        found.append(f"succeeded {run.succeeded} of {run.users}")
    if run.client != "floor" and run.success_lines != run.users:
        found.append(f"{run.success_lines} user_synced lines for {run.users} users")
    if run.unsynced:
        found.append(f"{run.unsynced} due users left unsynced")
    b = run.backend
    if b.get("overlaps"):
        found.append(f"{b['overlaps']} overlapping calls")
    if b.get("not_due_users_called"):
        found.append(f"{b['not_due_users_called']} not-due users called")
    if b.get("requests") is not None and b["requests"] != run.users:
        found.append(f"the backend saw {b['requests']} requests for {run.users} users")
    if (b.get("max_in_flight") or 0) > run.concurrency:
        found.append(f"max_in_flight {b['max_in_flight']} > {run.concurrency}")
    return found


class Interleaver:
    """Runs clients one after another against one backend and one workload."""

    def __init__(
        self,
        workdir: Path,
        backend: ReferenceBackend,
        workload: Workload,
        *,
        timeout: float,
        say: Callable[[str], None],
    ) -> None:
        self._workdir = workdir
        self._backend = backend
        self._workload = workload
        self._timeout = timeout
        self._say = say

    def run(self, client: Client, *, round_: int, concurrency: int, users: int) -> Run:
        """One measured run of `client`, from a fresh workload; `users=0` is a baseline."""
        w = self._workload
        if client.uses_database:
            if users:
                w.make_due()
            else:
                w.make_fresh()
        target = Target(w.database_url, self._backend.sync_url, users, concurrency)
        stem = f"{client.name}-c{concurrency}-r{round_}" + ("" if users else "-baseline")
        out = self._workdir / f"{stem}.out"
        self._backend.reset()
        cpu_before = self._backend.cpu_seconds()
        self._say(f"  {stem}: {users} users at concurrency {concurrency} ...")
        usage = run_measured(
            client.command(target),
            env=client.environment(target),
            stdout=out,
            timeout=self._timeout,
        )
        cpu_after = self._backend.cpu_seconds()
        read = client.read(out)
        run = Run(
            client=client.name,
            round=round_,
            users=users,
            concurrency=concurrency,
            latency_ms=self._backend.latency_ms,
            usage=usage,
            work_wall_s=read.get("work_wall_s"),
            succeeded=read.get("succeeded"),
            success_lines=int(read.get("success_lines") or 0),
            unsynced=w.unsynced() if client.uses_database and users else None,
            backend=self._backend.stats(users),
            backend_cpu_s=(
                None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
            ),
            detail={k: v for k, v in read.items() if k in ("events", "levels", "outcome")},
        )
        cpu = run.cpu_us_per_user
        self._say(
            f"    cpu {usage.cpu_s:.2f} s"
            + (f" = {cpu:.0f} us/user" if cpu is not None else "")
            + (f", work wall {run.work_wall_s:.2f} s" if run.work_wall_s else "")
            + (f" ({run.efficiency:.3f} of ideal)" if run.efficiency else "")
        )
        if users and (found := problems(run)):
            self._say(f"    PROBLEMS: {'; '.join(found)}")
        return run

    def rounds(
        self, clients: Sequence[Client], *, rounds: int, concurrency: int, users: int
    ) -> list[Run]:
        """A B C, A B C, ...: `rounds` runs of each client, interleaved."""
        runs: list[Run] = []
        for r in range(1, rounds + 1):
            self._say(f"round {r} of {rounds} (concurrency {concurrency})")
            for client in clients:
                runs.append(self.run(client, round_=r, concurrency=concurrency, users=users))
        return runs
