"""Robustness: noise on the line must not confuse the terminal."""

from __future__ import annotations

import random

from hil.bus import Bus, Target
from protocols.modbus.pdu import ReadRegistersResponse, ReadRequest
from protocols.modbus.rtu import encode_request

HR_FW_VERSION = 38


def version(bus: Bus) -> int:
    r = bus.request(ReadRequest(bus.slave, 3, HR_FW_VERSION, 1))
    assert isinstance(r, ReadRegistersResponse)
    return r.registers[0]


def test_garbage_then_a_valid_request(bus: Bus) -> None:
    expected = version(bus)
    rnd = random.Random(6)
    for size in (1, 7, 60, 255, 300):
        bus.send(bytes(rnd.randrange(256) for _ in range(size)))
        bus.listen(0.15)  # whatever garbage provokes, it must not stick
        assert version(bus) == expected


def test_truncated_frame_then_a_valid_request(bus: Bus) -> None:
    expected = version(bus)
    frame = encode_request(ReadRequest(bus.slave, 4, 0, 10))
    for cut in (1, 3, len(frame) - 1):
        bus.send(frame[:cut])
        assert bus.listen(0.2) == b""  # half a frame is no frame
        assert version(bus) == expected


def test_requests_back_to_back(bus: Bus) -> None:
    rnd = random.Random(7)
    for _ in range(50):
        address, count = rnd.randrange(0, 10), rnd.randrange(1, 5)
        r = bus.request(ReadRequest(bus.slave, 4, address, count))
        assert isinstance(r, ReadRegistersResponse)
        assert len(r.registers) == count


def test_request_to_another_slave_in_between(bus: Bus, target: Target) -> None:
    expected = version(bus)
    for _ in range(5):
        bus.send(encode_request(ReadRequest(target.other_slave, 3, HR_FW_VERSION, 1)))
        assert bus.listen(0.15) == b""
        assert version(bus) == expected
