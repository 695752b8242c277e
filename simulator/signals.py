"""Signal models: values that move like the real quantity on an ordinary day.

Every point of a shipped profile has a :class:`Model` in :data:`MODELS`: a
typical value, a daily cycle in the city's local time (UTC+8, the city of
``simulator.serial_sensors.CITY_LOOP``: temperature peaks mid-afternoon,
traffic pollution in the morning rush), a random wander around it, and the
``band`` of values that are plausible there and then, which the value never
leaves (a PM2.5 of 20 µg/m³, not half the sensor's range). Counters count at
a real rate from a plausible start (uptime one second a second). Points that
depend on others are computed from them in :data:`RELATIONS` (an alarm bit
from its value and threshold, a level in mm from the level in m, a water
level from the radar's distance) and totals that accumulate a rate in
:data:`INTEGRALS` (rain from rain intensity, energy from power), so what a
device serves is consistent with itself. Status bits of a healthy device are
off (``device_ok``-like bits on).

A profile that is not shipped (a technician's own) gets a generic model per
point: its kind from taxonomy, unit and type, its band the lower part of the
valid range. Values are quantised to the point's register resolution, so what
the emulator serves is exactly representable.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from drivers.profiles import Point, Profile
from protocols.modbus import DataType, PointSpec, Space, decode, encode, register_count

__all__ = [
    "INTEGRALS",
    "MODELS",
    "RELATIONS",
    "IllegalAddress",
    "Model",
    "ProfileRegisters",
    "Signal",
    "raw_limits",
    "signal_for",
]

_RAW: dict[DataType, tuple[int, int]] = {
    DataType.U16: (0, 2**16 - 1),
    DataType.I16: (-(2**15), 2**15 - 1),
    DataType.U32: (0, 2**32 - 1),
    DataType.I32: (-(2**31), 2**31 - 1),
    DataType.U64: (0, 2**53),
    DataType.I64: (-(2**53), 2**53),
}

_COUNTER_WORDS = ("total", "count", "energy", "tips", "accum", "uptime", "kwh")
UTC_OFFSET_H = 8.0  # the emulated city's local time: daily cycles follow it
_CORRELATION_S = 120.0  # how long the random wander remembers (Ornstein-Uhlenbeck)


def raw_limits(spec: PointSpec) -> tuple[float, float] | None:
    """The engineering-unit range the point's registers can hold, or None (floats)."""
    lim = _RAW.get(spec.type)
    if lim is None:
        return None
    a, b = lim[0] * spec.scale + spec.offset, lim[1] * spec.scale + spec.offset
    return (min(a, b), max(a, b))


def _quantise(spec: PointSpec, value: float) -> float | int:
    if spec.type in (DataType.F32, DataType.F64):
        return value
    raw = round((value - spec.offset) / spec.scale)
    lo, hi = _RAW.get(spec.type, (-(2**31), 2**31 - 1))
    raw = max(lo, min(hi, raw))
    if spec.scale == 1 and spec.offset == 0:
        return int(raw)
    return raw * spec.scale + spec.offset


@dataclass(frozen=True, slots=True)
class Model:
    """How one quantity behaves on an ordinary day.

    ``kind``: ``analogue`` (``base`` + a daily cycle of amplitude ``daily``
    peaking at ``peak_h`` local time, negative for a trough, + a random wander
    of typical size ``noise``, kept inside ``band``), ``counter`` (``base`` at
    the first read, then ``rate`` units a second), ``const`` (``base``, also
    for settings), ``flag`` (``base`` != 0), ``text`` (a serial number).
    """

    base: float = 0.0
    daily: float = 0.0
    noise: float = 0.0
    band: tuple[float, float] | None = None
    peak_h: float = 15.0
    rate: float = 0.0
    kind: str = "analogue"


def _a(
    base: float, daily: float, noise: float, lo: float, hi: float, peak_h: float = 15.0
) -> Model:
    return Model(base, daily, noise, (lo, hi), peak_h)


def _c(value: float) -> Model:
    return Model(value, kind="const", band=(value, value))


