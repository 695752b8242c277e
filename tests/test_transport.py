"""The links against real sockets and ptys: emulated TCP terminals and RTU buses.

Every case checks what the scheduler relies on: typed errors, and that no
reply ever answers a request other than its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from agent.fieldbus.links import BadResponse, LinkDown, ModbusLink, NoResponse
from agent.fieldbus.rtu import Timer
from drivers.profiles import load_profile
from protocols.errors import DeviceException
from protocols.modbus import Space, decode
from protocols.modbus.rtu import crc16
from simulator.rtu import RtuBus, RtuSlave
from simulator.tcp import TcpTerminal

SLM = load_profile("sound_level_meter")
WEATHER = load_profile("weather_station")

# --------------------------------------------------------------------------- TCP


@pytest.fixture
async def terminal() -> AsyncIterator[TcpTerminal]:
    t = TcpTerminal(SLM, slave=1)
    t.add_unit(2, WEATHER, seed=2)
    await t.start()
    try:
        yield t
    finally:
        await t.stop()


async def test_tcp_reads_and_writes_several_units_on_one_connection(terminal: TcpTerminal) -> None:
    link = ModbusLink.tcp("127.0.0.1", terminal.port, timeout_s=1.0)
    try:
        regs = await link.read(Space.INPUT, 0, 10, 1)
        assert len(regs) == 10
        laeq = decode(SLM.point("laeq").spec, regs[:1])
        assert isinstance(laeq, float) and 20.0 <= laeq <= 140.0
        bits = await link.read(Space.COIL, 0, 1, 2)  # the weather station's coil
        assert list(bits) in ([False], [True])
        await link.write(6, 32, [60], 1)
        assert list(await link.read(Space.HOLDING, 32, 1, 1)) == [60]
        await link.write(16, 32, [30, 2], 1)
        assert list(await link.read(Space.HOLDING, 32, 2, 1)) == [30, 2]
        assert link.statistics()["connects"] == 1  # one connection for both units
    finally:
        link.close()


async def test_tcp_typed_errors(terminal: TcpTerminal) -> None:
    link = ModbusLink.tcp("127.0.0.1", terminal.port, timeout_s=0.2)
    try:
        with pytest.raises(DeviceException) as exc:
            await link.read(Space.INPUT, 500, 2, 1)  # outside the map
        assert exc.value.code == 2 and exc.value.function == 4
        with pytest.raises(DeviceException) as exc:
            await link.read(Space.INPUT, 0, 1, 9)  # nobody at unit 9 behind the gateway
        assert exc.value.code == 11
        terminal.dead = True
        with pytest.raises(NoResponse):
            await link.read(Space.INPUT, 0, 1, 1)
        assert link.statistics()["timeouts"] == 1
    finally:
        link.close()


async def test_tcp_late_reply_never_answers_the_next_request() -> None:
    """A server that answers the first request only after the client gave up."""
    replies: list[bytes] = []
    done = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await r.readexactly(12)
        second = await r.readexactly(12)
        tid1, tid2 = first[:2], second[:2]
        # the stale reply first (value 111), then the right one (222)
        for tid, value in ((tid1, 111), (tid2, 222)):
            frame = tid + struct.pack(">HHBBBH", 0, 5, 1, 3, 2, value)
            replies.append(frame)
            w.write(frame)
        await w.drain()
        await r.read()  # until the client hangs up
        w.close()
        await w.wait_closed()
        done.set()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = ModbusLink.tcp("127.0.0.1", port, timeout_s=0.1)
    try:
        with pytest.raises(NoResponse):
            await link.read(Space.HOLDING, 0, 1, 1)
        link.timeout_s = 1.0
        assert list(await link.read(Space.HOLDING, 0, 1, 1)) == [222]
        assert link.statistics()["stray_bytes"] == len(replies[0])
    finally:
        link.close()
        await asyncio.wait_for(done.wait(), 5)
        server.close()
        await server.wait_closed()


class _Server:
    """Answers each 12-byte request with ``frames(request)``, written one by one."""

    def __init__(self, frames: Callable[[bytes], list[bytes]]) -> None:
        self.frames = frames
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for w in self.writers:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        await self.server.wait_closed()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.append(w)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                req = await r.readexactly(12)
                for chunk in self.frames(req):
                    w.write(chunk)
                    await w.drain()
                    await asyncio.sleep(0.001)  # separate reads on the client


def _reply(req: bytes, *values: int) -> bytes:
    n = len(values)
    return req[:2] + struct.pack(f">HHBBB{n}H", 0, 3 + 2 * n, 1, 3, 2 * n, *values)


async def test_tcp_reply_byte_by_byte_and_replies_back_to_back() -> None:
    """The receive buffer: a frame in many reads, a late reply and the reply in one write."""
    mode = ["bytes"]
    held: list[bytes] = []

    def frames(req: bytes) -> list[bytes]:
        good = _reply(req, *range(100, 160))  # 60 registers: a frame of 129 bytes
        if mode[0] == "bytes":
            return [good[i : i + 1] for i in range(len(good))]
        if not held:  # this one is answered late: with the next, just before its reply
            held.append(_reply(req, *range(60)))
            return []
        both = held.pop() + good
        return [both[:200], both[200:]]

    async with _Server(frames) as port:
        link = ModbusLink.tcp("127.0.0.1", port, timeout_s=2.0)
        try:
            assert list(await link.read(Space.HOLDING, 0, 60, 1)) == list(range(100, 160))
            mode[0] = "together"
            for _ in range(10):  # 2 frames a round: the buffer wraps many times
                link.timeout_s = 0.05
                with pytest.raises(NoResponse):
                    await link.read(Space.HOLDING, 0, 60, 1)
                link.timeout_s = 2.0
                assert list(await link.read(Space.HOLDING, 0, 60, 1)) == list(range(100, 160))
            stats = link.statistics()
            assert stats["stray_bytes"] == 10 * 129 and stats["timeouts"] == 10
            assert stats["connects"] == 1 and stats["bad_frames"] == 0
        finally:
            link.close()


async def test_tcp_garbage_stream_drops_the_connection() -> None:
    async with _Server(lambda req: [b"HTTP/1.1 400 Bad Request\r\n\r\n"]) as port:
        link = ModbusLink.tcp("127.0.0.1", port, timeout_s=1.0)
        try:
            with pytest.raises(LinkDown, match="not Modbus TCP"):
                await link.read(Space.HOLDING, 0, 1, 1)
            assert link.statistics()["bad_frames"] == 1
            assert not link.connected
        finally:
            link.close()


async def test_tcp_idle_connection_closed_by_the_device_is_reopened_not_a_failure() -> None:
    """Many devices drop a connection idle for a while: the next request reconnects."""
    served: list[int] = []

    async def one_answer_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await r.readexactly(12)
        w.write(_reply(req, len(served)))
        served.append(1)
        await w.drain()
        w.close()  # the device's idle timeout, right after its answer

    server = await asyncio.start_server(one_answer_then_close, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    link = ModbusLink.tcp("127.0.0.1", port, timeout_s=1.0)
    try:
        assert list(await link.read(Space.HOLDING, 0, 1, 1)) == [0]
        await asyncio.sleep(0.05)  # the close reaches us while the link is idle
        assert list(await link.read(Space.HOLDING, 0, 1, 1)) == [1]
        stats = link.statistics()
        assert stats["connects"] == 2 and stats["timeouts"] == 0
    finally:
        link.close()
        server.close()
        await server.wait_closed()


async def test_tcp_device_that_accepts_one_connection() -> None:
    t = TcpTerminal(SLM, max_connections=1)
    await t.start()
    first = ModbusLink.tcp("127.0.0.1", t.port, timeout_s=0.5)
    second = ModbusLink.tcp("127.0.0.1", t.port, timeout_s=0.5)
    try:
        await first.read(Space.INPUT, 0, 1, 1)
        with pytest.raises(LinkDown):
            await second.read(Space.INPUT, 0, 1, 1)
        assert t.refused == 1
        # the bus shares its single link: the first keeps working
        await first.read(Space.INPUT, 0, 1, 1)
    finally:
        first.close()
        second.close()
        await t.stop()


async def test_tcp_connect_failure_backs_off() -> None:
    link = ModbusLink.tcp("127.0.0.1", 1, timeout_s=0.5)  # nothing listens on port 1
    with pytest.raises(LinkDown, match="cannot connect"):
        await link.read(Space.INPUT, 0, 1, 1)
    # within the back-off the link does not even try: no connect timeout to pay
    with pytest.raises(LinkDown, match="next connect attempt"):
        await link.read(Space.INPUT, 0, 1, 1)


# --------------------------------------------------------------------------- RTU on a pty


@pytest.fixture
def bus() -> Iterator[RtuBus]:
    slaves = [RtuSlave(SLM, slave=1), RtuSlave(WEATHER, slave=2, seed=2)]
    slaves += [RtuSlave(SLM, slave=s, seed=s) for s in (3, 4, 5, 6, 7)]
    with RtuBus(slaves, baud=115200, turnaround_s=0.0005) as b:
        yield b


def _link(bus: RtuBus, timeout: float = 0.15, **kw: object) -> ModbusLink:
    return ModbusLink.serial(bus.port, baud=bus.baud, parity="N", timeout_s=timeout, **kw)  # type: ignore[arg-type]


async def test_rtu_reads_writes_and_bits(bus: RtuBus) -> None:
    link = _link(bus)
    try:
        regs = await link.read(Space.INPUT, 0, 10, 1)
        assert len(regs) == 10
        assert 200 <= regs[0] <= 1400  # laeq x10
        assert list(await link.read(Space.COIL, 0, 1, 2)) in ([False], [True])
        await link.write(6, 33, [2], 1)
        assert list(await link.read(Space.HOLDING, 33, 1, 1)) == [2]
        await link.write(16, 32, [10, 1], 1)
        assert list(await link.read(Space.HOLDING, 32, 2, 1)) == [10, 1]
        await link.write(5, 0, True, 2)
        assert list(await link.read(Space.COIL, 0, 1, 2)) == [True]
        await link.write(15, 0, [0], 2)
        assert list(await link.read(Space.COIL, 0, 1, 2)) == [False]
    finally:
        link.close()


async def test_rtu_request_never_sooner_than_t35_after_the_last_byte_heard(bus: RtuBus) -> None:
    """The gap before each request is counted from the reply's last byte as it
    was read (the timer arms early and spins the rest: never before), including
    after a timeout, when the line is quiet from the timeout on."""
    bus.slaves[7].fault = "silent"
    # a timeout a loaded machine's replies keep (the three silent polls cost 0.75 s):
    # a real slave taken late would count a fourth timeout
    link = _link(bus, timeout=0.25)
    events: list[tuple[str, float]] = []
    link.trace = lambda direction, _data: events.append((direction, time.monotonic()))
    try:
        for i in range(60):
            with contextlib.suppress(NoResponse):
                await link.read(Space.INPUT, 0, 8, 7 if i % 20 == 19 else 1 + i % 5)
    finally:
        link.close()
    gaps = []
    last_rx = None
    for direction, t in events:
        if direction == "rx":
            last_rx = t
        elif last_rx is not None:
            gaps.append(t - last_rx)
    assert len(gaps) >= 55
    assert min(gaps) >= link.inter_frame_s == pytest.approx(0.00175)
    assert link.statistics()["timeouts"] == 3


async def test_precise_timer_never_wakes_before_its_instant() -> None:
    timer = Timer()
    if timer._fd < 0:
        pytest.skip("no timerfd on this system: the timer falls back to asyncio.sleep")
    try:
        early = []
        for _ in range(200):
            when = time.monotonic() + 0.0005
            await timer.sleep_until(when)
            early.append(time.monotonic() - when)
        assert min(early) >= 0
        assert 0 < timer._early <= timer.max_early_s  # it learnt to arm early
    finally:
        timer.close()


async def test_rtu_concurrent_callers_take_turns_on_the_wire(bus: RtuBus) -> None:
    """A poll and a hub command on the same bus at once: the link runs one
    transaction at a time, so each caller gets its own slave's answer."""
    link = _link(bus)
    try:
        await link.write(6, 33, [1], 3)  # slave 3's weighting, a value we know
        await link.write(6, 33, [2], 4)
        results = await asyncio.gather(
            *(link.read(Space.HOLDING, 33, 1, slave) for slave in (3, 4, 3, 4, 3, 4))
        )
        assert [list(r) for r in results] == [[1], [2], [1], [2], [1], [2]]
        assert link.statistics()["timeouts"] == 0
    finally:
        link.close()


