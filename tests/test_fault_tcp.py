"""Modbus TCP faults, injected by the real emulator on real sockets: every poll ends.

The agent's pollers (the TcpEngine and BusPoller, as the agent runs them) poll
two units behind one connection plus another bus. The terminal then breaks
every reply in one way of :data:`simulator.tcp.FAULTS` (bytes after a valid
reply, garbage, another transaction id, another protocol id, a short MBAP
length, another unit, a reply to a request never sent, half a reply then
silence, the connection reset in the middle of a reply). Each time: the polls
end with COMM_ERROR readings, the counters and device states say so, one
WARNING line names the link, the link reconnects (with back-off) and both
units are polled again once the fault is cleared, the other bus is never
held up, and no reading carries a value the terminal did not serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.clock import SystemClock
from agent.fieldbus.engine import TcpEngine
from agent.fieldbus.links import LinkDown, ModbusLink, TransportError
from agent.fieldbus.poller import BusPoller, DeviceState, PolledDevice
from agent.ops.config import Config, parse_config
from agent.ops.state import create_identity
from agent.ops.status import build_status, summary
from drivers.profiles import Point, load_profile
from protocols.errors import DeviceException
from protocols.modbus import Space, decode, register_count
from protocols.reading import Quality, Reading
from simulator.broker import MosquittoBroker
from simulator.harness import agent_with_hub
from simulator.tcp import FAULTS, TcpTerminal

SLM = load_profile("sound_level_meter")
# every point at the device's interval: one job per device, so polls count intervals
POINTS = [dataclasses.replace(p, interval_s=None) for p in SLM.points]
INTERVAL_S = 0.1
TIMEOUT_S = 0.2
ONLINE, OFFLINE = DeviceState.ONLINE, DeviceState.OFFLINE


async def _until(cond: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    """Wait until ``cond()`` holds; fail naming ``what`` if it does not (a hang, not a timing)."""
    for _ in range(int(within_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"not within {within_s:.0f} s: {what}")


class Served:
    """Every value the terminal really served, per (unit, point name)."""

    def __init__(self, term: TcpTerminal, points: Sequence[Point], monkeypatch: Any) -> None:
        self.values: dict[tuple[int, str], set[object]] = defaultdict(set)
        self._points = points
        real = term.handle

        def handle(unit: int, pdu: bytes) -> bytes | None:
            reply = real(unit, pdu)
            if reply is not None and pdu[0] in (3, 4) and reply[0] == pdu[0]:
                self._note(unit, pdu, reply)
            return reply

        monkeypatch.setattr(term, "handle", handle)

    def _note(self, unit: int, pdu: bytes, reply: bytes) -> None:
        fc, address, count = struct.unpack(">BHH", pdu)
        words = struct.unpack(f">{count}H", reply[2:])
        space = Space.INPUT if fc == 4 else Space.HOLDING
        for p in self._points:
            off, n = p.spec.address - address, register_count(p.spec)
            if p.spec.space is space and off >= 0 and off + n <= count:
                self.values[(unit, p.spec.name)].add(decode(p.spec, list(words[off : off + n])))

    def check(
        self, readings: Sequence[Reading], who: Callable[[int], tuple[int, str] | None]
    ) -> int:
        """Assert each value read was served by the terminal (same unit, same point)."""
        n = 0
        for r in readings:
            key = who(r.point)
            if key is not None and r.value is not None:
                assert r.value in self.values[key], f"{key}: {r.value!r} was never served"
                n += 1
        return n


class Sink:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    async def __call__(self, readings: list[Reading]) -> None:
        self.readings.extend(readings)


def _device(name: str, slave: int, first: int, interval_s: float = INTERVAL_S) -> PolledDevice:
    return PolledDevice(
        name=name,
        slave=slave,
        interval_s=interval_s,
        max_registers=SLM.max_registers,
        max_gap=SLM.max_gap,
        points=[(first + k, p) for k, p in enumerate(POINTS)],
    )


def _bus(name: str, port: int, devices: list[PolledDevice], sink: Sink) -> BusPoller:
    """A bus whose back-off stops at 0.3 s (the first is 1 s: the schedule's floor): three
    intervals, still a back-off, and an episode of a few tenths, not seconds."""
    link = ModbusLink.tcp("127.0.0.1", port, timeout_s=TIMEOUT_S)
    return BusPoller(
        name, link, devices, sink, SystemClock(), retries=1, offline_after=2, max_backoff_s=0.3
    )


@contextlib.asynccontextmanager
async def _terminals() -> AsyncIterator[tuple[TcpTerminal, TcpTerminal]]:
    """A: units 1 and 2 behind one port (a gateway); B: another bus."""
    a = TcpTerminal(SLM, slave=1, seed=1)
    a.add_unit(2, SLM, seed=2)
    b = TcpTerminal(SLM, seed=3)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


def _warnings(caplog: pytest.LogCaptureFixture, describe: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and describe in r.getMessage()
    ]


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_broken_reply_fails_the_polls_and_the_link_heals(
    fault: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    n = len(POINTS)
    owner = {0: (1, "a-1"), 100: (2, "a-2")}

    def who(pid: int) -> tuple[int, str] | None:
        base = pid - pid % 100
        return (owner[base][0], POINTS[pid - base].spec.name) if base in owner else None

    async with _terminals() as (a, b):
        served = Served(a, POINTS, monkeypatch)
        sink = Sink()
        bus_a = _bus("tcp-a", a.port, [_device("a-1", 1, 0), _device("a-2", 2, 100)], sink)
        # the other bus at 0.3 s: an overrun there means held up, not a busy test machine
        bus_b = _bus("tcp-b", b.port, [_device("b-1", 1, 200, 0.3)], sink)
        u1, u2 = bus_a.devices
        other = bus_b.devices[0]
        link = bus_a.link
        engine = TcpEngine([bus_a, bus_b], sink, SystemClock())
        task = asyncio.create_task(engine.run())
        try:
            await _until(lambda: u1.polls >= 3 and u2.polls >= 3, "both units polled")
            assert u1.state is ONLINE and u2.state is ONLINE
            before = link.statistics()
            b_polls = other.polls

            a.fault = fault
            set_at = len(sink.readings)
            await _until(lambda: u1.state is OFFLINE and u2.state is OFFLINE, "both units offline")
            p1, p2 = u1.polls, u2.polls
            # in back-off, still faulty: each is probed again, and fails again
            await _until(lambda: u1.polls > p1 and u2.polls > p2, "both units probed again")
            assert u1.state is OFFLINE and u2.state is OFFLINE
            during = sink.readings[set_at:]
            stats = link.statistics()
            status = bus_a.statistics()

            a.fault = None
            p1, p2 = u1.polls, u2.polls
            await _until(
                lambda: u1.state is ONLINE and u2.state is ONLINE,
                "both units online again after the fault is cleared",
            )
            await _until(lambda: u1.polls >= p1 + 3 and u2.polls >= p2 + 3, "polled again")
            assert not task.done()  # the engine never stopped
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert a.faulty > 0  # the fault really reached the wire
    # the polls ended, with COMM_ERROR readings for every point of both units
    for base in (0, 100):
        mine = [r for r in during if base <= r.point < base + n]
        assert {r.point for r in mine if r.quality is Quality.COMM_ERROR} == set(
            range(base, base + n)
        )
    # counters and the status document say what happened
    assert stats["resets"] > before["resets"]
    if fault != "reset":
        assert stats["bad_frames"] > before["bad_frames"]
    devices: dict[str, dict[str, Any]] = status["devices"]  # type: ignore[assignment]
    for dev in ("a-1", "a-2"):
        assert devices[dev]["state"] == "offline" and devices[dev]["polls_failed"] > 0
        assert devices[dev]["last_error"].startswith(link.describe)
    assert link.statistics()["connects"] > before["connects"]  # it reconnected
    # one WARNING line for the whole episode, none for the other bus
    assert len(_warnings(caplog, link.describe)) == 1
    assert _warnings(caplog, bus_b.link.describe) == []
    # the other bus kept its interval: never behind, never failed
    assert other.polls > b_polls and bus_b.overruns == 0
    assert other.polls_failed == 0 and other.state is ONLINE
    # no value the terminal did not serve, for the right unit and point
    assert served.check(sink.readings, who) > 0


# --------------------------------------------------------------------------- read(): always ends


@pytest.mark.parametrize("fault", FAULTS)
async def test_read_under_a_fault_ends_with_an_error_and_reconnects(fault: str) -> None:
    async with _terminals() as (a, _):
        link = ModbusLink.tcp("127.0.0.1", a.port, timeout_s=TIMEOUT_S)
        try:
            assert len(await link.read(Space.INPUT, 0, 10, 1)) == 10
            a.fault = fault
            with pytest.raises(LinkDown):
                await asyncio.wait_for(link.read(Space.INPUT, 0, 10, 2), 5)
            assert not link.connected
            a.fault = None
            # the first fault of an episode: reconnected at once, both units answer
            assert len(await link.read(Space.INPUT, 0, 10, 2)) == 10
            assert len(await link.read(Space.INPUT, 0, 10, 1)) == 10
            assert link.statistics()["connects"] == 2 and link.statistics()["resets"] == 1
        finally:
            link.close()


async def test_faults_in_a_row_back_off_and_a_reply_ends_the_episode() -> None:
    async with _terminals() as (a, _):
        link = ModbusLink.tcp("127.0.0.1", a.port, timeout_s=TIMEOUT_S)
        try:
            a.fault = "trailing"
            with pytest.raises(LinkDown, match="not Modbus TCP"):
                await link.read(Space.INPUT, 0, 1, 1)
            with pytest.raises(LinkDown, match="not Modbus TCP"):  # reconnected at once
                await link.read(Space.INPUT, 0, 1, 1)
            # now in back-off: not even tried, and the error still says why
            with pytest.raises(LinkDown, match=r"not Modbus TCP; reconnecting in 0\.5 s"):
                await link.read(Space.INPUT, 0, 1, 1)
            assert link.statistics()["connects"] == 2 and a.faulty == 2
            a.fault = None
            for _ in range(100):  # until the back-off is over: then it reconnects
                with contextlib.suppress(LinkDown):
                    assert len(await link.read(Space.INPUT, 0, 1, 1)) == 1
                    break
                await asyncio.sleep(0.05)
            assert link.connected
            a.fault = "garbage"  # a new episode: reconnected at once again
            with pytest.raises(LinkDown, match="not Modbus TCP"):
                await link.read(Space.INPUT, 0, 1, 1)
            a.fault = None
            assert len(await link.read(Space.INPUT, 0, 1, 1)) == 1
            stats = link.statistics()
            assert stats["connects"] == 4 and stats["resets"] == stats["bad_frames"] == 3
        finally:
            link.close()


async def test_a_command_queued_behind_a_read_that_dies_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine's read and a command's read() waiting behind it: both end on a fault."""
    async with _terminals() as (a, _):
        link = ModbusLink.tcp("127.0.0.1", a.port, timeout_s=5.0)
        try:
            await link.connect()
            a.fault = "half"  # the reply never completes: the link waits for the rest
            done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            assert link.start_read(Space.INPUT, 0, 10, 1, done.set_result)
            command = asyncio.create_task(link.read(Space.HOLDING, 32, 1, 2))
            await _until(lambda: a.faulty >= 1, "the half reply sent")
            await asyncio.sleep(0.05)
            assert not done.done() and not command.done()
            link.close()  # e.g. the agent stops: whoever waits hears it
            assert isinstance(await asyncio.wait_for(done, 1), LinkDown)
            a.fault = None
            # the command was behind the engine's read: it goes on, on a new connection
            assert len(await asyncio.wait_for(command, 5)) == 1
        finally:
            link.close()


async def test_close_while_read_waits_ends_the_read() -> None:
    async with _terminals() as (a, _):
        link = ModbusLink.tcp("127.0.0.1", a.port, timeout_s=5.0)
        a.dead = True
        read = asyncio.create_task(link.read(Space.INPUT, 0, 1, 1))
        await _until(lambda: a.requests >= 1, "the request on the wire")
        link.close()
        with pytest.raises(LinkDown, match="closed"):
            await asyncio.wait_for(read, 1)


# --------------------------------------------------------------------------- any bytes


_GOOD = struct.pack(">HHHBBBHH", 1, 0, 7, 1, 3, 4, 0x1234, 0x5678)  # tid 1 answers our read


def _mutated(data: st.DrawFn) -> bytes:
    frame = bytearray(_GOOD)
    i = data(st.integers(0, len(frame) - 1))
    frame[i] = data(st.integers(0, 255))
    return bytes(frame)


_PIECE = st.one_of(
    st.just(_GOOD),
    st.binary(max_size=20),
    st.composite(lambda draw: _mutated(draw))(),
    st.integers(1, len(_GOOD) - 1).map(lambda n: _GOOD[:n]),
    st.builds(
        lambda tid, proto, length, body: struct.pack(">HHH", tid, proto, length) + body,
        st.sampled_from([0, 1, 2, 0xFFFF]),
        st.sampled_from([0, 1]),
        st.integers(0, 300),
        st.binary(max_size=12),
    ),
)


async def _one(chunks: list[bytes], close: bool, engine: bool) -> object:
    """What a link makes of ``chunks`` sent in reply to its first request."""
    ended = asyncio.Event()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await r.readexactly(12)
            for c in chunks:
                w.write(c)
                await w.drain()
            if not close:
                await r.read()  # until the link hangs up
        w.close()
        with contextlib.suppress(ConnectionError):
            await w.wait_closed()
        ended.set()

    def done(result: object) -> None:
        if not fut.done():
            fut.set_result(result)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = ModbusLink.tcp("127.0.0.1", port, timeout_s=0.05)
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    try:
        if engine:
            await link.connect()
            assert link.start_read(Space.HOLDING, 0, 2, 1, done)
            return await asyncio.wait_for(fut, 2)
        try:
            return await asyncio.wait_for(link.read(Space.HOLDING, 0, 2, 1), 2)
        except (TransportError, DeviceException) as exc:
            return exc
    finally:
        link.close()
        await asyncio.wait_for(ended.wait(), 2)
        server.close()
        await server.wait_closed()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECE, min_size=1, max_size=4), st.booleans(), st.booleans())
