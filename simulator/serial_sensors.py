"""Emulated serial sensors on a pty: PMS5003, SDS011 and an NMEA GPS receiver.

Each emulator owns a pseudo terminal (``os.openpty``, both ends raw via
``tty.setraw``, 8N1: ptys refuse parity) and writes frames to it at the sensor's
rate; the code under test opens ``emulator.port`` like a real serial port::

    async with SerialSensorEmulator("pms5003", faults=Faults(garbage=0.2)) as emu:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(emu.run(), name="sim[pms5003].emit")
            ...  # open_serial(emu.port)

Values move like real ones: particulate matter follows a slow (hours) daily-ish
trend plus correlated noise; the GPS drives a loop through a city centre at street
speed. :class:`Faults` injects garbage bytes between frames, corrupted checksums and
frames cut short (a sensor reset mid-frame).

Each sensor talks at its own baud (9600, like the real ones). A reader that
opened the port at another baud (the pty keeps what it set:
:func:`simulator.pty.line_baud`) receives what a real UART would: wrong
bytes, never a frame with a good checksum (counted in ``garbled``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import random
import termios
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from protocols import nmea, pms5003, sds011
from protocols.errors import LocalError
from simulator.pty import line_baud

__all__ = [
    "CITY_LOOP",
    "Faults",
    "GpsTrack",
    "ParticulateModel",
    "SensorKind",
    "SerialSensorEmulator",
]

log = logging.getLogger(__name__)

SensorKind = Literal["pms5003", "sds011", "gps"]
# real emission periods, seconds: PMS5003 active mode ~1 s (0.2-0.8 s stable, 2.3 s
# fast-changing), SDS011 1 s in continuous mode, GPS 1 Hz
REAL_PERIOD: dict[str, float] = {"pms5003": 1.0, "sds011": 1.0, "gps": 1.0}

# A loop through central Shanghai (People's Square), lat/lon in degrees: ~5.6 km.
CITY_LOOP: tuple[tuple[float, float], ...] = (
    (31.23040, 121.47370),
    (31.23580, 121.47500),
    (31.23720, 121.48470),
    (31.23290, 121.49080),
    (31.22610, 121.48800),
    (31.22450, 121.47650),
)

_EARTH_M = 6_371_000.0


@dataclass(frozen=True, slots=True)
class Faults:
    """Per-frame probabilities of line faults (0 disables)."""

    garbage: float = 0.0  # 1..40 random bytes written before the frame
    corrupt: float = 0.0  # one byte of the frame flipped (checksum no longer matches)
    truncate: float = 0.0  # the frame cut short, as by a reset mid-frame


class ParticulateModel:
    """PM2.5 in µg/m³: a slow trend (period ``trend_hours``) plus AR(1) noise."""

    def __init__(self, *, seed: int = 0, base: float = 18.0, trend_hours: float = 6.0) -> None:
        self._rng = random.Random(seed)
        self.base = base
        self.trend_s = trend_hours * 3600
        self._noise = 0.0

    def pm2_5(self, t: float) -> float:
        self._noise = 0.95 * self._noise + self._rng.gauss(0, 0.6)
        trend = self.base * (1 + 0.5 * math.sin(2 * math.pi * t / self.trend_s))
        return max(0.0, trend + self._noise)


class GpsTrack:
    """Position along a closed polygon at constant speed (m/s), with heading."""

    def __init__(self, waypoints: tuple[tuple[float, float], ...] = CITY_LOOP, speed: float = 9.0):
        self.waypoints = waypoints
        self.speed = speed
        lat0 = math.radians(waypoints[0][0])
        self._k_lat = math.radians(1) * _EARTH_M
        self._k_lon = self._k_lat * math.cos(lat0)
        legs = list(zip(waypoints, waypoints[1:] + waypoints[:1], strict=True))
        self._legs = [(a, b, self._distance(a, b)) for a, b in legs]
        self.length = sum(d for *_, d in self._legs)

    def _distance(self, a: tuple[float, float], b: tuple[float, float]) -> float:
        return math.hypot((b[0] - a[0]) * self._k_lat, (b[1] - a[1]) * self._k_lon)

    def at(self, t: float) -> tuple[float, float, float]:
        """(latitude, longitude, course in degrees true) after ``t`` seconds."""
        s = (t * self.speed) % self.length
        for a, b, d in self._legs:
            if s <= d:
                f = s / d if d else 0.0
                dn = (b[0] - a[0]) * self._k_lat
                de = (b[1] - a[1]) * self._k_lon
                course = math.degrees(math.atan2(de, dn)) % 360
                return a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), course
            s -= d
        lat, lon = self.waypoints[0]
        return lat, lon, 0.0


class SerialSensorEmulator:
    """One emulated sensor on its own pty; ``sent`` records every good frame written."""

    def __init__(
        self,
        kind: SensorKind,
        *,
        period: float | None = None,
        faults: Faults = Faults(),
        seed: int = 0,
        clock: Callable[[], float] = time.time,
        device_id: int = 0x60A1,
        baud: int = 9600,
    ) -> None:
        if kind not in REAL_PERIOD:
            raise LocalError(f"unknown sensor kind {kind!r}")
        self.kind = kind
        self.period = REAL_PERIOD[kind] if period is None else period
        self.faults = faults
        self.clock = clock
        self.device_id = device_id
        self.baud = baud
        self._rng = random.Random(seed)
        self._pm = ParticulateModel(seed=seed)
        self._track = GpsTrack()
        self._t0 = clock()
        self._master = -1
        self._slave = -1
        self.port = ""
        self.sent: list[object] = []  # frames written intact, in order
        self.counters = {
            "frames": 0,
            "garbage_bytes": 0,
            "corrupted": 0,
            "truncated": 0,
            "dropped": 0,
            "garbled": 0,
        }

    async def __aenter__(self) -> SerialSensorEmulator:
        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)  # 8N1 raw; parity stays off, ptys refuse PARENB
        attrs = termios.tcgetattr(self._slave)  # until a reader sets its own: ours
        attrs[4] = attrs[5] = getattr(termios, f"B{self.baud}", attrs[5])
        termios.tcsetattr(self._slave, termios.TCSANOW, attrs)
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    async def run(self) -> None:
        """Emit frames forever at ``period`` (run it in a TaskGroup, cancel to stop)."""
        if self._master < 0:
            raise LocalError("use `async with SerialSensorEmulator(...)` first")
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            for payload in self.next_chunks():
                self._write(payload)
            next_at += self.period
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def next_chunks(self) -> list[bytes]:
        """The bytes of one emission period (faults applied); records good frames."""
        t = self.clock() - self._t0
        chunks: list[bytes] = []
        for frame, wire in self._frames(t):
            rng, f = self._rng, self.faults
            if rng.random() < f.garbage:
                junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
                chunks.append(junk)
                self.counters["garbage_bytes"] += len(junk)
            if rng.random() < f.truncate:
                chunks.append(wire[: rng.randint(1, len(wire) - 1)])
                self.counters["truncated"] += 1
                continue
            if rng.random() < f.corrupt:
                bad = bytearray(wire)
                bad[rng.randrange(2, len(bad) - 3)] ^= 1 << rng.randrange(8)
                chunks.append(bytes(bad))
                self.counters["corrupted"] += 1
                continue
            chunks.append(wire)
            self.sent.append(frame)
            self.counters["frames"] += 1
        return chunks

    def _frames(self, t: float) -> list[tuple[object, bytes]]:
        if self.kind == "pms5003":
            m = self._pms(t)
            return [(m, pms5003.encode_frame(m))]
        if self.kind == "sds011":
            pm25 = self._pm.pm2_5(t)
            s = sds011.Measurement(
                round(pm25, 1), round(pm25 * 1.4 + self._rng.uniform(0, 2), 1), self.device_id
            )
            return [(s, sds011.encode_frame(s))]
        return [(nmea.decode_sentence(w), w) for w in self._gps(t)]

    def _pms(self, t: float) -> pms5003.Measurement:
        pm25 = self._pm.pm2_5(t)
        pm1, pm10 = pm25 * 0.68, pm25 * 1.25 + self._rng.uniform(0, 3)
        # CF=1 equals atmospheric below ~30 µg/m³ and reads higher above it
        cf = 1.0 if pm25 < 30 else 1 + (pm25 - 30) / 100
        n03 = pm25 * 110 + 250
        ratios = (1.0, 0.3, 0.06, 0.008, 0.002, 0.0006)
        n = [min(0xFFFF, round(n03 * r)) for r in ratios]
        return pms5003.Measurement(
            round(pm1 * cf),
            round(pm25 * cf),
            round(pm10 * cf),
            round(pm1),
            round(pm25),
            round(pm10),
            n[0],
            n[1],
            n[2],
            n[3],
            n[4],
            n[5],
            version=0x97,
            error=0,
        )

    def _gps(self, t: float) -> list[bytes]:
        lat, lon, course = self._track.at(t)
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        utc = now.time().replace(microsecond=now.microsecond // 10_000 * 10_000, tzinfo=dt.UTC)
        jitter = self._rng.gauss(0, 0.3) / 111_000  # ~0.3 m of position noise
        sats = 9 + self._rng.randint(-2, 3)
        gga = nmea.GGA("GN", utc, lat + jitter, lon, 1, sats, 0.9, 12.0, 9.5)
        speed = self._track.speed / nmea.KNOTS_TO_MPS
        rmc = nmea.RMC("GN", utc, "A", lat + jitter, lon, speed, course, now.date(), None, "A")
        return [nmea.encode_frame(gga), nmea.encode_frame(rmc)]

    def _write(self, data: bytes) -> None:
        heard = line_baud(self._slave)
        if heard is not None and heard != self.baud:
            # a UART at another baud: framing errors and wrong bytes, about as many as it
            # has character times while ours are sent
            n = max(1, len(data) * heard // self.baud)
            data = bytes(self._rng.randrange(256) for _ in range(min(n, 4096)))
            self.counters["garbled"] += len(data)
        # A UART does not wait: when nobody reads and the pty buffer is full, drop.
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        if written < len(data):
            self.counters["dropped"] += len(data) - written
