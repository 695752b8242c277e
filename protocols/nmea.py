"""NMEA 0183 GNSS sentences: GGA and RMC fixes, framing, readings (sans-IO).

A sentence is ``$`` + talker (2 letters: GP, GN, GL, GA, BD...) + type (3 letters) +
``,``-separated fields + ``*hh`` + CR LF, at most 82 characters in all (NMEA 0183
§5.3). ``hh`` is the XOR of every character between ``$`` and ``*``, in hex.

Decisions:

* A sentence **without** ``*hh`` is refused by default (counted as
  ``missing_checksum``): on a noisy line one flipped digit moves a fix by
  kilometres, and every receiver we wire (u-blox, MediaTek, Quectel) sends one.
  ``Parser(require_checksum=False)`` accepts them, with ``checksummed=False`` on
  the fix.
* Sentence types other than GGA and RMC are skipped and counted
  (``unknown_sentences``), never errors. So are lines longer than ``max_length``
  (``too_long``; default 82, raise it for receivers in high-precision mode).
* A sentence with a good checksum whose fields do not parse is counted as
  ``decode_errors`` by the parser; :func:`decode_sentence` raises DecodeError.
* Empty fields (no fix yet) decode to None.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass

from protocols._buffer import StreamParser
from protocols.errors import ConfigError, DecodeError, FrameError, LocalError
from protocols.reading import Quality, Reading

__all__ = [
    "GGA",
    "KNOTS_TO_MPS",
    "MAX_LENGTH",
    "QUANTITIES",
    "RMC",
    "Frame",
    "Parser",
    "checksum",
    "decode_sentence",
    "encode_frame",
    "to_readings",
]

MAX_LENGTH = 82
KNOTS_TO_MPS = 1852 / 3600

_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_UINT = re.compile(r"\d+")
_TIME = re.compile(r"(\d\d)(\d\d)(\d\d)(?:\.(\d+))?")
_DATE = re.compile(r"(\d\d)(\d\d)(\d\d)")
_LAT = re.compile(r"(\d\d)(\d\d(?:\.\d+)?)")
_LON = re.compile(r"(\d\d\d)(\d\d(?:\.\d+)?)")
_ADDRESS = re.compile(r"([A-Z][A-Z0-9])([A-Z]{3})")


@dataclass(frozen=True, slots=True)
class GGA:
    """Global positioning system fix data. Degrees (S, W negative), metres."""

    talker: str
    time: dt.time | None
    latitude: float | None
    longitude: float | None
    quality: int  # 0 no fix, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, 6 dead reckoning...
    satellites: int | None
    hdop: float | None
    altitude: float | None  # above mean sea level
    geoid_separation: float | None = None
    checksummed: bool = True


@dataclass(frozen=True, slots=True)
class RMC:
    """Recommended minimum specific GNSS data. Degrees, knots, degrees true."""

    talker: str
    time: dt.time | None
    status: str  # "A" valid, "V" void (no fix, or a warning)
    latitude: float | None
    longitude: float | None
    speed_knots: float | None
    course: float | None
    date: dt.date | None
    magnetic_variation: float | None = None  # E positive, W negative
    mode: str | None = None  # NMEA 2.3+: A autonomous, D differential, N not valid...
    checksummed: bool = True

    @property
    def valid(self) -> bool:
        return self.status == "A"

    @property
    def speed_mps(self) -> float | None:
        return None if self.speed_knots is None else self.speed_knots * KNOTS_TO_MPS


Frame = GGA | RMC

# ---------------------------------------------------------------- decoding


def checksum(body: str | bytes) -> int:
    """XOR of the characters between ``$`` and ``*``."""
    data = body.encode("ascii") if isinstance(body, str) else body
    x = 0
    for b in data:
        x ^= b
    return x


def _opt(field: str, pattern: re.Pattern[str], what: str) -> str | None:
    if field == "":
        return None
    if not pattern.fullmatch(field):
        raise DecodeError(f"NMEA: bad {what} {field!r}")
    return field


def _float(field: str, what: str) -> float | None:
    f = _opt(field, _NUMBER, what)
    return None if f is None else float(f)


def _int(field: str, what: str) -> int | None:
    f = _opt(field, _UINT, what)
    return None if f is None else int(f)


def _time(field: str) -> dt.time | None:
    if field == "":
        return None
    m = _TIME.fullmatch(field)
    if not m:
        raise DecodeError(f"NMEA: bad UTC time {field!r}")
    h, mi, s = int(m[1]), int(m[2]), int(m[3])
    us = int((m[4] or "0")[:6].ljust(6, "0"))
    if s == 60:  # a leap second: datetime.time has no 23:59:60
        s, us = 59, 999_999
    try:
        return dt.time(h, mi, s, us, tzinfo=dt.UTC)
    except ValueError as exc:
        raise DecodeError(f"NMEA: bad UTC time {field!r}") from exc


def _date(field: str) -> dt.date | None:
    if field == "":
        return None
    m = _DATE.fullmatch(field)
    if not m:
        raise DecodeError(f"NMEA: bad date {field!r}")
    yy = int(m[3])
    try:  # two-digit years: 80..99 are 1980..1999 (GPS began in 1980)
        return dt.date(1900 + yy if yy >= 80 else 2000 + yy, int(m[2]), int(m[1]))
    except ValueError as exc:
        raise DecodeError(f"NMEA: bad date {field!r}") from exc


def _angle(value: str, hemisphere: str, lat: bool) -> float | None:
    """``ddmm.mmmm`` / ``dddmm.mmmm`` plus N/S/E/W into signed decimal degrees."""
    if value == "" and hemisphere == "":
        return None
    m = (_LAT if lat else _LON).fullmatch(value)
    ok = ("N", "S") if lat else ("E", "W")
    if not m or hemisphere not in ok:
        raise DecodeError(
            f"NMEA: bad {'latitude' if lat else 'longitude'} {value!r},{hemisphere!r}"
        )
    degrees, minutes = int(m[1]), float(m[2])
    if minutes >= 60 or degrees + minutes / 60 > (90 if lat else 180):
        raise DecodeError(f"NMEA: {value!r} is out of range")
    angle = degrees + minutes / 60
    return -angle if hemisphere in ("S", "W") else angle


def _fields(n: int, fields: list[str], kind: str) -> list[str]:
    if len(fields) < n:
        raise DecodeError(f"NMEA: {kind} has {len(fields)} fields, expected {n}")
    return fields


def _gga(talker: str, f: list[str], checked: bool) -> GGA:
    f = _fields(14, f, "GGA")
    quality = _int(f[5], "fix quality")
    return GGA(
        talker=talker,
        time=_time(f[0]),
        latitude=_angle(f[1], f[2], True),
        longitude=_angle(f[3], f[4], False),
        quality=0 if quality is None else quality,
        satellites=_int(f[6], "satellite count"),
        hdop=_float(f[7], "HDOP"),
        altitude=_float(f[8], "altitude"),
        geoid_separation=_float(f[10], "geoid separation"),
        checksummed=checked,
    )


def _rmc(talker: str, f: list[str], checked: bool) -> RMC:
    f = _fields(11, f, "RMC")
    if f[1] not in ("A", "V"):
        raise DecodeError(f"NMEA: RMC status {f[1]!r}, expected A or V")
    variation = _float(f[9], "magnetic variation")
    if variation is not None and f[10] == "W":
        variation = -variation
    return RMC(
        talker=talker,
        time=_time(f[0]),
        status=f[1],
        latitude=_angle(f[2], f[3], True),
        longitude=_angle(f[4], f[5], False),
        speed_knots=_float(f[6], "speed"),
        course=_float(f[7], "course"),
        date=_date(f[8]),
        magnetic_variation=variation,
        mode=(f[11] or None) if len(f) > 11 else None,
        checksummed=checked,
    )


def decode_sentence(line: bytes | str, *, require_checksum: bool = True) -> Frame | None:
    """Decode one sentence (with or without CR LF); None if its type is not GGA/RMC.

    Raises FrameError for bad framing or checksum, DecodeError for bad fields.
    """
    if isinstance(line, bytes):
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError as exc:
            raise FrameError("NMEA: sentence is not ASCII") from exc
    elif line.isascii():
        text = line
    else:
        raise FrameError("NMEA: sentence is not ASCII")
    text = text.rstrip("\r\n")
    if not text.startswith("$"):
        raise FrameError(f"NMEA: sentence does not start with $: {text[:12]!r}")
    body, star, given = text[1:].partition("*")
    if star:
        if len(given) != 2 or not all(c in "0123456789abcdefABCDEF" for c in given):
            raise FrameError(f"NMEA: bad checksum field {given!r}")
        if int(given, 16) != checksum(body):
            raise FrameError(f"NMEA: checksum {given}, computed {checksum(body):02X}")
    elif require_checksum:
        raise FrameError("NMEA: sentence has no checksum")
    if not body.isprintable():
        raise FrameError("NMEA: control characters in sentence")
    address, *fields = body.split(",")
    m = _ADDRESS.fullmatch(address)
    if not m:
        return None  # proprietary ($PUBX...) or unknown: not ours
    talker, kind = m[1], m[2]
    if kind == "GGA":
        return _gga(talker, fields, bool(star))
    if kind == "RMC":
        return _rmc(talker, fields, bool(star))
    return None


# ---------------------------------------------------------------- encoding


def _fmt_angle(value: float | None, lat: bool) -> str:
    if value is None:
        return ","
    if not (-90 <= value <= 90 if lat else -180 <= value <= 180):
        raise LocalError(f"NMEA: {'latitude' if lat else 'longitude'} {value} out of range")
    units = round(abs(value) * 60 * 100_000)  # 1e-5 minute, about 2 cm
    degrees, minutes = divmod(units, 60 * 100_000)
    hemi = ("N" if value >= 0 else "S") if lat else ("E" if value >= 0 else "W")
    width = 2 if lat else 3
    return f"{degrees:0{width}d}{minutes // 100_000:02d}.{minutes % 100_000:05d},{hemi}"


def _fmt_time(t: dt.time | None) -> str:
    return "" if t is None else f"{t:%H%M%S}.{t.microsecond // 10_000:02d}"


def _fmt(value: float | int | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def encode_frame(frame: Frame) -> bytes:
    """The sentence a receiver would send, CR LF included (canonical formatting:
    hhmmss.ss, 5 decimals of minutes, 1 decimal elsewhere)."""
    if isinstance(frame, GGA):
        fields = [
            _fmt_time(frame.time),
            _fmt_angle(frame.latitude, True),
            _fmt_angle(frame.longitude, False),
            str(frame.quality),
            _fmt(frame.satellites, "02d"),
            _fmt(frame.hdop, ".1f"),
            _fmt(frame.altitude, ".1f"),
            "M" if frame.altitude is not None else "",
            _fmt(frame.geoid_separation, ".1f"),
            "M" if frame.geoid_separation is not None else "",
            "",
            "",
        ]
        kind = "GGA"
    else:
        variation = frame.magnetic_variation
        fields = [
            _fmt_time(frame.time),
            frame.status,
            _fmt_angle(frame.latitude, True),
            _fmt_angle(frame.longitude, False),
            _fmt(frame.speed_knots, ".1f"),
            _fmt(frame.course, ".1f"),
            "" if frame.date is None else f"{frame.date:%d%m%y}",
            _fmt(None if variation is None else abs(variation), ".1f"),
            "" if variation is None else ("W" if variation < 0 else "E"),
        ]
        if frame.mode is not None:
            fields.append(frame.mode)
        kind = "RMC"
    body = ",".join([frame.talker + kind, *fields])
    text = f"${body}*{checksum(body):02X}\r\n"
    if len(text) > MAX_LENGTH:
        raise LocalError(f"NMEA: encoded sentence has {len(text)} characters, max {MAX_LENGTH}")
    return text.encode("ascii")


# ---------------------------------------------------------------- stream


class Parser(StreamParser[Frame]):
    """Finds sentences in a byte stream: from a ``$`` to the next LF.

    If a line holds several ``$`` (a sentence cut short by a receiver reset, then a
    whole one), the part after the last ``$`` is taken and the rest counted as
    skipped. A ``$`` not followed by a LF within ``max_length`` bytes is dropped and
    the search resumes at the next ``$``.
    """

    MAX_FRAME = 256

    def __init__(
        self,
        *,
        require_checksum: bool = True,
        max_length: int = MAX_LENGTH,
        max_buffer: int = 1024,
    ) -> None:
        if not 11 <= max_length <= self.MAX_FRAME:
            raise LocalError(f"max_length {max_length} outside 11..{self.MAX_FRAME}")
        super().__init__(max_buffer=max_buffer)
        self.require_checksum = require_checksum
        self.max_length = max_length
        self._scanned = 0  # bytes after the leading $ already searched for LF
        for name in ("unknown_sentences", "decode_errors", "missing_checksum", "too_long"):
            self._counters[name] = 0

    def _parse(self, out: list[Frame]) -> None:
        buf = self._buf
        while True:
            start = buf.find(b"$")
            if start < 0:
                self._scanned = 0
                self._skip(len(buf))
                return
            if start:
                self._scanned = 0
                self._skip(start)
            end = buf.find(b"\n", self._scanned)
            if end < 0:
                if len(buf) >= self.max_length:
                    self._count("too_long")
                    self._scanned = 0
                    self._skip(1)
                    continue
                self._scanned = len(buf)
                return
            line = buf.take(end + 1)
            buf.commit()
            self._scanned = 0
            assert line is not None
            last = line.rfind(b"$")
            if last > 0:
                self._count("bytes_skipped", last)
                line = line[last:]
            self._line(line, out)

    def _line(self, line: bytes, out: list[Frame]) -> None:
        if len(line) > self.max_length:
            self._count("too_long")
            self._count("bytes_skipped", len(line))
            return
        if self.require_checksum and b"*" not in line:
            self._count("missing_checksum")
            self._count("bytes_skipped", len(line))
            return
        try:
            frame = decode_sentence(line, require_checksum=self.require_checksum)
        except DecodeError:
            self._count("decode_errors")
            self._count("bytes_skipped", len(line))
            return
        except FrameError:
            self._count("checksum_errors")
            self._count("bytes_skipped", len(line))
            return
        if frame is None:
            self._count("unknown_sentences")
            return
        out.append(frame)


# ---------------------------------------------------------------- readings

QUANTITIES = frozenset(
    {"lat", "lon", "alt", "hdop", "satellites", "fix_quality", "speed", "course", "fix_valid"}
)
_POSITION = frozenset({"lat", "lon", "alt", "speed", "course"})


def to_readings(frame: Frame, ts_ms: int, point_ids: Mapping[str, int]) -> list[Reading]:
    """Readings of the quantities in ``point_ids`` that this sentence type carries.

    ``lat``/``lon`` degrees, ``alt`` m (GGA), ``speed`` m/s and ``course`` degrees
    (RMC), ``hdop``, ``satellites``, ``fix_quality`` (GGA), ``fix_valid`` (RMC).
    Without a fix (GGA quality 0, RMC status V) or with an empty field, position
    quantities are sent as value None with quality COMM_ERROR, never as a stale
    position that looks good.
    """
    unknown = sorted(set(point_ids) - QUANTITIES)
    if unknown:
        known = ", ".join(sorted(QUANTITIES))
        raise ConfigError(
            [("nmea points", f"unknown quantity {n!r} (known: {known})") for n in unknown]
        )
    values: dict[str, float | int | bool | None]
    if isinstance(frame, GGA):
        fix = frame.quality != 0
        values = {
            "lat": frame.latitude,
            "lon": frame.longitude,
            "alt": frame.altitude,
            "hdop": frame.hdop,
            "satellites": frame.satellites,
            "fix_quality": frame.quality,
        }
    else:
        fix = frame.valid
        values = {
            "lat": frame.latitude,
            "lon": frame.longitude,
            "speed": frame.speed_mps,
            "course": frame.course,
            "fix_valid": frame.valid,
        }
    readings = []
    for name, value in values.items():
        if name not in point_ids:
            continue
        if value is None or (name in _POSITION and not fix):
            readings.append(Reading(point_ids[name], ts_ms, None, Quality.COMM_ERROR))
        else:
            readings.append(Reading(point_ids[name], ts_ms, value))
    return readings