def _counter(start: float, rate: float) -> Model:
    return Model(start, rate=rate, kind="counter")


OFF = Model(0, kind="flag")
ON = Model(1, kind="flag")
TEXT = Model(kind="text")
DERIVED = Model(kind="derived")  # computed in RELATIONS / INTEGRALS
_DAY = 86400.0

# Ordinary-day models of every point of every shipped profile.
MODELS: dict[str, dict[str, Model]] = {
    "sound_level_meter": {
        # a street in daytime: LAeq 50-65 dB(A), quieter at night; the statistics around it
        "laeq": _a(56, 6, 1.5, 42, 70),
        "lafmax": _a(65, 6, 2.5, 50, 85),
        "lafmin": _a(49, 5, 1.2, 36, 62),
        "lcpeak": _a(84, 6, 3, 68, 105),
        "la10": _a(59, 6, 1.5, 45, 73),
        "la50": _a(55, 6, 1.2, 41, 68),
        "la90": _a(51, 5, 1.0, 38, 64),
        "overload": DERIVED,
        "under_range": OFF,
        "uptime": _counter(3 * _DAY + 4123, 1.0),
        "averaging_s": _c(1),
        "weighting": _c(0),
        "calibration_offset": _c(0),
        "firmware_version": _c(100),
    },
    "weather_station": {
        "wind_dir_min": _a(105, 0, 8, 60, 150),
        "wind_dir_avg": _a(135, 0, 6, 90, 180),
        "wind_dir_max": _a(165, 0, 8, 120, 210),
        "wind_speed_min": _a(1.4, 0.6, 0.4, 0.0, 4.0),
        "wind_speed_avg": _a(3.2, 1.0, 0.6, 0.3, 7.0),
        "wind_speed_max": _a(5.6, 1.6, 0.9, 0.8, 11.0),
        "air_temperature": _a(24, 4, 0.3, 16, 32),
        "relative_humidity": _a(68, -12, 2, 40, 95),
        "air_pressure": _a(1012, -0.8, 0.3, 1004, 1020, peak_h=16),
        "rain_accumulation": DERIVED,
        "rain_duration": DERIVED,
        "rain_intensity": _a(0.6, 0, 0.4, 0.0, 3.0),
        "hail_accumulation": _c(0),
        "heater_temperature": DERIVED,
        "supply_voltage": _a(12.2, 0, 0.05, 11.8, 12.6),
        "wind_sensor_fault": OFF,
        "ptu_sensor_fault": OFF,
        "rain_sensor_fault": OFF,
        "reset_rain": OFF,
    },
    "rain_gauge": {
        "tip_count": DERIVED,
        "rain_last_minute": DERIVED,
        "rain_intensity": _a(0.6, 0, 0.4, 0.0, 3.0),
        "rain_total": DERIVED,
        "bucket_stuck": OFF,
        "heater_on": OFF,
        "mm_per_tip": _c(0.2),
        "reset_total": OFF,
    },
    "radar_water_level": {
        "device_ok": ON,
        "echo_lost": OFF,
        "maintenance": OFF,
        "level": _a(1.8, 0, 0.01, 1.6, 2.0),
        "level_unit": _c(45),  # HART unit code: m
        "distance": DERIVED,
        "distance_unit": _c(45),
        "electronics_temperature": _a(26, 5, 0.3, 14, 40),
        "level_mm": DERIVED,
        "echo_strength": _a(62, 0, 1.0, 55, 70),
        "datum_offset": _c(6.5),
        "damping_s": _c(5),
    },
    "pm_monitor": {
        # urban background PM2.5 ~ 15-40 µg/m³, worst in the morning rush
        "pm1_0": DERIVED,
        "pm2_5": _a(24, 8, 3, 5, 60, peak_h=8),
        "pm10": DERIVED,
        "count_0_3": DERIVED,
        "count_0_5": DERIVED,
        "count_1_0": DERIVED,
        "count_2_5": DERIVED,
        "count_5_0": DERIVED,
        "count_10": DERIVED,
        "inlet_temperature": _a(26, 4, 0.3, 16, 36),
        "inlet_humidity": _a(64, -10, 2, 35, 90),
        "fan_fault": OFF,
        "laser_fault": OFF,
        "sensor_timeout": OFF,
        "sleep": OFF,
    },
    "gas_detector": {
        # roadside CO ~ 0.3-2 ppm and NO2 ~ 10-60 ppb, worst in the morning rush
        "co": _a(0.7, 0.3, 0.12, 0.1, 2.5, peak_h=8),
        "no2": _a(28, 10, 4, 4, 80, peak_h=8),
        "sensor_temperature": _a(25, 4, 0.3, 15, 35),
        "sensor_humidity": _a(65, -10, 2, 35, 90),
        "co_we_mv": DERIVED,
        "no2_we_mv": DERIVED,
        "co_alarm": DERIVED,
        "no2_alarm": DERIVED,
        "sensor_fault": OFF,
        "relay": DERIVED,
        "co_alarm_ppm": _c(35),  # a common 1-hour CO alarm level
        "no2_alarm_ppb": _c(200),
    },
    "manhole_sensor": {
        "tilt_x": _a(0.15, 0, 0.02, -0.5, 0.8),
        "tilt_y": _a(-0.1, 0, 0.02, -0.7, 0.5),
        "tilt": DERIVED,
        "water_detected": OFF,
        "cover_open": DERIVED,
        "low_battery": DERIVED,
        "battery": _a(3.56, 0.01, 0.004, 3.45, 3.65),
        "temperature": _a(19, 1.5, 0.1, 12, 26, peak_h=18),
        "alarm_count": _c(2),
        "tilt_threshold": _c(15),
        "rezero": OFF,
    },
    "multi_sensor_air_box": {
        "pm1_0": DERIVED,
        "pm2_5": _a(22, 8, 3, 4, 60, peak_h=8),
        "pm4_0": DERIVED,
        "pm10": DERIVED,
        "voc_index": _a(100, 15, 8, 60, 180, peak_h=9),
        "nox_index": _a(6, 4, 2, 1, 40, peak_h=8),
        "temperature": _a(24, 4, 0.3, 16, 32),
        "humidity": _a(66, -12, 2, 38, 95),
        "co2": _a(450, 30, 12, 410, 560, peak_h=8),
        "uptime": _counter(9 * _DAY + 777, 1.0),
        "latitude": _c(31.2304),
        "longitude": _c(121.4737),
        "serial_number": TEXT,
        "operating_hours": _counter(8760, 1 / 3600),
        "fan_cleaning": _c(0),
    },
    "pump_meter": {
        "voltage_l1": _a(231, 2, 0.8, 222, 240, peak_h=4),
        "voltage_l2": _a(230, 2, 0.8, 222, 240, peak_h=4),
        "voltage_l3": _a(232, 2, 0.8, 222, 240, peak_h=4),
        "current_l1": _a(18.5, 0, 0.4, 16, 21),
        "current_l2": _a(18.2, 0, 0.4, 16, 21),
        "current_l3": _a(18.8, 0, 0.4, 16, 21),
        "power_l1": DERIVED,
        "power_l2": DERIVED,
        "power_l3": DERIVED,
        "power_factor_l1": _a(0.86, 0, 0.005, 0.82, 0.9),
        "power_factor_l2": _a(0.86, 0, 0.005, 0.82, 0.9),
        "power_factor_l3": _a(0.86, 0, 0.005, 0.82, 0.9),
        "power_total": DERIVED,
        "frequency": _a(50.0, 0, 0.02, 49.92, 50.08),
        "energy_import": DERIVED,
        "energy_export": _c(0),
        "voltage_l1_l2": DERIVED,
        "voltage_l2_l3": DERIVED,
        "voltage_l3_l1": DERIVED,
        "current_neutral": _a(0.6, 0, 0.2, 0.1, 1.5),
        "energy_total": DERIVED,
        "energy_total_wh": DERIVED,
    },
    # streaming serial sensors: their values come from simulator.serial_sensors; the
    # bands here say what is plausible for them (checked by tests/test_sim_realism.py)
    "pms5003": {
        "pm1": _a(12, 0, 0, 0, 45),
        "pm2_5": _a(18, 0, 0, 0, 60),
        "pm10": _a(25, 0, 0, 0, 85),
        "n0_3": _a(2200, 0, 0, 250, 7000),
    },
    "sds011": {"pm2_5": _a(18, 0, 0, 0, 60), "pm10": _a(25, 0, 0, 0, 90)},
    "gps_nmea": {
        "lat": _a(31.23, 0, 0, 31.2, 31.26),
        "lon": _a(121.48, 0, 0, 121.46, 121.5),
        "alt": _a(12, 0, 0, 0, 60),
        "speed": _a(9, 0, 0, 0, 20),  # a street sweeper or a bus in town
        "satellites": _a(9, 0, 0, 4, 16),
    },
}

