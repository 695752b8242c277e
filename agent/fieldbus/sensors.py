"""Serial sensors that stream frames of their own (not Modbus): one task per port.

A bus of kind ``serial-sensor`` carries one sensor (a Plantower PMS5003, a Nova
SDS011, a GPS receiver speaking NMEA 0183). Nothing is polled: the sensor talks
on its own, about once a second, and :class:`SensorReader` turns every frame
into readings of the profile's quantities, flagged ``OUT_OF_RANGE`` outside a
point's valid range. When the sensor falls silent for the bus's ``timeout_s``
its points read ``COMM_ERROR`` (once per silence) and the device goes offline;
an unplugged adapter is reopened with a capped back-off. The parsers are the
sans-IO ones in ``protocols/``; ``drivers.serial_sensors`` binds them to the port.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agent.clock import Clock
from agent.fieldbus.poller import DeviceState, PolledDevice
from agent.fieldbus.portlock import port_error
from drivers.profiles import Point
from drivers.serial_sensors import FdStream, LinkError, SensorSilent, SerialSensor, open_serial
from protocols import nmea, pms5003, sds011
from protocols.reading import Quality, Reading

__all__ = ["PARSERS", "SensorReader"]

log = logging.getLogger(__name__)

Sink = Callable[[list[Reading]], Awaitable[None]]

# profile protocol -> (a new parser, frame -> readings)
PARSERS: Mapping[str, tuple[Callable[[], Any], Callable[..., list[Reading]]]] = {
    "pms5003": (pms5003.Parser, pms5003.to_readings),
    "sds011": (sds011.Parser, sds011.to_readings),
    "nmea": (nmea.Parser, nmea.to_readings),
}


class SensorReader:
    """Reads one serial sensor forever; ``devices`` and ``statistics()`` as a bus poller's."""

    def __init__(
        self,
        name: str,
        *,
        port: str,
        baud: int,
        timeout_s: float,
        protocol: str,
        device: PolledDevice,
        sink: Sink,
        clock: Clock,
        open_port: Callable[[str, int], FdStream] | None = None,
        max_backoff_s: float = 60.0,
    ) -> None:
        self.name = name
        self.port = port
        self.baud = baud
        self.timeout_s = timeout_s
        self.protocol = protocol
        self.devices = [device]
        self._new_parser, self._to_readings = PARSERS[protocol]
        self._points: dict[int, Point] = dict(device.points)
        self._ids = {p.spec.name: pid for pid, p in device.points}
        self._sink = sink
        self._clock = clock
        self._open = open_port or (lambda port, baud: open_serial(port, baudrate=baud))
        self._max_backoff = max_backoff_s
        self.frames = 0
        self.readings = 0
        self.silences = 0
        self.reopens = 0
        self._sensor: SerialSensor[Any] | None = None

    def statistics(self) -> dict[str, object]:
        d = self.devices[0]
        return {
            "kind": "serial-sensor",
            "protocol": self.protocol,
            "frames": self.frames,
            "readings": self.readings,
            "silences": self.silences,
            "reopens": self.reopens,
            "parser": self._sensor.statistics() if self._sensor else {},
            "devices": {
                d.name: {
                    "state": str(d.state),
                    "polls": d.polls,
                    "polls_failed": d.polls_failed,
                    "transitions": dict(d.transitions),
                    "last_error": d.last_error,
                }
            },
        }

    async def run(self) -> None:
        dev = self.devices[0]
        backoff = 1.0
        parser = self._new_parser()  # kept across reopens: its counters are the bus's
        while True:
            try:
                stream = self._open(self.port, self.baud)
            except LinkError as exc:
                cause = exc.__cause__
                why = (
                    str(exc)
                    if cause is None
                    else f"{self.port}: {port_error(self.port, 'N', cause)}"
                )
                await self._fail(dev, why)
                await self._clock.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)
                self.reopens += 1
                continue
            backoff = 1.0
            self._sensor = SerialSensor(
                reader=stream, parser=parser, frame_timeout=self.timeout_s, name=self.name
            )
            try:
                await self._read(dev, self._sensor)
            except LinkError as exc:
                await self._fail(dev, str(exc))
                self.reopens += 1
                await self._clock.sleep(backoff)
            finally:
                stream.close()

    async def _read(self, dev: PolledDevice, sensor: SerialSensor[Any]) -> None:
        silent = False
        while True:
            try:
                async for frame in sensor.frames():
                    readings = self._to_readings(frame, self._clock.now_ms(), self._ids)
                    self.frames += 1
                    if not readings:
                        continue  # an acknowledgement, or a sentence without our quantities
                    silent = False
                    out = [self._checked(r, dev) for r in readings]
                    dev.polls += 1
                    dev.failures_in_row = 0
                    dev.set_state(DeviceState.ONLINE)
                    self.readings += len(out)
                    await self._sink(out)
            except SensorSilent as exc:
                self.silences += 1
                if not silent:  # once per silence, not once per timeout
                    silent = True
                    await self._fail(dev, str(exc))

    def _checked(self, r: Reading, dev: PolledDevice) -> Reading:
        point = self._points[r.point]
        v = r.value
        if v is not None:
            dev.last_values[point.spec.name] = v
        if r.quality is not Quality.GOOD or v is None or isinstance(v, (bool, str)):
            return r
        if isinstance(v, float) and not math.isfinite(v):
            return Reading(r.point, r.ts, None, Quality.OUT_OF_RANGE)
        if point.range is not None and not point.range[0] <= v <= point.range[1]:
            return Reading(r.point, r.ts, v, Quality.OUT_OF_RANGE)
        return r

    async def _fail(self, dev: PolledDevice, why: str) -> None:
        """The sensor is gone: say so once with comm-error readings of all its points."""
        if dev.state is not DeviceState.OFFLINE:
            log.warning("sensor %s on %s: %s", dev.name, self.port, why)
        dev.last_error = why
        dev.polls_failed += 1
        dev.failures_in_row += 1
        dev.set_state(DeviceState.OFFLINE)
        ts = self._clock.now_ms()
        out = [Reading(pid, ts, None, Quality.COMM_ERROR) for pid in self._points]
        self.readings += len(out)
        await self._sink(out)
