"""Plantower PMS5003 particulate-matter sensor: frames, commands, readings (sans-IO).

From the Plantower PMS5003 data manual (V2.3), 9600 8N1, 3.3 V TTL:

Data frame, 32 bytes, every big-endian u16 (``Measurement``)::

    0   0x42 'B'      start 1
    1   0x4D 'M'      start 2
    2-3 frame length  = 2 x 13 + 2 = 28
    4-9   data 1..3   PM1.0 / PM2.5 / PM10, µg/m³, CF=1 ("standard particle")
    10-15 data 4..6   PM1.0 / PM2.5 / PM10, µg/m³, under atmospheric environment
    16-27 data 7..12  particles > 0.3 / 0.5 / 1.0 / 2.5 / 5.0 / 10 µm in 0.1 L of air
    28    data 13 hi  version
    29    data 13 lo  error code
    30-31 check code  = sum of bytes 0..29 (u16)

Command frame, 7 bytes: ``42 4D CMD DATAH DATAL LRCH LRCL``, LRC = sum of bytes 0..4.
In passive mode the sensor answers ``READ`` with a data frame; it acknowledges
``CHANGE_MODE`` and ``SLEEP`` with an 8-byte frame of length 4 (``Ack``):
``42 4D 00 04 CMD DATA CHKH CHKL``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import astuple, dataclass

from protocols._buffer import StreamParser
from protocols.errors import ConfigError, FrameError, LocalError
from protocols.reading import Reading

__all__ = [
    "FRAME_SIZE",
    "QUANTITIES",
    "Ack",
    "Command",
    "Frame",
    "Measurement",
    "Parser",
    "decode_command",
    "decode_frame",
    "encode_command",
    "encode_frame",
    "to_readings",
]

START = b"\x42\x4d"
FRAME_SIZE = 32
_DATA_LENGTH = 28
_ACK_LENGTH = 4
_DATA = struct.Struct(">2sH12H2BH")  # start, length, 12 words, version, error, checksum
_ACK = struct.Struct(">2sH2BH")
_COMMAND = struct.Struct(">2sBHH")


class Command(enum.IntEnum):
    """Command bytes of the 7-byte command frame, with what DATA means."""

    READ = 0xE2  # passive mode: send one data frame now; DATA = 0
    CHANGE_MODE = 0xE1  # DATA = 0 passive, 1 active (the power-on default)
    SLEEP = 0xE4  # DATA = 0 sleep (fan off), 1 wake up (first frame ~30 s later)


@dataclass(frozen=True, slots=True)
class Measurement:
    """One data frame. Mass concentrations in µg/m³, counts per 0.1 L."""

    pm1_0_cf1: int
    pm2_5_cf1: int
    pm10_cf1: int
    pm1_0: int  # atmospheric environment: use these outdoors
    pm2_5: int
    pm10: int
    n0_3: int
    n0_5: int
    n1_0: int
    n2_5: int
    n5_0: int
    n10: int
    version: int = 0
    error: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    """The sensor's acknowledgement of a CHANGE_MODE or SLEEP command."""

    command: int
    data: int


Frame = Measurement | Ack

# quantity name (as used in point maps) -> Measurement field
_QUANTITY_FIELDS: dict[str, str] = {
    "pm1": "pm1_0",
    "pm2_5": "pm2_5",
    "pm10": "pm10",
    "pm1_cf1": "pm1_0_cf1",
    "pm2_5_cf1": "pm2_5_cf1",
    "pm10_cf1": "pm10_cf1",
    "n0_3": "n0_3",
    "n0_5": "n0_5",
    "n1_0": "n1_0",
    "n2_5": "n2_5",
    "n5_0": "n5_0",
    "n10": "n10",
    "error": "error",
}
QUANTITIES = frozenset(_QUANTITY_FIELDS)


def _sum16(data: bytes) -> int:
    return sum(data) & 0xFFFF


def encode_frame(frame: Frame) -> bytes:
    """The bytes the sensor sends for ``frame`` (what the emulator writes)."""
    try:
        if isinstance(frame, Ack):
            body = _ACK.pack(START, _ACK_LENGTH, frame.command, frame.data, 0)[:-2]
        else:
            body = _DATA.pack(START, _DATA_LENGTH, *astuple(frame), 0)[:-2]
    except struct.error as exc:
        raise LocalError(f"PMS5003 frame field out of range: {frame!r}") from exc
    return body + _sum16(body).to_bytes(2, "big")