_Fn = Callable[..., float]
_SQRT3 = math.sqrt(3)


def _tilt(x: float, y: float) -> float:
    c = math.cos(math.radians(x)) * math.cos(math.radians(y))
    return math.degrees(math.acos(min(1.0, c)))


# Points computed from others of the same device: (the points it needs, how).
RELATIONS: dict[str, dict[str, tuple[tuple[str, ...], _Fn]]] = {
    "sound_level_meter": {
        "overload": (("lcpeak",), lambda peak: peak >= 140.0),
    },
    "weather_station": {
        # the heated ultrasonic head runs a few degrees above the air
        "heater_temperature": (("air_temperature",), lambda t: t + 3.0),
    },
    "rain_gauge": {
        "rain_last_minute": (("rain_intensity",), lambda mm_h: mm_h / 60),
        # 0.2 mm a tip; 1,234 tips had fallen when the total was last reset
        "rain_total": (("tip_count",), lambda tips: max(0, tips - _TIPS_AT_RESET) * 0.2),
    },
    "radar_water_level": {
        "distance": (("datum_offset", "level"), lambda datum, level: datum - level),
        "level_mm": (("level",), lambda level: level * 1000),
    },
    "pm_monitor": {
        "pm1_0": (("pm2_5",), lambda pm: pm * 0.68),
        "pm10": (("pm2_5",), lambda pm: pm * 1.45),
        # PMS5003 counts per 0.1 L, as simulator.serial_sensors makes them
        "count_0_3": (("pm2_5",), lambda pm: pm * 110 + 250),
        "count_0_5": (("pm2_5",), lambda pm: (pm * 110 + 250) * 0.3),
        "count_1_0": (("pm2_5",), lambda pm: (pm * 110 + 250) * 0.06),
        "count_2_5": (("pm2_5",), lambda pm: (pm * 110 + 250) * 0.008),
        "count_5_0": (("pm2_5",), lambda pm: (pm * 110 + 250) * 0.002),
        "count_10": (("pm2_5",), lambda pm: (pm * 110 + 250) * 0.0006),
    },
    "gas_detector": {
        # Alphasense ISB: working electrode = zero offset + sensitivity x concentration
        "co_we_mv": (("co",), lambda ppm: 310 + 420 * ppm),
        "no2_we_mv": (("no2",), lambda ppb: 230 - 0.35 * ppb),
        "co_alarm": (("co", "co_alarm_ppm"), lambda v, limit: v > limit),
        "no2_alarm": (("no2", "no2_alarm_ppb"), lambda v, limit: v > limit),
        "relay": (("co_alarm", "no2_alarm"), lambda a, b: bool(a or b)),
    },
    "manhole_sensor": {
        "tilt": (("tilt_x", "tilt_y"), _tilt),
        "cover_open": (("tilt", "tilt_threshold"), lambda tilt, limit: tilt > limit),
        "low_battery": (("battery",), lambda v: v < 3.1),
    },
    "multi_sensor_air_box": {
        "pm1_0": (("pm2_5",), lambda pm: pm * 0.7),
        "pm4_0": (("pm2_5",), lambda pm: pm * 1.2),
        "pm10": (("pm2_5",), lambda pm: pm * 1.4),
    },
    "pump_meter": {
        "power_l1": (("voltage_l1", "current_l1", "power_factor_l1"), lambda v, i, pf: v * i * pf),
        "power_l2": (("voltage_l2", "current_l2", "power_factor_l2"), lambda v, i, pf: v * i * pf),
        "power_l3": (("voltage_l3", "current_l3", "power_factor_l3"), lambda v, i, pf: v * i * pf),
        "power_total": (("power_l1", "power_l2", "power_l3"), lambda a, b, c: a + b + c),
        "voltage_l1_l2": (("voltage_l1", "voltage_l2"), lambda a, b: (a + b) / 2 * _SQRT3),
        "voltage_l2_l3": (("voltage_l2", "voltage_l3"), lambda a, b: (a + b) / 2 * _SQRT3),
        "voltage_l3_l1": (("voltage_l3", "voltage_l1"), lambda a, b: (a + b) / 2 * _SQRT3),
        "energy_total": (("energy_import", "energy_export"), lambda i, e: i + e),
        "energy_total_wh": (("energy_total",), lambda kwh: kwh * 1000),
    },
}
_TIPS_AT_RESET = 20_000 - 1_234

