"""Nova Fitness SDS011 particulate-matter sensor: frames, commands, readings (sans-IO).

From the SDS011 data sheet V1.3 and its "Laser Dust Sensor Control Protocol" V1.3,
9600 8N1 (the sensor's UART, usually through its CH340 USB-serial adapter).

Data frame, 10 bytes (``Measurement``; sent every second in active mode)::

    0  0xAA      head
    1  0xC0      command: data
    2  PM2.5 lo  PM2.5 = (hi x 256 + lo) / 10 µg/m³
    3  PM2.5 hi
    4  PM10 lo   PM10 = (hi x 256 + lo) / 10 µg/m³
    5  PM10 hi
    6  ID byte 1 device id, as printed: byte 1 is the low byte
    7  ID byte 2
    8  checksum  = (bytes 2..7 summed) & 0xFF
    9  0xAB      tail

Reply frame, 10 bytes (``Reply``): ``AA C5 CMD D1 D2 D3 ID1 ID2 CHK AB``, the answer to
a command (reporting mode, sleep/work, working period, firmware version...).

Command frame, 19 bytes, host to sensor::

    0 0xAA, 1 0xB4, 2 command, 3..14 data (12 bytes), 15-16 device id (FF FF = all),
    17 checksum = (bytes 2..16 summed) & 0xFF, 18 0xAB
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from protocols._buffer import StreamParser
from protocols.errors import ConfigError, FrameError, LocalError
from protocols.reading import Reading

__all__ = [
    "ALL_DEVICES",
    "FRAME_SIZE",
    "QUANTITIES",
    "Command",
    "Frame",
    "Measurement",
    "Parser",
    "Reply",
    "decode_command",
    "decode_frame",
    "encode_command",
    "encode_frame",
    "query_command",
    "reporting_mode_command",
    "sleep_command",
    "to_readings",
    "work_period_command",
]

HEAD, TAIL = 0xAA, 0xAB
DATA, REPLY, HOST = 0xC0, 0xC5, 0xB4
FRAME_SIZE = 10
COMMAND_SIZE = 19
ALL_DEVICES = 0xFFFF


class Command(enum.IntEnum):
    """Command byte (byte 2) of a host command, repeated in byte 2 of the reply."""

    REPORTING_MODE = 2  # data[0] 0 query / 1 set; data[1] 0 active / 1 query mode
    QUERY = 4  # passive ("query") mode: send one data frame now
    SET_ID = 5  # data[10..11] the new id
    SLEEP = 6  # data[0] 0 query / 1 set; data[1] 0 sleep / 1 work
    FIRMWARE = 7
    WORK_PERIOD = 8  # data[0] 0 query / 1 set; data[1] 0 continuous / 1..30 minutes


@dataclass(frozen=True, slots=True)
class Measurement:
    """PM2.5 and PM10 in µg/m³ (0.1 resolution) and the sending device's id."""

    pm2_5: float
    pm10: float
    device_id: int


@dataclass(frozen=True, slots=True)
class Reply:
    """A command reply: ``command`` and its three data bytes (meaning per command)."""

    command: int
    data: bytes
    device_id: int


Frame = Measurement | Reply
QUANTITIES = frozenset({"pm2_5", "pm10"})


def _tenths(value: float, name: str) -> int:
    n = round(value * 10)
    if not 0 <= n <= 0xFFFF:
        raise LocalError(f"SDS011 {name} {value} outside 0..6553.5")
    return n


def _id(device_id: int) -> bytes:
    if not 0 <= device_id <= 0xFFFF:
        raise LocalError(f"SDS011 device id {device_id:#x} outside 0..0xFFFF")
    return device_id.to_bytes(2, "little")


def encode_frame(frame: Frame) -> bytes:
    """The 10 bytes the sensor sends for ``frame`` (what the emulator writes)."""
    if isinstance(frame, Reply):
        if len(frame.data) != 3 or not 0 <= frame.command <= 0xFF:
            raise LocalError(f"SDS011 reply needs one command byte and 3 data bytes: {frame!r}")
        body = bytes([frame.command]) + frame.data + _id(frame.device_id)
        kind = REPLY
    else:
        body = (
            _tenths(frame.pm2_5, "PM2.5").to_bytes(2, "little")
            + _tenths(frame.pm10, "PM10").to_bytes(2, "little")
            + _id(frame.device_id)
        )
        kind = DATA
    return bytes([HEAD, kind]) + body + bytes([sum(body) & 0xFF, TAIL])


