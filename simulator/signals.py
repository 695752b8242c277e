"""Signal models: values that move like the real quantity.

Each point of a profile gets a model chosen from its taxonomy, unit and type:
a daily cycle plus mean-reverting noise inside the point's valid range for
analogue quantities (noise level, temperature, PM2.5, water level...), a
monotonic counter for totals (rain tips, energy), rare short events for alarm
bits, a constant for strings. Values are quantised to the point's register
resolution, so what the emulator serves is exactly representable.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from drivers.profiles import Point, Profile
from protocols.modbus import DataType, PointSpec, Space, encode, register_count

__all__ = ["IllegalAddress", "ProfileRegisters", "Signal", "raw_limits", "signal_for"]

_RAW: dict[DataType, tuple[int, int]] = {
    DataType.U16: (0, 2**16 - 1),
    DataType.I16: (-(2**15), 2**15 - 1),
    DataType.U32: (0, 2**32 - 1),
    DataType.I32: (-(2**31), 2**31 - 1),
    DataType.U64: (0, 2**53),
    DataType.I64: (-(2**53), 2**53),
}

_COUNTER_WORDS = ("total", "count", "energy", "tips", "accum", "uptime", "kwh")


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


@dataclass
class Signal:
    """One point's value over time. ``value(t)`` with t in seconds since the epoch."""

    point: Point
    kind: str
    lo: float
    hi: float
    rng: random.Random
    phase: float
    state: float = 0.0
    last_t: float = 0.0
    stuck: bool = False
    offset: float = 0.0  # scenario drift, in engineering units
    extra: dict[str, float] = field(default_factory=dict)

    def value(self, t: float | None = None) -> float | int | bool | str:
        t = time.time() if t is None else t
        spec = self.point.spec
        if spec.type is DataType.STRING:
            return "VT" + format(abs(hash(self.point.spec.name)) % 10**6, "06d")
        if spec.type in (DataType.BOOL, DataType.BIT):
            if self.stuck:
                return bool(self.state)
            # rare events: about one second in an hour is "on"
            self.state = 1.0 if self.rng.random() < 1 / 3600 else 0.0
            return bool(self.state)
        dt = max(0.0, t - self.last_t) if self.last_t else 1.0
        self.last_t = t
        if self.stuck:
            return _quantise(spec, self.state)
        if self.kind == "setting":
            return _quantise(spec, self.lo + (self.hi - self.lo) * 0.25)
        span = self.hi - self.lo
        if self.kind == "counter":
            rate = self.extra.get("rate", span / 86400 / 50 or 0.01)
            self.state += rate * dt * (0.5 + self.rng.random())
            return _quantise(spec, min(self.hi, self.lo + self.state))
        # Ornstein-Uhlenbeck noise around a daily cycle; a tilt rests near 0 and
        # barely moves (a manhole cover lies flat until something lifts it)
        level, swing, scale = 0.4, 0.15, 0.03
        if self.lo == -self.hi and "tilt" in spec.name:
            level, swing, scale = 0.5, 0.005, 0.002
        theta, sigma = 0.05, scale * span
        self.state += -theta * self.state * dt + sigma * math.sqrt(dt) * self.rng.gauss(0, 1) * 0.3
        day = math.sin(2 * math.pi * ((t % 86400) / 86400) + self.phase)
        v = self.lo + span * (level + swing * day) + self.state + self.offset
        return _quantise(spec, min(self.hi, max(self.lo, v)))


def signal_for(point: Point, seed: int = 0) -> Signal:
    """A plausible signal model for ``point``."""
    spec = point.spec
    rng = random.Random(f"{seed}:{spec.name}")
    lo, hi = point.range if point.range else (0.0, 100.0)
    lim = raw_limits(spec)
    if lim is not None:
        lo, hi = max(lo, lim[0]), min(hi, lim[1])
    if hi <= lo:
        hi = lo + 1.0
    name = (spec.name + " " + point.indicator).lower()
    if spec.space in (Space.HOLDING, Space.COIL) and spec.type is not DataType.STRING:
        kind = "setting"  # configuration registers hold still
    elif any(w in name for w in _COUNTER_WORDS):
        kind = "counter"
    else:
        kind = "analogue"
    return Signal(point, kind, float(lo), float(hi), rng, rng.uniform(0, 2 * math.pi))


# Points of one device whose values must keep this order (lowest first): a sound
# level meter's LAFmin never above its LAeq, PM2.5 never above PM10, and so on.
# ``X_min``, ``X_avg`` and ``X_max`` of any profile are chained too.
ORDERED: tuple[tuple[str, ...], ...] = (
    ("lafmin", "la90", "la50", "laeq", "la10", "lafmax", "lcpeak"),
    ("pm1_0", "pm2_5", "pm10"),
    ("count_10", "count_5_0", "count_2_5", "count_1_0", "count_0_5", "count_0_3"),
)


# Points computed from others of the same device: a manhole sensor's tilt is the
# angle of its two axes together.
DERIVED: dict[str, tuple[tuple[str, ...], Callable[..., float]]] = {
    "tilt": (
        ("tilt_x", "tilt_y"),
        lambda x, y: math.degrees(
            math.acos(min(1.0, math.cos(math.radians(x)) * math.cos(math.radians(y))))
        ),
    ),
}


def _chains(names: Sequence[str]) -> list[list[str]]:
    have = set(names)
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
    Writes land in the registers and hold until overwritten.
    """

    def __init__(self, profile: Profile, *, seed: int = 0) -> None:
        self.profile = profile
        self.signals: dict[str, Signal] = {p.spec.name: signal_for(p, seed) for p in profile.points}
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
        self._chain_of: dict[str, list[str]] = {}
        for chain in _chains([p.spec.name for p in profile.points]):
            for name in chain:
                self._chain_of[name] = chain

    def value(self, name: str, t: float, cache: dict[str, object]) -> object:
        """Point ``name``'s value at ``t``; ordered points are drawn together and sorted."""
        if name in cache:
            return cache[name]
        derived = DERIVED.get(name)
        if derived is not None and all(d in self.signals for d in derived[0]):
            deps, fn = derived
            args = [float(self.value(d, t, cache)) for d in deps]  # type: ignore[arg-type]
            cache[name] = _quantise(self.signals[name].point.spec, fn(*args))
            return cache[name]
        chain = self._chain_of.get(name)
        if chain is None:
            return self.signals[name].value(t)
        drawn = sorted(float(self.signals[n].value(t)) for n in chain)
        for n, v in zip(chain, drawn, strict=True):
            cache[n] = _quantise(self.signals[n].point.spec, v)
        return cache[name]

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