def test_any_reply_bytes_give_a_value_or_a_link_error(
    chunks: list[bytes], close: bool, engine: bool
) -> None:
    """Never IndexError, struct.error or a hang; a value only from a whole valid frame."""
    got = asyncio.run(_one(chunks, close, engine))
    if isinstance(got, Exception):
        assert isinstance(got, (TransportError, DeviceException)), repr(got)
        return
    # a value: the stream was one whole reply to our read, and the value is its data
    stream = b"".join(chunks)
    assert len(stream) == len(_GOOD) and stream[:9] == _GOOD[:9]
    assert list(got) == list(struct.unpack(">HH", stream[9:]))  # type: ignore[call-overload]


# --------------------------------------------------------------------------- the whole agent


def _agent_config(state: Path, broker: MosquittoBroker, a: int, b: int) -> Config:
    def bus(name: str, port: int) -> dict[str, Any]:
        return {"name": name, "kind": "tcp", "host": "127.0.0.1", "tcp_port": port}

    def dev(name: str, bus: str, slave: int) -> dict[str, Any]:
        return {
            "name": name,
            "bus": bus,
            "profile": "sound_level_meter",
            "slave": slave,
            "interval_s": 0.2,
        }

    data = {
        "gateway": {"id": "gw-fault-tcp", "state_dir": str(state)},
        "uplink": {"host": broker.host, "port": broker.port},
        "batch": {"max_age_s": 0.5},
        "buses": [
            {**bus("tcp-a", a), "timeout_s": 0.3},
            {**bus("tcp-b", b), "timeout_s": 0.3},
        ],
        "devices": [dev("a-1", "tcp-a", 1), dev("a-2", "tcp-a", 2), dev("b-1", "tcp-b", 1)],
    }
    return parse_config(data, source="<test>", base=state)