def decode_frame(data: bytes) -> Frame:
    """Decode exactly one 10-byte frame; raise FrameError."""
    if len(data) != FRAME_SIZE:
        raise FrameError(f"SDS011: {len(data)} bytes, a frame has 10")
    if data[0] != HEAD or data[9] != TAIL or data[1] not in (DATA, REPLY):
        raise FrameError(f"SDS011: bad head/command/tail in {data.hex()}")
    if sum(data[2:8]) & 0xFF != data[8]:
        raise FrameError(f"SDS011: checksum {data[8]:#04x}, computed {sum(data[2:8]) & 0xFF:#04x}")
    device_id = int.from_bytes(data[6:8], "little")
    if data[1] == REPLY:
        return Reply(data[2], bytes(data[3:6]), device_id)
    return Measurement(
        int.from_bytes(data[2:4], "little") / 10,
        int.from_bytes(data[4:6], "little") / 10,
        device_id,
    )


def encode_command(command: Command, data: bytes = b"", *, device_id: int = ALL_DEVICES) -> bytes:
    """A 19-byte host command; ``data`` (up to 12 bytes) is zero-padded."""
    if len(data) > 12:
        raise LocalError(f"SDS011 command data has {len(data)} bytes, at most 12")
    body = bytes([Command(command)]) + data.ljust(12, b"\0") + _id(device_id)
    return bytes([HEAD, HOST]) + body + bytes([sum(body) & 0xFF, TAIL])


def decode_command(data: bytes) -> tuple[Command, bytes, int]:
    """Decode a 19-byte host command (for the emulator): (command, 12 data bytes, id)."""
    if len(data) != COMMAND_SIZE or data[0] != HEAD or data[1] != HOST or data[18] != TAIL:
        raise FrameError(f"SDS011: not a command frame: {data.hex()}")
    if sum(data[2:17]) & 0xFF != data[17]:
        raise FrameError("SDS011: command checksum mismatch")
    try:
        command = Command(data[2])
    except ValueError as exc:
        raise FrameError(f"SDS011: unknown command {data[2]}") from exc
    return command, bytes(data[3:15]), int.from_bytes(data[15:17], "little")


def query_command(*, device_id: int = ALL_DEVICES) -> bytes:
    """Ask for one data frame (passive mode)."""
    return encode_command(Command.QUERY, device_id=device_id)


def sleep_command(sleep: bool, *, device_id: int = ALL_DEVICES) -> bytes:
    """Put the sensor to sleep (laser and fan off) or wake it up."""
    return encode_command(Command.SLEEP, bytes([1, 0 if sleep else 1]), device_id=device_id)


def reporting_mode_command(active: bool, *, device_id: int = ALL_DEVICES) -> bytes:
    """Active mode (a frame every period) or query mode (a frame per QUERY)."""
    return encode_command(
        Command.REPORTING_MODE, bytes([1, 0 if active else 1]), device_id=device_id
    )


def work_period_command(minutes: int, *, device_id: int = ALL_DEVICES) -> bytes:
    """0: continuous (a frame each second); 1..30: work 30 s, then sleep, every n minutes."""
    if not 0 <= minutes <= 30:
        raise LocalError(f"SDS011 working period {minutes} outside 0..30 minutes")
    return encode_command(Command.WORK_PERIOD, bytes([1, minutes]), device_id=device_id)


class Parser(StreamParser[Frame]):
    """Finds frames in a byte stream; resynchronises on the next 0xAA after garbage.

    A candidate with a wrong command, tail or checksum costs one byte, so a genuine
    frame starting inside it is still found.
    """

    MAX_FRAME = FRAME_SIZE

    def _parse(self, out: list[Frame]) -> None:
        buf = self._buf
        while True:
            i = buf.find(bytes([HEAD]))
            if i < 0:
                self._skip(len(buf))
                return
            self._skip(i)
            raw = buf.take(FRAME_SIZE)
            if raw is None:
                # incomplete, but give up early on a wrong command byte
                second = buf.peek(1, 1)
                buf.rollback()
                if second is not None and second[0] not in (DATA, REPLY):
                    self._skip(1)
                    continue
                return
            if raw[1] not in (DATA, REPLY) or raw[9] != TAIL:
                self._count("framing_errors")
                self._skip(1)
                continue
            if sum(raw[2:8]) & 0xFF != raw[8]:
                self._count("checksum_errors")
                self._skip(1)
                continue
            buf.commit()
            out.append(decode_frame(raw))


def to_readings(frame: Frame, ts_ms: int, point_ids: Mapping[str, int]) -> list[Reading]:
    """Readings of ``pm2_5`` and/or ``pm10`` (µg/m³), as named in ``point_ids``."""
    unknown = sorted(set(point_ids) - QUANTITIES)
    if unknown:
        raise ConfigError(
            [("sds011 points", f"unknown quantity {n!r} (known: pm10, pm2_5)") for n in unknown]
        )
    if isinstance(frame, Reply):
        return []
    values = {"pm2_5": frame.pm2_5, "pm10": frame.pm10}
    return [Reading(point_ids[n], ts_ms, v) for n, v in values.items() if n in point_ids]
