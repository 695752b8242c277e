"""Why pymodbus is not the agent's Modbus master (docs/decisions.md 7), shown.

Each test puts pymodbus 3.x's asyncio serial master (``AsyncModbusSerialClient``,
the one an asyncio agent would use) and ours (``agent.fieldbus.links.ModbusLink``)
on the same emulated RTU line: the simulator's wire-timed bus on a real pty
(``simulator.rtu.RtuBus``), given one late reply on demand. For each reason,
pymodbus shows the fault and our master, in the same test, does not:

* no t3.5 silence before a request: pymodbus sends the next request as soon
  as the reply is in; Modbus over serial line (2.5.1.1) wants 3.5 characters
  of silence between frames;
* no input flush: a late reply that came in while the master was busy is
  still in the port when the next request goes out, and pymodbus takes it as
  the answer (its blocking ``ModbusSerialClient`` does drain the port first:
  shown too, so the reason is narrowed to the asyncio client);
* a late reply of another request accepted: RTU has no transaction id, and
  pymodbus takes the first well-formed frame of the slave after its request.

The fourth reason decisions 7 once gave, that pymodbus cannot discard a 2-wire
adapter's echo, is false on 3.x (``handle_local_echo``): the last test shows
both masters reading through an echoing line.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
from pymodbus.client import AsyncModbusSerialClient, ModbusSerialClient
from pymodbus.exceptions import ModbusIOException

from agent.fieldbus.links import ModbusLink, TransportError
from drivers.profiles import load_profile
from protocols.modbus import Space
from protocols.modbus.rtu import crc16
from simulator.rtu import RtuBus, RtuSlave

LATE = 0xBEEF  # the value a late reply carries: never a true reading of register 0 or 1
SLM = load_profile("sound_level_meter")  # input registers 0.. are its live readings


def _value(frame: bytes) -> int:
    """The one register of a function 4 reply frame."""
    return int.from_bytes(frame[3:5], "big")


class LateBus(RtuBus):
    """The simulator's RTU bus with slave 1, and one late reply on demand.

    ``late("timed", s)``: the reply to the next request carries :data:`LATE` and
    comes ``s`` seconds after its usual time. ``late("racing")``: that reply is
    held until the next request comes, then sent right before the genuine
    reply to it (the case no silence after a timeout can catch). ``genuine``
    lists the values of the replies that were not late, in order.
    """

    def __init__(self, *, baud: int = 9600, echo: bool = False) -> None:
        super().__init__([RtuSlave(SLM, slave=1)], baud=baud, echo=echo)
        self.arrivals: list[tuple[float, float]] = []  # (request came, its reply's last byte due)
        self.genuine: list[int] = []
        self._mode: str | None = None
        self._late_s = 0.0
        self._held: bytes | None = None

    def late(self, mode: str, late_s: float = 0.0) -> None:
        self._mode, self._late_s = mode, late_s

    def _serve(self, frame: bytes) -> tuple[float, bytes] | None:
        now = time.monotonic()
        out = super()._serve(frame)
        if out is None:
            return None
        delay, reply = out
        mode, self._mode = self._mode, None
        if mode is not None:
            body = reply[:3] + LATE.to_bytes(2, "big")
            late = body + crc16(body).to_bytes(2, "little")
            if mode == "racing":
                self._held = late
                return None
            return delay + self._late_s, late
        self.genuine.append(_value(reply))
        if self._held is not None:
            reply, self._held = self._held + reply, None
        # a request is written whole and read at once: it ends len x char after now
        self.arrivals.append((now, now + (len(frame) + len(reply)) * self.char_s + delay))
        return delay, reply

    def gaps(self) -> list[float]:
        """Silence on the line between each reply's last byte and the next request."""
        return [b[0] - a[1] for a, b in itertools.pairwise(self.arrivals)]

    def wait_sent(self, replies: int) -> None:
        """Block (the caller's event loop too) until ``replies`` replies are on the line."""
        deadline = time.monotonic() + 10
        while self.replies < replies:
            assert time.monotonic() < deadline, "the emulator sent no late reply"
            time.sleep(0.005)


@pytest.fixture
def bus() -> Iterator[LateBus]:
    with LateBus() as b:
        yield b


def _pymodbus(b: RtuBus, *, timeout: float = 0.2, echo: bool = False) -> AsyncModbusSerialClient:
    return AsyncModbusSerialClient(
        b.port, baudrate=b.baud, parity="N", timeout=timeout, retries=0, handle_local_echo=echo
    )


def _ours(b: RtuBus, **kw: bool) -> ModbusLink:
    return ModbusLink.serial(b.port, baud=b.baud, parity="N", timeout_s=0.2, **kw)


async def _their_read(client: AsyncModbusSerialClient, address: int = 0) -> int:
    reply = await client.read_input_registers(address, count=1, device_id=1)
    assert not reply.isError(), reply
    return int(reply.registers[0])