# Totals that accumulate another point: (the rate point, what one unit of it adds
# a second, the value at the first read). Never down: a negative rate adds nothing.
INTEGRALS: dict[str, dict[str, tuple[str, _Fn, float]]] = {
    "weather_station": {
        "rain_accumulation": ("rain_intensity", lambda mm_h: mm_h / 3600, 246.8),  # mm
        "rain_duration": ("rain_intensity", lambda mm_h: float(mm_h > 0), 51_840.0),  # s
    },
    "rain_gauge": {
        "tip_count": ("rain_intensity", lambda mm_h: mm_h / 3600 / 0.2, 20_000.0),  # tips
    },
    "pump_meter": {
        "energy_import": ("power_total", lambda w: w / 3_600_000, 152_340.5),  # kWh
    },
}


@dataclass
class Signal:
    """One point's value over time. ``value(t)`` with t in seconds since the epoch.

    ``lo``/``hi`` are the valid range (what the registers can hold and the
    profile allows: scenarios may push a value anywhere inside it); ``model``
    keeps an ordinary day inside its ``band``.
    """

    point: Point
    kind: str
    lo: float
    hi: float
    rng: random.Random
    model: Model
    state: float = 0.0
    last_t: float = 0.0
    first_t: float = 0.0
    text: str = ""

    def value(self, t: float | None = None) -> float | int | bool | str:
        t = time.time() if t is None else t
        spec, m = self.point.spec, self.model
        if self.kind == "text":
            if not self.text:
                self.text = f"VT{self.rng.randrange(10**6):06d}"[: 2 * spec.length or None]
            return self.text
        if self.kind == "flag":
            return bool(m.base)
        if self.kind in ("const", "derived"):  # a derived point alone: its typical value
            return _quantise(spec, m.base) if spec.type not in _BOOLS else bool(m.base)
        if self.kind == "counter":
            if not self.first_t:  # terminals of one model were not all started together
                self.first_t, self.state = t, m.base * (1 + 0.5 * self.rng.random())
            return _quantise(spec, min(self.hi, self.state + m.rate * max(0.0, t - self.first_t)))
        # Ornstein-Uhlenbeck wander (exact steps: any dt) around the daily cycle
        if not self.last_t:
            self.state = self.rng.gauss(0, m.noise)  # start anywhere the wander goes
        else:
            keep = math.exp(-max(0.0, t - self.last_t) / _CORRELATION_S)
            self.state = self.state * keep + m.noise * math.sqrt(1 - keep * keep) * self.rng.gauss(
                0, 1
            )
        self.last_t = t
        hour = ((t / 3600 + UTC_OFFSET_H) % 24) - m.peak_h
        v = m.base + m.daily * math.cos(2 * math.pi * hour / 24) + self.state
        lo, hi = m.band if m.band is not None else (self.lo, self.hi)
        return _quantise(spec, min(hi, max(lo, v)))


