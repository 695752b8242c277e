"""Device profiles: the register map of one device model, from a TOML file.

A profile lives in ``<name>.toml`` (shipped ones in ``drivers/profiles/``); its
format is documented in ``docs/profiles.md``. :func:`load_profile` validates
the whole file and raises :class:`~protocols.errors.ConfigError` listing every
problem, each naming the file and key (``weather_station.toml:
points[4].type``). Loaded profiles are cached by resolved path and mtime.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeAlias, get_args

from drivers._schema import Problems, Table, did_you_mean, read_toml
from protocols import nmea, pms5003, sds011
from protocols.errors import ConfigError, LocalError
from protocols.modbus import DataType, Order, PointSpec, Space

__all__ = [
    "SHIPPED_DIR",
    "DeviceProtocol",
    "Point",
    "Profile",
    "available_profiles",
    "load_profile",
    "parse_profile",
    "resolve_profile",
]

SHIPPED_DIR = Path(__file__).resolve().parent / "profiles"

_NAME = re.compile(r"[a-z0-9_]+")
_PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")

# A profile speaks Modbus, or is a serial sensor that streams frames of its own
# protocol: its points then name the quantities the parser yields, nothing more.
DeviceProtocol: TypeAlias = Literal["modbus", "pms5003", "sds011", "nmea"]
PROTOCOLS: Final[tuple[DeviceProtocol, ...]] = get_args(DeviceProtocol)
SENSOR_QUANTITIES: dict[DeviceProtocol, frozenset[str]] = {
    "pms5003": pms5003.QUANTITIES,
    "sds011": sds011.QUANTITIES,
    "nmea": nmea.QUANTITIES,
}
MAX_REGISTERS = 125  # read holding/input registers: at most 125 per request
MAX_BITS = 2000  # read coils/discrete inputs: at most 2000 per request
MAX_STRING = 123  # registers of a string point (what one write request carries)
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 86400.0

_WIDTH = {
    DataType.BOOL: 1,
    DataType.U16: 1,
    DataType.I16: 1,
    DataType.BIT: 1,
    DataType.U32: 2,
    DataType.I32: 2,
    DataType.F32: 2,
    DataType.U64: 4,
    DataType.I64: 4,
    DataType.F64: 4,
}
_NUMERIC = {
    DataType.U16,
    DataType.I16,
    DataType.U32,
    DataType.I32,
    DataType.U64,
    DataType.I64,
    DataType.F32,
    DataType.F64,
}


@dataclass(frozen=True, slots=True)
class Point:
    """One point of a device model: its :class:`PointSpec` plus its meaning.

    ``interval_s`` is ``None`` when the point follows its device's interval
    (the profile's ``interval_s``, or the device's override in the gateway
    config); a number when the profile fixes it for this point.
    """

    spec: PointSpec
    unit: str = ""
    range: tuple[float, float] | None = None  # valid range (engineering units)
    interval_s: float | None = None
    writable: bool = False
    domain: str = ""  # city taxonomy: domain / class / indicator
    cls: str = ""
    indicator: str = ""
    description: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def in_range(self, value: float) -> bool:
        """Whether ``value`` lies in the valid range (always, without one)."""
        return self.range is None or self.range[0] <= value <= self.range[1]


@dataclass(frozen=True, slots=True)
class Profile:
    """The register map of one device model."""

    name: str  # the file stem
    model: str
    vendor: str
    description: str
    datasheet: str
    max_registers: int  # registers per read request
    max_gap: int  # unused registers worth reading through to merge requests
    interval_s: float  # default poll interval of the points
    points: tuple[Point, ...]
    order: Order = Order.ABCD
    max_bits: int = MAX_BITS  # coils / discrete inputs per read request
    path: Path | None = None
    # "modbus", or a streaming serial sensor ("pms5003", "sds011", "nmea"), whose
    # points are the parser's quantities: their ``spec`` is a placeholder that no
    # Modbus request is ever planned from
    protocol: DeviceProtocol = "modbus"

    @property
    def is_sensor(self) -> bool:
        return self.protocol != "modbus"

    def point(self, name: str) -> Point:
        """The point called ``name``; :class:`LocalError` if there is none."""
        for p in self.points:
            if p.name == name:
                return p
        raise LocalError(f"profile {self.name}: no point named {name!r}")

    @property
    def specs(self) -> tuple[PointSpec, ...]:
        return tuple(p.spec for p in self.points)


# -- lookup --------------------------------------------------------------------


def _dirs(search: Sequence[Path]) -> list[Path]:
    return [Path(d) for d in search] + [SHIPPED_DIR]


def available_profiles(search: Sequence[Path] = ()) -> list[str]:
    """Names of every profile found in ``search`` and the shipped directory."""
    names: set[str] = set()
    for d in _dirs(search):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml") if p.is_file())
    return sorted(names)


def _is_path(name_or_path: str | Path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    return "/" in name_or_path or "\\" in name_or_path or name_or_path.endswith(".toml")


def resolve_profile(name_or_path: str | Path, *, search: Sequence[Path] = ()) -> Path:
    """The file a profile name or path refers to; :class:`ConfigError` if none."""
    if _is_path(name_or_path):
        return Path(name_or_path)
    name = str(name_or_path)
    if not _PROFILE_NAME.fullmatch(name):
        raise ConfigError([(name, "invalid profile name: use a-z, 0-9, '_' and '-'")])
    for d in _dirs(search):
        candidate = d / f"{name}.toml"
        if candidate.is_file():
            return candidate
    available = available_profiles(search)
    raise ConfigError(
        [
            (
                name,
                f"no such profile{did_you_mean(name, available)}; "
                f"available: {', '.join(available) or '(none)'}",
            )
        ]
    )


def load_profile(name_or_path: str | Path, *, search: Sequence[Path] = ()) -> Profile:
    """Load and validate a profile by bare name or by path.

    A bare name (``"weather_station"``) is looked up as ``<name>.toml`` in the
    ``search`` directories, in order, then in the shipped ``drivers/profiles/``.
    Raises :class:`ConfigError` with every problem of the file.
    """
    path = resolve_profile(name_or_path, search=search).resolve()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = -1  # read_toml reports why
    shown = path.name if path.parent == SHIPPED_DIR else str(path)
    return _load_cached(path, mtime, shown)


@functools.lru_cache(maxsize=256)
def _load_cached(path: Path, mtime_ns: int, shown: str) -> Profile:
    del mtime_ns  # only part of the cache key: an edited file is reloaded
    return parse_profile(read_toml(path, shown), name=path.stem, source=shown, path=path)


# -- validation ----------------------------------------------------------------


def parse_profile(
    data: dict[str, object], *, name: str, source: str, path: Path | None = None
) -> Profile:
    """Validate parsed TOML as a profile; ``source`` names it in problems."""
    problems = Problems(source)
    root = Table(problems, "", data)

    head = root.get_table("profile", required=True)
    model = head.get_str("model", required=True, nonempty=True)
    vendor = head.get_str("vendor", required=True, nonempty=True)
    description = head.get_str("description")
    datasheet = head.get_str("datasheet")
    max_registers = head.get_int("max_registers", MAX_REGISTERS, lo=1, hi=MAX_REGISTERS)
    max_bits = head.get_int("max_bits", MAX_BITS, lo=1, hi=MAX_BITS)
    max_gap = head.get_int("max_gap", 0, lo=0, hi=MAX_REGISTERS)
    interval_s = head.get_float("interval_s", 1.0, lo=MIN_INTERVAL_S, hi=MAX_INTERVAL_S)
    order = Order(head.get_str("order", "ABCD", choices=[o.value for o in Order], what="order"))
    protocol = head.get_choice("protocol", PROTOCOLS, "modbus", what="protocol")
    head.finish()

    points: list[Point] = []
    seen: dict[str, int] = {}
    tables = root.get_tables("points", required=True)
    if "points" in data and not tables and isinstance(data["points"], list):
        root.add("points", "a profile needs at least one point")
    for i, t in enumerate(tables):
        point = (
            _parse_sensor_point(t, i, protocol)
            if protocol in SENSOR_QUANTITIES
            else _parse_point(t, order)
        )
        if point is None:
            continue
        if point.name in seen:
            t.add("name", f"duplicate point name '{point.name}' (also points[{seen[point.name]}])")
            continue
        seen[point.name] = i
        points.append(point)
    root.finish()
    problems.raise_if_any()
    return Profile(
        name=name,
        model=model,
        vendor=vendor,
        description=description,
        datasheet=datasheet,
        max_registers=max_registers,
        max_gap=max_gap,
        interval_s=interval_s,
        points=tuple(points),
        order=order,
        max_bits=max_bits,
        path=path,
        protocol=protocol,
    )


def _range(t: Table, *, refuse_for: str | None = None) -> tuple[float, float] | None:
    """``range = [low, high]``: the valid range of a point, or None.

    ``refuse_for`` names a non-numeric type, for which a range is an error.
    """
    raw = t.get_list("range")
    if not (t.present("range") and isinstance(t.data["range"], list)):
        return None
    if refuse_for is not None:
        t.add("range", f"'range' applies only to numeric types, not '{refuse_for}'")
        return None
    if len(raw) != 2 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in raw
    ):
        t.add("range", "expected [low, high], two numbers")
        return None
    low, high = float(raw[0]), float(raw[1])  # type: ignore[arg-type]
    if not low < high:
        t.add("range", f"low {raw[0]} must be below high {raw[1]}")
        return None
    return low, high


def _parse_sensor_point(t: Table, index: int, protocol: DeviceProtocol) -> Point | None:
    """One ``[[points]]`` table of a serial-sensor profile: a quantity of its parser."""
    before = len(t.problems.items)
    known = SENSOR_QUANTITIES[protocol]
    name = t.get_str("name", required=True, pattern=_NAME, pattern_help="a quantity name")
    if name and name not in known:
        t.add(
            "name",
            f"'{name}' is not a quantity of a {protocol} sensor"
            f"{did_you_mean(name, sorted(known))}; known: {', '.join(sorted(known))}",
        )
    unit = t.get_str("unit", max_len=32)
    rng = _range(t)
    domain = t.get_str("domain", max_len=64)
    cls = t.get_str("class", max_len=64)
    indicator = t.get_str("indicator", max_len=64)
    description = t.get_str("description")
    t.finish()  # space, address, type... are unknown keys here: the sensor has no registers
    if len(t.problems.items) != before or not name:
        return None
    # a placeholder: sensor points are never read through Modbus
    spec = PointSpec(name=name, space=Space.INPUT, address=index, type=DataType.F64)
    return Point(
        spec=spec,
        unit=unit,
        range=rng,
        domain=domain,
        cls=cls,
        indicator=indicator,
        description=description,
    )


def _parse_point(t: Table, default_order: Order) -> Point | None:
    """One ``[[points]]`` table; ``None`` if it is too broken to build."""
    before = len(t.problems.items)
    name = t.get_str(
        "name",
        required=True,
        pattern=_NAME,
        pattern_help="use lower-case letters, digits and '_'",
        max_len=64,
    )
    space_s = t.get_str("space", required=True, choices=[s.value for s in Space], what="space")
    address = t.get_int("address", required=True, lo=0, hi=65535)
    type_s = t.get_str("type", required=True, choices=[d.value for d in DataType], what="type")
    order_s = t.get_str(
        "order", default_order.value, choices=[o.value for o in Order], what="order"
    )
    space = Space(space_s) if space_s else None
    dtype = DataType(type_s) if type_s else None

    length = 1
    if t.present("length"):
        length = t.get_int("length", 1, lo=1, hi=MAX_STRING)
        if dtype is not None and dtype is not DataType.STRING:
            t.add("length", f"'length' applies only to type 'string', not '{dtype.value}'")
    elif dtype is DataType.STRING:
        t.add("length", "missing required key (registers of a 'string' point, 1..123)")
    bit = 0
    if t.present("bit"):
        bit = t.get_int("bit", 0, lo=0, hi=15)
        if dtype is not None and dtype is not DataType.BIT:
            t.add("bit", f"'bit' applies only to type 'bit', not '{dtype.value}'")
    elif dtype is DataType.BIT:
        t.add("bit", "missing required key (bit number 0..15, 0 = least significant)")

    scale = t.get_float("scale", 1.0)
    offset = t.get_float("offset", 0.0)
    if t.present("scale") and scale == 0.0 and isinstance(t.data["scale"], int | float):
        t.add("scale", "scale must not be 0")
    numeric = dtype in _NUMERIC
    for key in ("scale", "offset"):
        if t.present(key) and dtype is not None and not numeric:
            t.add(key, f"'{key}' applies only to numeric types, not '{dtype.value}'")

    unit = t.get_str("unit", max_len=32)
    rng = _range(t, refuse_for=dtype.value if dtype is not None and not numeric else None)

    interval_s = t.opt_float("interval_s", lo=MIN_INTERVAL_S, hi=MAX_INTERVAL_S)
    writable = t.get_bool("writable", False)
    if writable and space is not None and space not in (Space.HOLDING, Space.COIL):
        t.add("writable", f"only holding and coil points can be writable, not '{space.value}'")
    domain = t.get_str("domain", max_len=64)
    cls = t.get_str("class", max_len=64)
    indicator = t.get_str("indicator", max_len=64)
    description = t.get_str("description")

    if space is not None and dtype is not None:
        if space.is_bits and dtype is not DataType.BOOL:
            t.add(
                "type",
                f"a '{space.value}' point holds one bit: type must be 'bool', not '{dtype.value}'",
            )
        count = length if dtype is DataType.STRING else _WIDTH[dtype]
        if t.present("address") and address + count > 65536:
            t.add(
                "address",
                f"{dtype.value} at {address} needs {count} registers, past the last address 65535",
            )
    t.finish()
    if len(t.problems.items) != before or space is None or dtype is None or not name:
        return None
    spec = PointSpec(
        name=name,
        space=space,
        address=address,
        type=dtype,
        order=Order(order_s),
        length=length,
        bit=bit,
        scale=scale,
        offset=offset,
    )
    return Point(
        spec=spec,
        unit=unit,
        range=rng,
        interval_s=interval_s,
        writable=writable,
        domain=domain,
        cls=cls,
        indicator=indicator,
        description=description,
    )