async def test_rtu_faults_raise_typed_errors(bus: RtuBus) -> None:
    bus.slaves[3].fault = "silent"
    bus.slaves[4].fault = "crc"
    bus.slaves[5].fault = "exception"
    bus.slaves[5].code = 6
    bus.slaves[6].fault = "garbage"
    link = _link(bus)
    try:
        with pytest.raises(NoResponse):
            await link.read(Space.INPUT, 0, 10, 3)
        with pytest.raises(BadResponse, match="CRC"):
            await link.read(Space.INPUT, 0, 10, 4)
        with pytest.raises(DeviceException) as exc:
            await link.read(Space.INPUT, 0, 10, 5)
        assert exc.value.code == 6
        with pytest.raises(BadResponse, match="garbage"):
            await link.read(Space.INPUT, 0, 10, 6)
        with pytest.raises(NoResponse):
            await link.read(Space.INPUT, 0, 10, 42)  # nobody there
        # after all that, a healthy slave answers the very next request
        assert len(await link.read(Space.INPUT, 0, 10, 1)) == 10
    finally:
        link.close()


async def test_rtu_late_reply_never_answers_the_next_request(bus: RtuBus) -> None:
    """Slave 3 answers 0.3 s late (the timeout is 0.1 s). Its reply lands while
    the link talks to slave 1 with the same function and count: skipped."""
    bus.slaves[3].fault = "late"
    bus.slaves[3].delay_s = 0.3
    bus.slaves[3].registers.write(Space.HOLDING, 32, [3333])
    bus.slaves[1].registers.write(Space.HOLDING, 32, [1111])
    link = _link(bus, timeout=0.1)
    try:
        with pytest.raises(NoResponse):
            await link.read(Space.HOLDING, 32, 1, 3)
        got = []
        for _ in range(40):  # 0.3 s and more of requests to slave 1
            got.append(list(await link.read(Space.HOLDING, 32, 1, 1)))
        assert got == [[1111]] * 40
        assert bus.slaves[3].replies == 1  # the late reply did go out on the wire
        assert link.statistics()["stray_bytes"] > 0  # and was seen, and dropped
    finally:
        link.close()