def decode_frame(data: bytes) -> Frame:
    """Decode exactly one frame (32-byte data frame or 8-byte ack); raise FrameError."""
    if data[:2] != START:
        raise FrameError(f"PMS5003: bad start {data[:2].hex()}, expected 424d")
    if len(data) < 4:
        raise FrameError(f"PMS5003: {len(data)} bytes is too short for a frame")
    length = int.from_bytes(data[2:4], "big")
    if length not in (_DATA_LENGTH, _ACK_LENGTH):
        raise FrameError(f"PMS5003: frame length {length}, expected 28 or 4")
    if len(data) != 4 + length:
        raise FrameError(f"PMS5003: {len(data)} bytes for frame length {length}")
    expected = _sum16(data[:-2])
    got = int.from_bytes(data[-2:], "big")
    if got != expected:
        raise FrameError(f"PMS5003: checksum {got:#06x}, computed {expected:#06x}")
    if length == _ACK_LENGTH:
        _, _, command, value, _ = _ACK.unpack(data)
        return Ack(command, value)
    _, _, *words, _ = _DATA.unpack(data)
    return Measurement(*words)


def encode_command(command: Command, data: int = 0) -> bytes:
    """The 7-byte command frame: ``encode_command(Command.SLEEP, 1)`` wakes the sensor."""
    if not 0 <= data <= 0xFFFF:
        raise LocalError(f"PMS5003 command data {data} outside 0..65535")
    body = _COMMAND.pack(START, Command(command), data, 0)[:-2]
    return body + _sum16(body).to_bytes(2, "big")


def decode_command(data: bytes) -> tuple[Command, int]:
    """Decode a 7-byte command frame (for the emulator); raise FrameError."""
    if len(data) != _COMMAND.size or data[:2] != START:
        raise FrameError(f"PMS5003: not a command frame: {data.hex()}")
    _, command, value, check = _COMMAND.unpack(data)
    if check != _sum16(data[:-2]):
        raise FrameError("PMS5003: command checksum mismatch")
    try:
        return Command(command), value
    except ValueError as exc:
        raise FrameError(f"PMS5003: unknown command {command:#04x}") from exc


class Parser(StreamParser[Frame]):
    """Finds frames in a byte stream; resynchronises on the next ``42 4D`` after garbage.

    A candidate whose length field or checksum is wrong costs one byte: the search
    restarts at the byte after its ``0x42``, so a genuine frame hidden inside a
    corrupt candidate is still found.
    """

    MAX_FRAME = FRAME_SIZE

    def _parse(self, out: list[Frame]) -> None:
        buf = self._buf
        while True:
            i = buf.find(START)
            if i < 0:
                # keep a trailing 0x42: it may be the first half of the next start
                self._skip(len(buf) - int(buf.peek(1, len(buf) - 1) == START[:1]))
                return
            self._skip(i)
            head = buf.take(4)
            if head is None:
                buf.rollback()
                return
            length = int.from_bytes(head[2:4], "big")
            if length not in (_DATA_LENGTH, _ACK_LENGTH):
                self._count("length_errors")
                self._skip(1)
                continue
            rest = buf.take(length)
            if rest is None:
                buf.rollback()  # partial frame: wait, having copied only the header
                ahead = self._valid_frame_ahead()
                if ahead < 0:
                    return
                # A complete, valid frame starts inside this unfinished candidate: the
                # candidate was the head of a frame cut short (an 8-byte ack after a cut
                # data-frame header would otherwise wait for the next frame to show).
                self._skip(ahead)
                continue
            raw = head + rest
            if _sum16(raw[:-2]) != int.from_bytes(raw[-2:], "big"):
                self._count("checksum_errors")
                self._skip(1)
                continue
            buf.commit()
            out.append(decode_frame(raw))

    def _valid_frame_ahead(self) -> int:
        """Offset of the first complete, checksum-valid frame after offset 0, or -1."""
        buf = self._buf
        j = buf.find(START, 1)
        while j > 0:
            head = buf.peek(4, j)
            if head is None:
                return -1
            length = int.from_bytes(head[2:4], "big")
            if length in (_DATA_LENGTH, _ACK_LENGTH):
                raw = buf.peek(4 + length, j)
                if raw is not None and _sum16(raw[:-2]) == int.from_bytes(raw[-2:], "big"):
                    return j
            j = buf.find(START, j + 1)
        return -1


def to_readings(frame: Frame, ts_ms: int, point_ids: Mapping[str, int]) -> list[Reading]:
    """Readings of the quantities named in ``point_ids`` (see ``QUANTITIES``).

    ``pm1``/``pm2_5``/``pm10`` are the atmospheric-environment values; the CF=1 ones
    are ``pm1_cf1``... An ``Ack`` yields no reading.
    """
    _check_names(point_ids)
    if isinstance(frame, Ack):
        return []
    return [
        Reading(point_ids[name], ts_ms, getattr(frame, field))
        for name, field in _QUANTITY_FIELDS.items()
        if name in point_ids
    ]


def _check_names(point_ids: Mapping[str, int]) -> None:
    unknown = sorted(set(point_ids) - QUANTITIES)
    if unknown:
        known = ", ".join(sorted(QUANTITIES))
        raise ConfigError(
            [("pms5003 points", f"unknown quantity {n!r} (known: {known})") for n in unknown]
        )
