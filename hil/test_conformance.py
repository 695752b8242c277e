"""Conformance: every function code the terminal supports, every exception it
can send, silence where the spec wants silence, answers in time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hil.bus import Bus, Target
from protocols.errors import DeviceException
from protocols.modbus.pdu import (
    DeviceIdRequest,
    DeviceIdResponse,
    DiagnosticsRequest,
    DiagnosticsResponse,
    ReadRegistersResponse,
    ReadRequest,
    WriteMultipleResponse,
    WriteRegistersRequest,
    WriteSingleRequest,
    WriteSingleResponse,
    read_request,
)
from protocols.modbus.rtu import adu, encode_request, exception_response

# the sound level meter's map (drivers/profiles/sound_level_meter.toml + firmware/regmap.py)
HR_AVERAGING = 32
HR_WEIGHTING = 33
HR_CAL = 34
HR_SLAVE = 35
HR_FW_VERSION = 38
HR_TEST_FAULT = 39
IR_COUNT = 14


def regs(bus: Bus, fc: int, address: int, count: int, slave: int | None = None) -> tuple[int, ...]:
    r = bus.request(ReadRequest(bus.slave if slave is None else slave, fc, address, count))
    assert isinstance(r, ReadRegistersResponse)
    assert len(r.registers) == count
    return r.registers


def counter(bus: Bus, sub: int) -> int:
    r = bus.request(DiagnosticsRequest(bus.slave, sub))
    assert isinstance(r, DiagnosticsResponse)
    return int.from_bytes(r.data, "big")


@pytest.fixture
def config_restored(bus: Bus) -> Iterator[tuple[int, ...]]:
    """The configuration registers, put back as they were after the test."""
    before = regs(bus, 3, HR_AVERAGING, 3)
    yield before
    bus.request(WriteRegistersRequest(bus.slave, HR_AVERAGING, before))


# ------------------------------------------------------------------ function codes


def test_fc3_reads_holding_registers(bus: Bus) -> None:
    r = regs(bus, 3, HR_AVERAGING, 8)
    assert 1 <= r[0] <= 3600  # averaging period
    assert r[1] in (0, 1, 2)  # weighting
    assert r[HR_FW_VERSION - HR_AVERAGING] >= 100  # firmware 1.0 or later


def test_fc4_reads_input_registers(bus: Bus) -> None:
    r = regs(bus, 4, 0, IR_COUNT)
    laeq, lafmax, lafmin = r[0] / 10, r[1] / 10, r[2] / 10
    assert 20.0 <= laeq <= 140.0
    assert lafmin <= laeq + 0.05 and laeq <= lafmax + 0.05
    uptime = r[8] << 16 | r[9]
    assert uptime >= 0
    assert r[13] == regs(bus, 3, HR_FW_VERSION, 1)[0]


def test_uptime_counts_seconds(bus: Bus) -> None:
    first = regs(bus, 4, 8, 2)
    bus.listen(1.2)
    second = regs(bus, 4, 8, 2)
    assert (second[0] << 16 | second[1]) > (first[0] << 16 | first[1])


def test_fc6_writes_one_register(bus: Bus, config_restored: tuple[int, ...]) -> None:
    new = 7 if config_restored[0] != 7 else 8
    r = bus.request(WriteSingleRequest(bus.slave, 6, HR_AVERAGING, new))
    assert r == WriteSingleResponse(bus.slave, 6, HR_AVERAGING, new)
    assert regs(bus, 3, HR_AVERAGING, 1) == (new,)


def test_fc16_writes_registers(bus: Bus, config_restored: tuple[int, ...]) -> None:
    values = (5, 1, 0xFFF6)  # 5 s, C weighting, -1.0 dB
    r = bus.request(WriteRegistersRequest(bus.slave, HR_AVERAGING, values))
    assert r == WriteMultipleResponse(bus.slave, 16, HR_AVERAGING, 3)
    assert regs(bus, 3, HR_AVERAGING, 3) == values


def test_fc8_returns_query_data(bus: Bus) -> None:
    data = b"\x12\x34\xab\xcd"
    r = bus.request(DiagnosticsRequest(bus.slave, 0, data))
    assert r == DiagnosticsResponse(bus.slave, 0, data)


def test_fc8_counters(bus: Bus) -> None:
    bus.request(DiagnosticsRequest(bus.slave, 10))  # clear
    regs(bus, 4, 0, 1)
    regs(bus, 4, 0, 1)
    assert counter(bus, 11) >= 3  # bus messages: the clear is counted after clearing or not
    assert counter(bus, 14) >= 3
    assert counter(bus, 12) == 0  # no CRC errors since the clear
    with pytest.raises(DeviceException):
        regs(bus, 3, 0, 1)
    assert counter(bus, 13) == 1  # one exception sent


def test_fc8_unknown_sub_function_is_exception_01(bus: Bus) -> None:
    with pytest.raises(DeviceException) as exc:
        bus.request(DiagnosticsRequest(bus.slave, 0x55))
    assert exc.value.code == 1


def test_fc43_basic_device_identification(bus: Bus) -> None:
    r = bus.request(DeviceIdRequest(bus.slave, read_code=1, object_id=0))
    assert isinstance(r, DeviceIdResponse)
    assert set(r.objects) == {0, 1, 2}
    assert r.objects[0]  # vendor name
    assert r.objects[1]  # product code
    assert r.objects[2][:1].isdigit()  # major.minor
    assert r.conformity & 0x7F in (1, 2, 3)


def test_fc43_one_object(bus: Bus) -> None:
    basic = bus.request(DeviceIdRequest(bus.slave, read_code=1))
    one = bus.request(DeviceIdRequest(bus.slave, read_code=4, object_id=1))
    assert isinstance(basic, DeviceIdResponse) and isinstance(one, DeviceIdResponse)
    assert one.objects == {1: basic.objects[1]}


def test_fc43_regular_device_identification(bus: Bus) -> None:
    r = bus.request(DeviceIdRequest(bus.slave, read_code=2))
    assert isinstance(r, DeviceIdResponse)
    assert {0, 1, 2} <= set(r.objects)


# ------------------------------------------------------------------ exceptions


def test_exception_01_illegal_function(bus: Bus) -> None:
    with pytest.raises(DeviceException) as exc:
        bus.request(ReadRequest(bus.slave, 1, 0, 8))  # coils: the terminal has none
    assert (exc.value.code, exc.value.function) == (1, 1)


def test_exception_02_illegal_data_address(bus: Bus) -> None:
    with pytest.raises(DeviceException) as exc:
        regs(bus, 3, 0, 1)
    assert exc.value.code == 2
    with pytest.raises(DeviceException) as exc:
        regs(bus, 4, IR_COUNT - 2, 3)  # runs past the last input register
    assert exc.value.code == 2


def test_exception_02_read_only_register(bus: Bus) -> None:
    with pytest.raises(DeviceException) as exc:
        bus.request(WriteSingleRequest(bus.slave, 6, HR_FW_VERSION, 1))
    assert exc.value.code == 2


def test_exception_03_illegal_data_value(bus: Bus, config_restored: tuple[int, ...]) -> None:
    with pytest.raises(DeviceException) as exc:
        bus.request(WriteSingleRequest(bus.slave, 6, HR_AVERAGING, 0))  # 1..3600
    assert exc.value.code == 3
    assert regs(bus, 3, HR_AVERAGING, 1) == config_restored[:1]  # nothing written
    # a read of 0 registers (encode_request refuses to build one; read_request does not check)
    bus.send(adu(bus.slave, read_request(3, HR_AVERAGING, 0)))
    reply = bus.listen(0.3)
    assert reply == exception_response(bus.slave, 3, 3)


def test_exception_04_device_failure(bus: Bus) -> None:
    bus.request(WriteSingleRequest(bus.slave, 6, HR_TEST_FAULT, 1))
    try:
        with pytest.raises(DeviceException) as exc:
            regs(bus, 4, 0, 7)
        assert exc.value.code == 4
        status = regs(bus, 4, 7, 1)[0]
        assert status & 4  # the fault bit
    finally:
        bus.request(WriteSingleRequest(bus.slave, 6, HR_TEST_FAULT, 0))
    assert len(regs(bus, 4, 0, 7)) == 7


# ------------------------------------------------------------------ silence


def test_bad_crc_is_answered_by_silence(bus: Bus) -> None:
    before = counter(bus, 12)
    frame = bytearray(encode_request(ReadRequest(bus.slave, 3, HR_AVERAGING, 1)))
    frame[-1] ^= 0x5A
    bus.send(bytes(frame))
    assert bus.listen() == b""
    assert counter(bus, 12) == before + 1  # counted as a communication error


def test_broadcast_write_is_answered_by_silence(bus: Bus, config_restored: tuple[int, ...]) -> None:
    new = 9 if config_restored[0] != 9 else 10
    bus.send(encode_request(WriteSingleRequest(0, 6, HR_AVERAGING, new)))
    assert bus.listen() == b""
    assert regs(bus, 3, HR_AVERAGING, 1) == (new,)  # but carried out


def test_broadcast_read_is_ignored(bus: Bus) -> None:
    bus.send(encode_request(ReadRequest(0, 4, 0, 1)))
    assert bus.listen() == b""


# ------------------------------------------------------------------ timing


def test_responses_within_the_response_timeout(bus: Bus, target: Target) -> None:
    bus.latencies.clear()
    for _ in range(20):
        regs(bus, 4, 0, IR_COUNT)
    assert len(bus.latencies) == 20
    assert max(bus.latencies) <= target.response_timeout


# ------------------------------------------------------------------ settings


def test_slave_address_applies_after_restart(bus: Bus, target: Target) -> None:
    """Written to flash, in force after "restart communications" (fc 8 sub 1)."""
    old = bus.slave
    new = 7 if old != 7 else 8
    bus.request(WriteSingleRequest(old, 6, HR_SLAVE, new))
    assert regs(bus, 3, HR_SLAVE, 1) == (new,)  # saved, not yet in force
    bus.request(DiagnosticsRequest(old, 1))
    bus.listen(0.2)
    try:
        assert regs(bus, 3, HR_SLAVE, 1, slave=new) == (new,)
        bus.send(encode_request(ReadRequest(old, 3, HR_SLAVE, 1)))
        assert bus.listen() == b""  # the old address is silent now
    finally:
        bus.request(WriteSingleRequest(new, 6, HR_SLAVE, old))
        bus.request(DiagnosticsRequest(new, 1))
        bus.listen(0.2)
    assert regs(bus, 3, HR_SLAVE, 1) == (old,)
