"""What starts a cycle, decided without running one: injected clocks, no sleeping.

The host is the part of the app a cycle start reads (settings, metrics, the operator
switches, the backend gate); nothing here touches a database or a backend.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from structlog.testing import capture_logs

from daemon import control, logs
from daemon import settings as settings_module
from daemon.cycles import FORCE_COOLDOWN_SECONDS, Cycles
from daemon.metrics import Metrics
from daemon.resilience import BackendGate
from daemon.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Host:
    """The app as a cycle start sees it (daemon.cycles.CycleHost, minus the resources)."""

    clock: FakeClock
    settings: Settings = field(
        default_factory=lambda: settings_module.load({"SYNC_DATABASE_URL": "sqlite://"})
    )
    metrics: Metrics = field(default_factory=Metrics)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    switches: control.Switches = field(default_factory=lambda: control.Switches(logs.get_logger()))
    gate: BackendGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = BackendGate(
            threshold=2, reset_seconds=60, max_per_second=None, clock=self.clock
        )

    def after_cycle(self, report: Any) -> None:
        raise AssertionError("no cycle runs in these tests")

    def cycle_crashed(self, error: BaseException) -> None:
        raise AssertionError("no cycle runs in these tests")


def cycles_for(host: Host) -> Cycles:
    return Cycles(host, logs.get_logger(), monotonic=host.clock)  # type: ignore[arg-type]


async def test_a_request_starts_one_cycle_and_wakes_the_main_loop() -> None:
    host = Host(FakeClock())
    cycles = cycles_for(host)
    cycles.request("SIGUSR1")
    assert host.wake.is_set()
    assert cycles.next_start() == "SIGUSR1"
    assert cycles.next_start() is None


async def test_a_request_while_a_cycle_runs_is_skipped_counted_and_never_queued() -> None:
    host = Host(FakeClock())
    cycles = cycles_for(host)
    cycles.task = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
    with capture_logs() as seen:
        cycles.request("schedule")
    assert [e["event"] for e in seen] == ["cycle_tick_skipped"]
    assert host.metrics.ticks_skipped._value.get() == 1
    cycles.task = None
    assert cycles.next_start() is None


async def test_a_burst_of_forces_starts_one_cycle_per_cooldown() -> None:
    clock = FakeClock()
    cycles = cycles_for(Host(clock))
    cycles.force("force by ops")
    assert cycles.next_start() == "force by ops"
    clock.now += FORCE_COOLDOWN_SECONDS / 2
    with capture_logs() as seen:
        cycles.force("force by ops")
    assert [e["event"] for e in seen] == ["force_debounced"]
    assert cycles.next_start() is None
    clock.now += FORCE_COOLDOWN_SECONDS
    cycles.force("force by ops")
    assert cycles.next_start() == "force by ops"


async def test_a_paused_instance_starts_no_cycle_and_says_why() -> None:
    host = Host(FakeClock())
    host.switches.apply(control.Control(paused=True, updated_by="ops@host"))
    cycles = cycles_for(host)
    cycles.request("schedule")
    with capture_logs() as seen:
        assert cycles.next_start() is None
    assert seen[-1]["event"] == "cycle_skipped"
    assert seen[-1]["detail"] == "paused by an operator"


async def test_an_open_circuit_starts_no_cycle_and_names_the_probe_time() -> None:
    clock = FakeClock()
    host = Host(clock)
    for _ in range(2):  # threshold 2: two failed answers open the circuit
        ticket = await host.gate.wait()
        host.gate.record(ticket, False, None)
    clock.now += 15
    cycles = cycles_for(host)
    cycles.request("schedule")
    with capture_logs() as seen:
        assert cycles.next_start() is None
    skipped = seen[-1]
    assert (skipped["event"], skipped["detail"], skipped["probe_in_s"]) == (
        "cycle_skipped",
        "circuit open",
        45.0,
    )