async def test_rtu_a_wake_up_whose_bytes_were_taken_is_no_hang_up(bus: RtuBus) -> None:
    """On a busy machine the loop can run, in one round, a task that drains the port
    (the wait for a quiet line) before the port's read callback: the callback then
    reads nothing. A tty read with VMIN 0 finds nothing both then and after a
    hang-up; only the hang-up is the port lost. (CI met it once, as "port lost" in
    the middle of the late-reply test above.)"""
    link = _link(bus)
    try:
        assert len(await link.read(Space.INPUT, 0, 10, 1)) == 10
        os.write(bus._master, b"\x00noise")  # bytes nobody asked for
        fd = link._fd  # type: ignore[attr-defined]
        assert select.select([fd], [], [], 2)[0]  # they are there to read
        asyncio.get_running_loop().call_soon(link._drain_input)  # runs before the callback
        await asyncio.sleep(0.05)
        assert link.connected
        assert link.statistics()["stray_bytes"] >= 6  # read once, by the drain
        assert len(await link.read(Space.INPUT, 0, 10, 1)) == 10
    finally:
        link.close()


async def test_rtu_slow_device_that_missed_one_timeout_is_read_again(bus: RtuBus) -> None:
    """A slave that answers in 60 % of the timeout misses it once. The next
    exchanges are suspect (its late reply may still come), and its reply is held
    until its usual time is over; here that time reaches the timeout itself. The
    held reply is then taken, not dropped: dropping it made every exchange after
    the first timeout a timeout again, and the slave was never read again."""
    bus.slaves[1].fault = "slow"
    bus.slaves[1].delay_s = 0.06
    link = _link(bus, timeout=0.1)
    try:
        assert len(await link.read(Space.INPUT, 0, 10, 1)) == 10
        bus.slaves[1].fault = "silent"
        with pytest.raises(NoResponse):
            await link.read(Space.INPUT, 0, 10, 1)
        bus.slaves[1].fault = "slow"
        for _ in range(3):
            assert len(await link.read(Space.INPUT, 0, 10, 1)) == 10
        assert link.statistics()["timeouts"] == 1
    finally:
        link.close()