async def test_the_agent_shows_it_and_nothing_wrong_reaches_the_hub(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's case, in the whole agent: a terminal that sends bytes after each reply."""
    caplog.set_level(logging.INFO)
    async with _terminals() as (a, b):
        served = Served(a, SLM.points, monkeypatch)
        config = _agent_config(tmp_path / "gw", mosquitto, a.port, b.port)
        identity = create_identity(config.gateway.state_dir)
        db = tmp_path / "hub.sqlite3"
        async with agent_with_hub(config, identity, mosquitto.host, mosquitto.port, db) as run:

            def states() -> dict[str, str]:
                doc = build_status(run.agent)
                return {
                    d: v["state"]
                    for bus in doc["buses"].values()
                    for d, v in bus["devices"].items()
                }

            await _until(lambda: set(states().values()) == {"online"}, "all online")
            a.fault = "trailing"
            await _until(lambda: states()["a-1"] == states()["a-2"] == "offline", "tcp-a offline")
            doc = build_status(run.agent)  # what `vitals status` shows
            assert states()["b-1"] == "online"
            assert summary(doc).startswith("1/3 devices online")
            assert doc["buses"]["tcp-a"]["link"]["resets"] >= 1
            a.fault = None
            await _until(lambda: set(states().values()) == {"online"}, "all online again")
            assert not run.agent_task.done()
    run.core.close()
    con = sqlite3.connect(db)
    try:
        rows = list(con.execute("SELECT point, ts, value, quality FROM readings"))
    finally:
        con.close()
    assert len(rows) == run.polled > 0  # everything polled reached the hub
    hub = [Reading(pid, ts, value, Quality(q)) for pid, ts, value, q in rows]

    def who(pid: int) -> tuple[int, str] | None:
        dev, point = config.points[pid]
        return (dev.slave, point.spec.name) if dev.bus == "tcp-a" else None

    assert served.check(hub, who) > 0  # no value at the hub the terminal did not serve
    comm = {r.point for r in hub if r.quality is Quality.COMM_ERROR and who(r.point)}
    failed = comm | {r.point for r in hub if r.quality is Quality.STALE and who(r.point)}
    # every point of both units polled at the devices' interval failed, visibly: STALE
    # while its device was only degraded, COMM_ERROR once offline (a device's jobs share
    # its failures: one went offline on its slower jobs' failures while its fast points
    # showed STALE, then answered again); both units went offline with COMM_ERRORs
    fast = {pid for pid, (_, p) in config.points.items() if p.interval_s is None and who(pid)}
    assert {who(pid)[0] for pid in fast} == {1, 2} and fast <= failed  # type: ignore[index]
    assert {who(pid)[0] for pid in comm} == {1, 2}  # type: ignore[index]
    assert len(_warnings(caplog, f"tcp://127.0.0.1:{a.port}")) == 1
