"""The TcpEngine: many Modbus TCP buses polled from one task, against real sockets.

The scheduling rules themselves (intervals, states, back-off, deferral,
qualities) are BusPoller's and tested on virtual time in test_bus.py; here
what the engine adds: it drives them through ``start_read`` and the
reactor, and must keep each bus's one-transaction rule, let a command
through, survive faults and stop cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest

from agent.clock import SystemClock
from agent.fieldbus.engine import TcpEngine
from agent.fieldbus.links import ModbusLink
from agent.fieldbus.poller import BusPoller, DeviceState, PolledDevice
from drivers.profiles import load_profile
from protocols.modbus import Space
from protocols.reading import Columns, Quality, Reading
from simulator.tcp import TcpTerminal

SLM = load_profile("sound_level_meter")
# every point at the device's interval: one job per device, so polls count intervals
POINTS = [dataclasses.replace(p, interval_s=None) for p in SLM.points]


class Sink:
    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.calls = 0

    async def __call__(self, readings: Columns) -> None:
        assert type(readings) is Columns  # a poll's readings as columns (decisions 47)
        self.calls += 1
        self.readings.extend(readings)


def _pollers(terminals: list[TcpTerminal], sink: Sink, interval: float) -> list[BusPoller]:
    clock = SystemClock()
    out = []
    for i, t in enumerate(terminals):
        n = len(POINTS)
        dev = PolledDevice(
            name=f"slm-{i}",
            slave=1,
            interval_s=interval,
            max_registers=SLM.max_registers,
            max_gap=SLM.max_gap,
            points=[(i * n + k, p) for k, p in enumerate(POINTS)],
        )
        link = ModbusLink.tcp("127.0.0.1", t.port, timeout_s=0.3)
        out.append(BusPoller(f"tcp-{i}", link, [dev], sink, clock, retries=1, offline_after=2))
    return out


@pytest.fixture
async def terminals() -> AsyncIterator[list[TcpTerminal]]:
    ts = [TcpTerminal(SLM, seed=i) for i in range(6)]
    for t in ts:
        await t.start()
    try:
        yield ts
    finally:
        for t in ts:
            await t.stop()


@contextlib.asynccontextmanager
async def _running(engine: TcpEngine) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(engine.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_one_task_polls_every_bus_at_its_interval(terminals: list[TcpTerminal]) -> None:
    sink = Sink()
    pollers = _pollers(terminals, sink, interval=0.1)
    async with _running(TcpEngine(pollers, sink, SystemClock())):
        await asyncio.sleep(1.05)
    n = len(POINTS)
    for i, p in enumerate(pollers):
        dev = p.devices[0]
        assert dev.state is DeviceState.ONLINE
        assert 8 <= dev.polls <= 12  # 1 s at 0.1 s: about 11 polls, none lost, none doubled
        mine = [r for r in sink.readings if i * n <= r.point < (i + 1) * n]
        assert len(mine) == dev.polls * n
        assert all(r.quality in (Quality.GOOD, Quality.OUT_OF_RANGE) for r in mine)
        assert p.link.statistics()["requests"] == p.transactions
    # the polls of all buses are due together and their readings arrive together
    assert sink.calls < sum(p.devices[0].polls for p in pollers)
    assert all(not p.link.connected for p in pollers)  # closed on stop


async def test_a_dead_and_a_refusing_terminal_do_not_hold_the_others(
    terminals: list[TcpTerminal],
) -> None:
    sink = Sink()
    pollers = _pollers(terminals, sink, interval=0.1)
    terminals[0].dead = True  # the connection is open, nothing answers
    terminals[1].exception = 4  # answers every request with an exception
    async with _running(TcpEngine(pollers, sink, SystemClock())):
        await asyncio.sleep(1.5)
    dead, refusing, *healthy = (p.devices[0] for p in pollers)
    assert dead.state is DeviceState.OFFLINE and "no response" in dead.last_error
    assert dead.polls <= 4  # silent: retried once, then offline and in back-off
    assert refusing.state is DeviceState.DEGRADED and "exception 04" in refusing.last_error
    n = len(POINTS)
    assert {r.quality for r in sink.readings if r.point < n} == {Quality.COMM_ERROR}
    for dev in healthy:
        assert dev.state is DeviceState.ONLINE and dev.polls >= 12


async def test_a_command_on_a_polled_link_takes_its_turn(terminals: list[TcpTerminal]) -> None:
    sink = Sink()
    pollers = _pollers(terminals[:1], sink, interval=0.01)
    link = pollers[0].link
    async with _running(TcpEngine(pollers, sink, SystemClock())):
        await asyncio.sleep(0.1)
        for value in range(40, 60):  # reads and writes between the engine's polls
            await link.write(6, 32, [value], 1)
            assert list(await link.read(Space.HOLDING, 32, 1, 1)) == [value]
        await asyncio.sleep(0.1)
    dev = pollers[0].devices[0]
    assert dev.state is DeviceState.ONLINE and dev.polls >= 10
    stats = link.statistics()
    assert stats["bad_frames"] == 0 and stats["timeouts"] == 0 and stats["stray_bytes"] == 0


async def test_a_terminal_that_goes_away_is_reconnected(terminals: list[TcpTerminal]) -> None:
    sink = Sink()
    term = terminals[0]
    pollers = _pollers([term], sink, interval=0.05)
    async with _running(TcpEngine(pollers, sink, SystemClock())):
        await asyncio.sleep(0.3)
        port = term.port
        await term.stop()  # every connection dropped, nothing listens
        await asyncio.sleep(0.3)
        down = pollers[0].devices[0].state
        term.port = port
        await term.start()
        await asyncio.sleep(2.5)  # the link's connect back-off is 0.5 s, then 1 s
    dev = pollers[0].devices[0]
    assert down is not DeviceState.ONLINE
    assert dev.state is DeviceState.ONLINE
    assert pollers[0].link.statistics()["connects"] >= 2


async def test_a_bug_in_a_callback_stops_the_engine_loudly(
    terminals: list[TcpTerminal], monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = Sink()
    pollers = _pollers(terminals[:1], sink, interval=0.05)

    def broken(*args: object) -> bool:
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(BusPoller, "_decode", broken)
    engine = TcpEngine(pollers, sink, SystemClock())
    with pytest.raises(RuntimeError, match="decoder bug"):
        await asyncio.wait_for(engine.run(), 5)


async def test_finish_lets_the_polls_on_the_wire_end_and_keeps_them(
    terminals: list[TcpTerminal],
) -> None:
    sink = Sink()
    pollers = _pollers(terminals, sink, interval=0.02)
    engine = TcpEngine(pollers, sink, SystemClock())
    async with _running(engine):
        await asyncio.sleep(0.3)
        await engine.finish(1.0)  # mid-burst or between: either way nothing is dropped
        served = [t.requests for t in terminals]
        await asyncio.sleep(0.1)
        assert [t.requests for t in terminals] == served  # no poll started after finish
    n = len(POINTS)
    for i, p in enumerate(pollers):
        polls = p.devices[0].polls
        assert p.transactions == served[i] and polls >= 5  # every request served was polled
        assert len([r for r in sink.readings if i * n <= r.point < (i + 1) * n]) == polls * n


async def test_the_engine_sleeps_while_it_finishes(
    terminals: list[TcpTerminal], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After finish() nothing is due any more: the task waits, it does not spin."""
    import agent.fieldbus.engine

    rings: list[float] = []
    real = agent.fieldbus.engine.wake

    def counted(fut: asyncio.Future[None]) -> None:
        rings.append(asyncio.get_running_loop().time())
        real(fut)

    monkeypatch.setattr(agent.fieldbus.engine, "wake", counted)
    sink = Sink()
    pollers = _pollers(terminals[:2], sink, interval=0.05)
    engine = TcpEngine(pollers, sink, SystemClock())
    async with _running(engine) as task:
        await asyncio.sleep(0.2)
        assert rings  # the engine's timer rang for the polls
        await engine.finish(1.0)
        await asyncio.sleep(0.05)
        before = len(rings)
        await asyncio.sleep(0.3)  # every poll's next slot passes meanwhile
        assert not task.done() and len(rings) == before