async def test_rtu_slow_device_inside_the_timeout(bus: RtuBus) -> None:
    bus.slaves[1].fault = "slow"
    bus.slaves[1].delay_s = 0.05
    link = _link(bus, timeout=0.2)
    try:
        assert len(await link.read(Space.INPUT, 0, 10, 1)) == 10
    finally:
        link.close()


async def test_rtu_discards_the_local_echo_of_a_2_wire_adapter() -> None:
    with RtuBus([RtuSlave(SLM, slave=1)], baud=115200, echo=True) as b:
        plain = _link(b)
        try:
            # without echo discard, our own request comes back first: never taken as
            # (part of) a reply, and the slave's reply behind it still is
            assert len(await plain.read(Space.INPUT, 0, 10, 1)) == 10
            assert plain.statistics()["stray_bytes"] >= 8
        finally:
            plain.close()
        link = _link(b, discard_echo=True)
        try:
            for _ in range(5):
                assert len(await link.read(Space.INPUT, 0, 10, 1)) == 10
            assert link.statistics()["echo_errors"] == 0
        finally:
            link.close()


async def test_rtu_input_is_flushed_before_each_request(bus: RtuBus) -> None:
    """Noise that sits in the input before a request never becomes its reply."""
    link = _link(bus)
    try:
        await link.read(Space.INPUT, 0, 1, 1)
        # a complete, valid-looking reply from slave 1 dropped onto the line unasked
        fake = bytes([1, 4, 2, 0x12, 0x34])
        os.write(bus._master, fake + crc16(fake).to_bytes(2, "little"))
        await asyncio.sleep(0.05)
        bus.slaves[1].registers.write(Space.HOLDING, 32, [77])
        assert list(await link.read(Space.HOLDING, 32, 1, 1)) == [77]
        assert link.statistics()["stray_bytes"] >= 7
    finally:
        link.close()