_BOOLS = (DataType.BOOL, DataType.BIT)


def _generic(point: Point, lo: float, hi: float) -> Model:
    """A model for a point of a profile that is not shipped."""
    spec = point.spec
    name = (spec.name + " " + point.indicator).lower()
    if spec.type is DataType.STRING:
        return TEXT
    if spec.type in _BOOLS:
        return OFF
    span = hi - lo
    if spec.space in (Space.HOLDING, Space.COIL):
        return _c(lo + span * 0.25)  # configuration registers hold still
    if any(w in name for w in _COUNTER_WORDS):
        return _counter(lo, span / _DAY / 50 or 0.01)
    return _a(lo + span * 0.3, span * 0.03, span * 0.01, lo + span * 0.2, lo + span * 0.4)


def signal_for(point: Point, seed: int = 0, profile: str = "") -> Signal:
    """The signal of ``point`` of the profile named ``profile`` (its model if
    shipped, else a generic one)."""
    spec = point.spec
    rng = random.Random(f"{seed}:{spec.name}")
    lo, hi = point.range if point.range else (-math.inf, math.inf)
    lim = raw_limits(spec)
    if lim is not None:
        lo, hi = max(lo, lim[0]), min(hi, lim[1])
    if hi <= lo:
        hi = lo + 1.0
    model = MODELS.get(profile, {}).get(spec.name)
    if model is None:  # a profile of one's own: something inside its range
        g_lo = lo if math.isfinite(lo) else 0.0
        g_hi = hi if math.isfinite(hi) and point.range else g_lo + 100.0
        model = _generic(point, g_lo, max(g_hi, g_lo + 1.0))
    return Signal(point, model.kind, float(lo), float(hi), rng, model)


