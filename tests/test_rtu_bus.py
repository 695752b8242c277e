"""The emulated RTU bus (simulator.rtu) on its own and under an independent master.

``mbpoll`` (Debian) is a Modbus master that is not ours: if it reads the
emulator right, the emulator speaks Modbus RTU, not just our dialect of it.
Timings are not asserted here (``bench.bus`` measures them); the wire model's
arithmetic is.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from agent.clock import SystemClock
from agent.fieldbus.links import ModbusLink
from agent.fieldbus.poller import BusPoller, DeviceState, PolledDevice
from drivers.profiles import load_profile
from protocols.modbus import Space, decode
from protocols.modbus.rtu import crc16, read_input_registers
from protocols.reading import Quality, Reading
from simulator.rtu import RtuBus, RtuSlave, main

SLM = load_profile("sound_level_meter")
RAIN = load_profile("rain_gauge")


@pytest.fixture
def bus() -> Iterator[RtuBus]:
    with RtuBus([RtuSlave(SLM, slave=1), RtuSlave(RAIN, slave=2, seed=5)], baud=19200) as b:
        yield b


def _raw(b: RtuBus) -> int:
    """A raw master fd on the bus's port, at the bus's baud (it hears no other)."""
    import termios
    import tty

    fd = os.open(b.port, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[4] = attrs[5] = getattr(termios, f"B{b.baud}")
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


def _transact(fd: int, frame: bytes, want: int, timeout: float = 1.0) -> bytes:
    os.write(fd, frame)
    out = b""
    deadline = time.monotonic() + timeout
    import select

    while len(out) < want and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            out += os.read(fd, 256)
    return out


def test_reply_frames_are_valid_rtu(bus: RtuBus) -> None:
    fd = _raw(bus)
    try:
        reply = _transact(fd, read_input_registers(1, 0, 10), 25)
        assert len(reply) == 25
        assert reply[:3] == bytes([1, 4, 20])
        assert crc16(reply[:-2]) == int.from_bytes(reply[-2:], "little")
        laeq = decode(SLM.point("laeq").spec, [int.from_bytes(reply[3:5], "big")])
        assert isinstance(laeq, float) and 20 <= laeq <= 140
        # outside the map: exception 02
        reply = _transact(fd, read_input_registers(2, 50, 2), 5)
        assert reply[:3] == bytes([2, 0x84, 2])
        # another address, a bad CRC: silence
        assert _transact(fd, read_input_registers(9, 0, 1), 1, 0.2) == b""
        bad = bytearray(read_input_registers(1, 0, 1))
        bad[-1] ^= 0xFF
        assert _transact(fd, bytes(bad), 1, 0.2) == b""
        assert bus.bad_frames == 1
    finally:
        os.close(fd)


def test_wire_model_arithmetic() -> None:
    b = RtuBus([RtuSlave(SLM, slave=1)], baud=9600)
    try:
        assert b.char_s == pytest.approx(10 / 9600)  # 8N1 on a pty: 10 bits a character
        assert b.t35 == pytest.approx(3.5 * 11 / 9600)  # the spec counts 11 bits
        fast = RtuBus([RtuSlave(SLM, slave=1)], baud=115200)
        assert fast.t35 == 0.00175  # fixed above 19200
        fast.stop()
    finally:
        b.stop()


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        ("silent", lambda r: r == b""),
        ("crc", lambda r: len(r) == 25 and crc16(r[:-2]) != int.from_bytes(r[-2:], "little")),
        ("exception", lambda r: r[:3] == bytes([1, 0x84, 6])),
        ("garbage", lambda r: len(r) == 25 and r[:3] != bytes([1, 4, 20])),
    ],
)
def test_faults_on_demand(bus: RtuBus, fault: str, check: object) -> None:
    bus.slaves[1].fault = fault
    bus.slaves[1].code = 6
    fd = _raw(bus)
    try:
        reply = _transact(fd, read_input_registers(1, 0, 10), 25, 0.3)
        assert callable(check) and check(reply), reply.hex()
        # the neighbour is unaffected
        assert len(_transact(fd, read_input_registers(2, 0, 7), 19)) == 19
    finally:
        os.close(fd)


def test_late_reply_arrives_after_the_delay(bus: RtuBus) -> None:
    bus.slaves[1].fault = "late"
    bus.slaves[1].delay_s = 0.3
    fd = _raw(bus)
    try:
        assert _transact(fd, read_input_registers(1, 0, 10), 25, 0.1) == b""
        assert len(_transact(fd, b"", 25, 1.0)) == 25  # then it comes anyway
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("mbpoll") is None, reason="needs mbpoll (apt-get install mbpoll)")
def test_mbpoll_reads_the_emulator(bus: RtuBus) -> None:
    bus.slaves[2].registers.write(Space.HOLDING, 16, [1234])
    out = subprocess.run(
        [
            "mbpoll",
            "-m",
            "rtu",
            "-b",
            "19200",
            "-P",
            "none",
            "-a",
            "2",
            "-t",
            "4",
            "-r",
            "17",
            "-c",
            "1",
            "-1",
            bus.port,
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 0, out.stderr
    assert "[17]: \t1234" in out.stdout


def test_main_prints_the_port_first_and_stats_last(tmp_path: object) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator.rtu",
            "--profile",
            "rain_gauge",
            "--count",
            "3",
            "--baud",
            "38400",
            "--fault",
            "3:silent",
            "--duration",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("/dev/pts/")
    import json

    stats = json.loads(lines[-1])
    assert stats["baud"] == 38400
    assert stats["slaves"]["3"]["fault"] == "silent"
    assert set(stats["slaves"]) == {"1", "2", "3"}
    with pytest.raises(SystemExit):
        main(["--fault", "1:explode"])


async def test_agent_polls_an_emulated_bus_with_a_dead_slave() -> None:
    """The real poller, the real link and the emulator: dead slave 3 goes offline,
    the others keep delivering good readings."""
    slaves = [RtuSlave(SLM, slave=s, seed=s) for s in (1, 2, 3)]
    slaves[2].fault = "silent"
    readings: list[Reading] = []

    async def sink(rs: list[Reading]) -> None:
        readings.extend(rs)

    with RtuBus(slaves, baud=115200) as b:
        link = ModbusLink.serial(b.port, baud=115200, parity="N", timeout_s=0.05)
        measurements = [p for p in SLM.points if p.interval_s is None]
        devs = [
            PolledDevice(
                name=f"slm-{s}",
                slave=s,
                interval_s=0.1,
                max_registers=SLM.max_registers,
                max_gap=SLM.max_gap,
                points=[(10 * s + i, p) for i, p in enumerate(measurements)],
            )
            for s in (1, 2, 3)
        ]
        poller = BusPoller("rs485-1", link, devs, sink, SystemClock(), retries=1)
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(1.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert devs[0].state is DeviceState.ONLINE and devs[1].state is DeviceState.ONLINE
    assert devs[2].state is DeviceState.OFFLINE
    good = [r for r in readings if r.point < 30 and r.quality is Quality.GOOD]
    assert len(good) >= 2 * len(measurements) * 5
    assert all(r.quality is Quality.COMM_ERROR for r in readings if r.point >= 30)
    assert slaves[2].requests < 12  # back-off: the dead one was not asked every 0.1 s