async def _our_read(link: ModbusLink, address: int = 0) -> int:
    return int((await link.read(Space.INPUT, address, 1, 1))[0])


# --------------------------------------------------------------------------- t3.5


async def test_no_t35_silence_before_a_request() -> None:
    """Back-to-back reads at 1200 baud (t3.5 = 32 ms): pymodbus sends the next
    request within a few ms of the reply's last byte, ours waits t3.5."""
    with LateBus(baud=1200) as b:
        client = _pymodbus(b, timeout=2)
        assert await client.connect()
        for _ in range(8):
            await _their_read(client)
        client.close()
        theirs = b.gaps()
    with LateBus(baud=1200) as b:
        link = _ours(b)
        for _ in range(8):
            await _our_read(link)
        link.close()
        ours = b.gaps()
    t35 = b.t35
    assert len(theirs) == len(ours) == 7
    # pymodbus: most requests follow the reply with less than half the silence due
    assert sum(g < t35 / 2 for g in theirs) >= 4, [round(g * 1000, 1) for g in theirs]
    # ours: every one after t3.5 (the 10 % is the emulator's own clock, a thread)
    assert min(ours) >= 0.9 * t35, [round(g * 1000, 1) for g in ours]


# --------------------------------------------------------------------------- input flush


async def test_no_input_flush_before_a_request(bus: LateBus) -> None:
    """A late reply lands in the port while the gateway's loop is busy (a
    blocking moment of the process, modelled by blocking it here); the next
    request goes out with it still there. pymodbus takes it; ours drains the
    port before it sends."""
    client = _pymodbus(bus)
    assert await client.connect()
    await _their_read(client)
    bus.late("timed", 0.3)  # past pymodbus's 0.2 s timeout
    with pytest.raises(ModbusIOException):
        await _their_read(client, 1)
    bus.wait_sent(2)  # the loop is blocked meanwhile: the late reply waits in the port
    assert await _their_read(client) == LATE
    client.close()

    with LateBus() as b:
        link = _ours(b)
        await _our_read(link)
        b.late("timed", 0.3)
        with pytest.raises(TransportError):
            await _our_read(link, 1)
        b.wait_sent(2)
        assert await _our_read(link) == b.genuine[-1] != LATE
        assert link.statistics()["stray_bytes"] >= 7  # the late reply, dropped
        link.close()


def test_the_blocking_pymodbus_client_drains_the_port() -> None:
    """The same late reply in the port: ``ModbusSerialClient.send`` reads what
    waits and drops it. The reason holds for the asyncio client only."""
    with LateBus() as b:
        client = ModbusSerialClient(b.port, baudrate=b.baud, parity="N", timeout=0.2, retries=0)
        assert client.connect()
        assert not client.read_input_registers(0, count=1, device_id=1).isError()
        b.late("timed", 0.3)
        with pytest.raises(ModbusIOException):
            client.read_input_registers(1, count=1, device_id=1)
        b.wait_sent(2)
        reply = client.read_input_registers(0, count=1, device_id=1)
        client.close()
    assert reply.registers == [b.genuine[-1]] != [LATE]


# --------------------------------------------------------------------------- late reply


async def test_late_reply_of_another_request_is_accepted(bus: LateBus) -> None:
    """The late reply to a timed-out request comes right before the genuine
    reply to the next one, same slave, same function, same length: pymodbus
    returns the late value, ours the genuine one."""
    client = _pymodbus(bus)
    assert await client.connect()
    await _their_read(client)
    bus.late("racing")
    with pytest.raises(ModbusIOException):
        await _their_read(client, 1)
    assert await _their_read(client) == LATE
    client.close()

    with LateBus() as b:
        link = _ours(b)
        await _our_read(link)
        b.late("racing")
        with pytest.raises(TransportError):
            await _our_read(link, 1)
        assert await _our_read(link) == b.genuine[-1] != LATE
        assert link.statistics()["late_replies"] == 1
        link.close()


# --------------------------------------------------------------------------- echo


@pytest.mark.parametrize("master", ["pymodbus", "ours"])
async def test_both_discard_a_2_wire_adapters_echo(master: str) -> None:
    """Not a reason (any more): pymodbus 3.x discards the echo too
    (``handle_local_echo``, as ours does with ``discard_echo``)."""
    with LateBus(echo=True) as b:
        if master == "pymodbus":
            client = _pymodbus(b, echo=True)
            assert await client.connect()
            got = [await _their_read(client, a) for a in (0, 1, 0)]
            client.close()
        else:
            link = _ours(b, discard_echo=True)
            got = [await _our_read(link, a) for a in (0, 1, 0)]
            assert link.statistics()["echo_errors"] == 0
            link.close()
    assert got == b.genuine and len(got) == 3