async def test_rtu_parity_on_a_pty_says_why(bus: RtuBus) -> None:
    link = ModbusLink.serial(bus.port, baud=9600, parity="E", timeout_s=0.1)
    with pytest.raises(LinkDown, match="parity N"):
        await link.connect()


async def test_rtu_missing_port_is_link_down() -> None:
    link = ModbusLink.serial("/dev/does-not-exist", baud=9600, parity="N", timeout_s=0.1)
    with pytest.raises(LinkDown) as exc:
        await link.read(Space.INPUT, 0, 1, 1)
    assert isinstance(exc.value.__cause__, OSError | Exception)


async def test_rtu_over_tcp() -> None:
    """A serial device server: RTU frames on a TCP stream (a tiny one, in-process)."""
    slave = RtuSlave(SLM, slave=4)
    done = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await r.readexactly(8)
            except asyncio.IncompleteReadError:
                w.close()
                await w.wait_closed()
                done.set()
                return
            if head[1] == 16:
                head += await r.readexactly(1 + head[6])
            reply = slave.answer(head)
            if reply is not None:
                w.write(b"\x00\x07" + reply)  # line noise first, as converters pass it on
                await w.drain()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = ModbusLink.tcp("127.0.0.1", port, timeout_s=0.5, rtu_framing=True, baud=115200)
    try:
        assert len(await link.read(Space.INPUT, 0, 10, 4)) == 10
        await link.write(16, 32, [5, 1], 4)
        assert list(await link.read(Space.HOLDING, 32, 2, 4)) == [5, 1]
        with pytest.raises(DeviceException):
            await link.read(Space.INPUT, 900, 1, 4)
    finally:
        link.close()
        await asyncio.wait_for(done.wait(), 5)
        server.close()
        await server.wait_closed()