# Points of one device whose values must keep this order (lowest first): a sound
# level meter's LAFmin never above its LAeq, and so on. ``X_min``, ``X_avg`` and
# ``X_max`` of any profile are chained too.
ORDERED: tuple[tuple[str, ...], ...] = (
    ("lafmin", "la90", "la50", "laeq", "la10", "lafmax", "lcpeak"),
    ("pm1_0", "pm2_5", "pm4_0", "pm10"),
    ("count_10", "count_5_0", "count_2_5", "count_1_0", "count_0_5", "count_0_3"),
)


def _chains(names: Sequence[str], computed: set[str]) -> list[list[str]]:
    have = set(names) - computed
    chains = [[n for n in chain if n in have] for chain in ORDERED]
    for n in names:
        if n.endswith("_avg"):
            stem = n[: -len("_avg")]
            chains.append([m for m in (f"{stem}_min", n, f"{stem}_max") if m in have])
    return [c for c in chains if len(c) > 1]


class ProfileRegisters:
    """The four register spaces of one emulated terminal, served live.

    ``read(space, address, count)`` returns the words (or bits) a device of
    ``profile`` would answer, each point's registers encoded from its signal
    at that instant; registers inside the device's map that no point uses
    read 0 (a planner may read through such holes). A read that leaves the
    map raises :class:`IllegalAddress` (exception 02), as real devices do.
    Writes land in the registers and hold until overwritten; a written
    setting is what the points computed from it use (an alarm threshold).
    """

    def __init__(self, profile: Profile, *, seed: int = 0) -> None:
        self.profile = profile
        self.signals: dict[str, Signal] = {
            p.spec.name: signal_for(p, seed, profile.name) for p in profile.points
        }
        self._points: dict[Space, list[tuple[int, int, Point, Signal]]] = {s: [] for s in Space}
        self._span: dict[Space, tuple[int, int]] = {}
        for p in profile.points:
            n = register_count(p.spec)
            self._points[p.spec.space].append((p.spec.address, n, p, self.signals[p.spec.name]))
        for space, pts in self._points.items():
            pts.sort(key=lambda x: x[0])
            if pts:
                self._span[space] = (pts[0][0], max(a + n for a, n, _, _ in pts))
        self.written: dict[tuple[Space, int], int] = {}
        self.reads = 0
        have = set(self.signals)
        self._relations = {
            k: v
            for k, v in RELATIONS.get(profile.name, {}).items()
            if k in have and have >= set(v[0])
        }
        self._integrals = {
            k: v for k, v in INTEGRALS.get(profile.name, {}).items() if k in have and v[0] in have
        }
        self._totals: dict[str, tuple[float, float]] = {}  # integral: (last t, accumulated)
        self._chain_of: dict[str, list[str]] = {}
        computed = set(self._relations) | set(self._integrals)
        for chain in _chains([p.spec.name for p in profile.points], computed):
            for name in chain:
                self._chain_of[name] = chain

    def value(self, name: str, t: float, cache: dict[str, object]) -> object:
        """Point ``name``'s value at ``t``: its signal's, computed from the
        points it depends on, or drawn with the points it is ordered with."""
        if name in cache:
            return cache[name]
        sig = self.signals[name]
        spec = sig.point.spec
        held = self._held(spec)
        if held is not None:
            cache[name] = held
            return held
        relation = self._relations.get(name)
        if relation is not None:
            deps, fn = relation
            args = [self.value(d, t, cache) for d in deps]
            v = fn(*args)
            cache[name] = bool(v) if spec.type in _BOOLS else _quantise(spec, float(v))
            return cache[name]
        integral = self._integrals.get(name)
        if integral is not None:
            of, per_s, start = integral
            rate = max(0.0, float(per_s(float(self.value(of, t, cache)))))  # type: ignore[arg-type]
            last, total = self._totals.get(name, (t, 0.0))
            total += rate * max(0.0, t - last)
            self._totals[name] = (max(t, last), total)
            cache[name] = _quantise(spec, min(sig.hi, start + total))
            return cache[name]
        chain = self._chain_of.get(name)
        if chain is None:
            cache[name] = sig.value(t)
            return cache[name]
        drawn = sorted(float(self.signals[n].value(t)) for n in chain)
        for n, v in zip(chain, drawn, strict=True):
            cache[n] = _quantise(self.signals[n].point.spec, v)
        return cache[name]

    def _held(self, spec: PointSpec) -> object | None:
        """The value written into a setting's registers, or None if never written."""
        if not self.written or spec.space not in (Space.HOLDING, Space.COIL):
            return None
        n = register_count(spec)
        words = [self.written.get((spec.space, spec.address + i)) for i in range(n)]
        if any(w is None for w in words):
            return None
        return decode(spec, words)  # type: ignore[arg-type]

    def span(self, space: Space) -> tuple[int, int] | None:
        """``(first, end)`` addresses of ``space`` in the map, or None if unused."""
        return self._span.get(space)

    def read(self, space: Space, address: int, count: int, t: float | None = None) -> list[int]:
        span = self._span.get(space)
        if span is None or address < span[0] or address + count > span[1]:
            raise IllegalAddress(space, address, count)
        self.reads += 1
        t = time.time() if t is None else t
        out = [0] * count
        end = address + count
        cache: dict[str, object] = {}
        for a, n, p, _sig in self._points[space]:
            if a >= end:
                break
            if a + n <= address:
                continue
            words = encode(p.spec, self.value(p.spec.name, t, cache))  # type: ignore[arg-type]
            if space.is_bits:
                words = [int(bool(words[0]))]
            for i, w in enumerate(words):
                j = a + i - address
                if 0 <= j < count:
                    out[j] = w | out[j] if p.spec.type is DataType.BIT else w
        if self.written:
            for i in range(count):
                held = self.written.get((space, address + i))
                if held is not None:
                    out[i] = held
        return out

    def write(self, space: Space, address: int, words: Sequence[int]) -> None:
        span = self._span.get(space)
        if (
            space not in (Space.HOLDING, Space.COIL)
            or span is None
            or address < span[0]
            or address + len(words) > span[1]
        ):
            raise IllegalAddress(space, address, len(words))
        for i, w in enumerate(words):
            self.written[(space, address + i)] = w


class IllegalAddress(Exception):
    """A request outside the emulated device's map: answer exception 02."""

    def __init__(self, space: Space, address: int, count: int) -> None:
        super().__init__(f"{space} {address}+{count} is outside the map")
