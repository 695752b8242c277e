"""Serial-sensor driver against emulated sensors over real ptys and pipes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from drivers.serial_sensors import (
    FdStream,
    LinkError,
    SensorSilent,
    SerialSensor,
    StreamClosed,
    open_serial,
)
from protocols import nmea, pms5003, sds011
from protocols.errors import LocalError
from simulator.serial_sensors import (
    CITY_LOOP,
    Faults,
    GpsTrack,
    ParticulateModel,
    SensorKind,
    SerialSensorEmulator,
)
from tests.virtual_time import VirtualClock

PARSERS: dict[str, Any] = {"pms5003": pms5003.Parser, "sds011": sds011.Parser, "gps": nmea.Parser}


async def _take(frames: AsyncIterator[Any], n: int) -> list[Any]:
    out = []
    async for frame in frames:
        out.append(frame)
        if len(out) == n:
            break
    return out


NO_FAULTS = Faults()


async def _read_from_emulator(
    kind: SensorKind, n: int, *, faults: Faults = NO_FAULTS, period: float = 0.01
) -> tuple[list[Any], SerialSensorEmulator, SerialSensor[Any]]:
    async with SerialSensorEmulator(kind, period=period, faults=faults, seed=11) as emu:
        port = open_serial(emu.port, baudrate=9600)  # opened before the first frame
        sensor: SerialSensor[Any] = SerialSensor(
            reader=port, parser=PARSERS[kind](), frame_timeout=3.0, name=f"sim-{kind}"
        )
        try:
            async with asyncio.TaskGroup() as tg:
                emit = tg.create_task(emu.run(), name=f"sim[{kind}].emit")
                frames = await _take(sensor.frames(), n)
                emit.cancel()
        finally:
            port.close()
    return frames, emu, sensor


@pytest.mark.parametrize("kind", ["pms5003", "sds011", "gps"])
async def test_clean_frames_over_a_pty(kind: SensorKind) -> None:
    frames, emu, sensor = await _read_from_emulator(kind, 12)
    assert frames == emu.sent[:12]
    stats = sensor.statistics()
    # the read that carried the 12th frame may carry the next too (a loaded machine)
    assert 12 <= stats["frames"] <= len(emu.sent)
    assert stats["bytes_skipped"] == 0
    assert stats["checksum_errors"] == 0


@pytest.mark.parametrize("kind", ["pms5003", "sds011", "gps"])
async def test_resynchronises_through_injected_faults(kind: SensorKind) -> None:
    faults = Faults(garbage=0.3, corrupt=0.2, truncate=0.15)
    frames, emu, sensor = await _read_from_emulator(kind, 40, faults=faults)
    # exactly the frames sent intact, in order: none lost, none invented
    assert frames == emu.sent[:40]
    assert emu.counters["corrupted"] > 0
    assert emu.counters["truncated"] > 0
    assert emu.counters["garbage_bytes"] > 0
    stats = sensor.statistics()
    assert stats["bytes_skipped"] > 0
    rejected = sum(stats.get(k, 0) for k in ("checksum_errors", "framing_errors", "length_errors"))
    rejected += stats.get("missing_checksum", 0)
    assert rejected > 0


async def test_emulated_values_look_real() -> None:
    frames, _, _ = await _read_from_emulator("pms5003", 5)
    for m in frames:
        assert isinstance(m, pms5003.Measurement)
        assert 0 <= m.pm1_0 <= m.pm2_5 <= m.pm10 < 200
        assert m.n0_3 > m.n0_5 > m.n1_0
    gps, _, _ = await _read_from_emulator("gps", 4)
    assert [type(f) for f in gps] == [nmea.GGA, nmea.RMC, nmea.GGA, nmea.RMC]
    lats = [lat for lat, _ in CITY_LOOP]
    lons = [lon for _, lon in CITY_LOOP]
    for fix in gps:
        assert min(lats) - 0.001 < fix.latitude < max(lats) + 0.001
        assert min(lons) - 0.001 < fix.longitude < max(lons) + 0.001
    readings = {r.point: r.value for r in nmea.to_readings(gps[1], 0, {"speed": 1, "lat": 2})}
    assert readings[1] == pytest.approx(9.0, abs=0.1)  # street speed, m/s
    assert readings[2] == gps[1].latitude


def test_signal_models() -> None:
    track = GpsTrack(speed=9.0)
    (lat0, lon0, course), (lat1, lon1, _) = track.at(0.0), track.at(1.0)
    north = (lat1 - lat0) * 111_195
    east = (lon1 - lon0) * 111_195 * math.cos(math.radians(lat0))
    assert math.hypot(north, east) == pytest.approx(9.0, rel=0.01)
    assert course == pytest.approx(math.degrees(math.atan2(east, north)) % 360, abs=0.5)
    assert track.at(track.length / 9.0)[:2] == pytest.approx(track.at(0.0)[:2])
    model = ParticulateModel(seed=3)
    series = [model.pm2_5(t) for t in range(0, 6 * 3600, 60)]
    assert min(series) >= 0
    assert max(series) - min(series) > 10  # the trend moves it
    steps = [abs(b - a) for a, b in itertools.pairwise(series)]
    assert max(steps) < 5  # but never jumps


@pytest.fixture
def pipe() -> Iterator[tuple[FdStream, int]]:
    r, w = os.pipe()
    stream = FdStream(r)
    yield stream, w
    stream.close()
    with contextlib.suppress(OSError):  # some tests close it themselves
        os.close(w)


@pytest.mark.virtual_time
async def test_silent_sensor_raises(
    pipe: tuple[FdStream, int], virtual_clock: VirtualClock
) -> None:
    stream, _ = pipe
    sensor = SerialSensor(reader=stream, parser=sds011.Parser(), name="pm")  # 5 s timeout
    t0 = virtual_clock.monotonic()
    with pytest.raises(SensorSilent) as err:
        await _take(sensor.frames(), 1)
    assert virtual_clock.monotonic() - t0 == 5.0
    assert err.value.bytes_received == 0
    assert sensor.statistics()["timeouts"] == 1


@pytest.mark.virtual_time
async def test_garbage_talking_sensor_is_silent_too(
    pipe: tuple[FdStream, int], virtual_clock: VirtualClock
) -> None:
    stream, w = pipe
    os.write(w, b"\x00\x11garbage at the wrong baud rate" * 4)
    sensor = SerialSensor(reader=stream, parser=sds011.Parser())  # 5 s timeout
    t0 = virtual_clock.monotonic()
    with pytest.raises(SensorSilent) as err:
        await _take(sensor.frames(), 1)
    assert virtual_clock.monotonic() - t0 == 5.0  # bytes without a frame are silence
    assert err.value.bytes_received == 128
    assert "no valid frame" in str(err.value)


async def test_end_of_stream_is_a_link_error(pipe: tuple[FdStream, int]) -> None:
    stream, w = pipe
    frame = sds011.encode_frame(sds011.Measurement(1.5, 2.5, 7))
    os.write(w, frame + frame[:4])
    os.close(w)
    sensor = SerialSensor(reader=stream, parser=sds011.Parser(), frame_timeout=2.0)
    got = []
    with pytest.raises(LinkError):
        async for f in sensor.frames():
            got.append(f)
    assert got == [sds011.Measurement(1.5, 2.5, 7)]
    assert sensor.statistics()["buffered"] == 4


async def test_send_command(pipe: tuple[FdStream, int]) -> None:
    stream, _ = pipe
    r2, w2 = os.pipe()
    writer = FdStream(w2)
    try:
        sensor = SerialSensor(reader=stream, writer=writer, parser=sds011.Parser())
        await sensor.send(sds011.query_command())
        assert os.read(r2, 64) == sds011.query_command()
        with pytest.raises(LocalError):
            await SerialSensor(reader=stream, parser=sds011.Parser()).send(b"x")
    finally:
        writer.close()
        os.close(r2)


def test_open_serial_missing_port() -> None:
    with pytest.raises(LinkError):
        open_serial("/dev/does-not-exist-vitals")


async def test_a_stream_closed_here_is_not_a_broken_link(pipe: tuple[FdStream, int]) -> None:
    stream, _ = pipe
    waiting = asyncio.create_task(stream.read(16))
    await asyncio.sleep(0)  # the read waits for the fd to be readable
    stream.close()
    with pytest.raises(StreamClosed):
        await waiting
    with pytest.raises(StreamClosed) as err:
        await stream.read(16)
    assert isinstance(err.value, LocalError) and not isinstance(err.value, LinkError)
    with pytest.raises(StreamClosed):
        await stream.write(b"x")
