"""The gateway configuration: one TOML file per gateway.

:func:`load_config` parses it with :mod:`tomllib` into frozen dataclasses and
raises :class:`~protocols.errors.ConfigError` listing *every* problem of the
file, each naming the file and the key path (``gw.toml: devices[3].slave``).
Every key is documented in ``docs/configuration.md``.

The configuration also numbers the points: every point of every enabled
device gets a gateway-wide integer id (devices in file order, then the points
in profile order, from 0). Only that integer travels on the wire;
:attr:`Config.points` maps it back to its device and point.
"""

from __future__ import annotations

import bisect
import fnmatch
import ipaddress
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, get_args, overload

from drivers._schema import Problems, Table, did_you_mean, read_toml
from drivers.profiles import Point, Profile, available_profiles, load_profile
from protocols import topics
from protocols.address import host_port
from protocols.errors import ConfigError, LocalError
from protocols.event import KINDS as RULE_KINDS
from protocols.event import EventKind
from protocols.modbus.rtu import t35
from protocols.payload import ENCODINGS, Encoding

__all__ = [
    "DEFAULT_PATH",
    "BatchConfig",
    "BusConfig",
    "Config",
    "Confirm",
    "DeviceConfig",
    "GatewayConfig",
    "LogConfig",
    "MetricsConfig",
    "RuleConfig",
    "RuleTarget",
    "SpoolConfig",
    "TlsConfig",
    "UplinkConfig",
    "check",
    "load_config",
]

DEFAULT_PATH = Path("/etc/vitals/gateway.toml")

_GATEWAY_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_NAME_HELP = "use a-z, 0-9, '.', '_' and '-', starting with a letter or digit, at most 63"
_TOPIC = re.compile(r"[^/#+\s][^#+\s]*(?<!/)")

BusKind: TypeAlias = Literal["rtu", "tcp", "rtu-over-tcp", "serial-sensor"]
BUS_KINDS: Final[tuple[BusKind, ...]] = get_args(BusKind)
SENSOR_BUS = "serial-sensor"  # one streaming non-Modbus sensor (PMS5003, SDS011, GPS) on a port
_SERIAL_KEYS = ("port", "baud", "parity", "stopbits", "bytesize", "discard_echo")
_NET_KEYS = ("host", "tcp_port")
# keys each bus kind accepts beyond the common ones
_KIND_KEYS = {
    "rtu": set(_SERIAL_KEYS),
    "tcp": set(_NET_KEYS),
    # baud: of the serial side behind the converter, only to time t3.5
    "rtu-over-tcp": {*_NET_KEYS, "baud"},
    # 8N1 streaming sensors: a port and its speed; timeout_s is the frame timeout
    SENSOR_BUS: {"port", "baud"},
}
_NET_KINDS = ("tcp", "rtu-over-tcp")
SECRET = "***"
# keys each rule kind accepts beyond id, kind, device (and point)
_RULE_KEYS = {
    "threshold": {"above", "below", "clear", "for_s", "window", "timezone"},
    "rate": {"rise", "fall", "within_s", "clear"},
    "stuck": {"for_s", "tolerance"},
    "offline": {"after_s"},
}
_ALL_RULE_KEYS = (
    "above",
    "below",
    "clear",
    "for_s",
    "window",
    "timezone",
    "rise",
    "fall",
    "within_s",
    "tolerance",
    "after_s",
)
_WINDOW = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])")


# -- the sections --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    id: str
    state_dir: Path = Path("/var/lib/vitals")
    profile_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[uplink.tls]``: MQTT over TLS (off by default; see agent.tls and docs/security.md)."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False  # skip hostname and chain checks: for a bench only


#: what deletes a spooled batch: the hub's signed receipt (when the gateway has the
#: hub's key), or the broker's PUBACK
Confirm: TypeAlias = Literal["receipt", "puback"]


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    """How this gateway talks to its broker: one value, passed whole to the uplink
    (:class:`agent.pipeline.uplink.Uplink`), never copied field by field. ``[uplink]`` of the
    file with the gateway's id and the client id resolved, and the uplink's tuning
    that the file does not set (tests and benches do, with ``dataclasses.replace``).
    """

    gateway: str = ""  # [gateway] id: the topics' gateway and the default client id
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # resolved: "vitals-<gateway id>" when left empty
    keepalive_s: int = 30
    topic_prefix: str = topics.DEFAULT_PREFIX
    username: str = ""
    password: str = field(default="", repr=False)
    tls: TlsConfig = TlsConfig()
    window: int = 32  # batches in flight without a PUBACK yet
    backlog_share: float = 0.5  # share of the window the backlog gets while live data flows
    backoff_min_s: float = 0.5  # reconnect back-off: jittered, doubling, capped
    backoff_max_s: float = 30.0
    confirm_timeout_s: float = 60.0  # a sent batch with no hub receipt after this goes again
    heartbeat_s: float = 10.0  # the signed heartbeat naming what the spool holds
    # not in the file
    confirm: Confirm = "receipt"  # "puback": the old rule, even with the hub's key
    publish_timeout_s: float = 30.0  # a PUBACK later than this: the connection failed
    # a broker (or a NAT, a proxy) that accepts TCP but never answers CONNECT must
    # not hold the uplink for the publish timeout: give up and back off sooner
    connect_timeout_s: float = 10.0
    # a failure that lasts is logged again at WARNING: first after warn_after_s,
    # then at doubling intervals up to warn_every_s
    warn_after_s: float = 60.0
    warn_every_s: float = 600.0


@dataclass(frozen=True, slots=True)
class BatchConfig:
    max_readings: int = 5000
    max_age_s: float = 5.0
    encoding: Encoding = "msgpack+zlib"  # or "msgpack"


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    max_bytes: int = 256 * 1024 * 1024
    max_age_h: float = 168.0
    durability: str = "full"  # full | normal | off


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint (``[metrics]``): off while ``listen`` is empty."""

    listen: str = ""  # "127.0.0.1:9108" as written
    host: str = ""
    port: int = 0
    allow_remote: bool = False


@dataclass(frozen=True, slots=True)
class BusConfig:
    name: str
    kind: BusKind
    port: str = ""  # rtu
    baud: int = 9600  # rtu (and rtu-over-tcp, for t3.5 only)
    parity: str = "E"  # rtu: N E O
    stopbits: int = 1
    bytesize: int = 8
    host: str = ""  # tcp, rtu-over-tcp
    tcp_port: int = 502
    timeout_s: float = 1.0
    inter_frame_ms: float = 0.0  # 0 = t3.5 character times at ``baud``
    retries: int = 1
    discard_echo: bool = False

    @property
    def is_serial(self) -> bool:
        return self.kind == "rtu"

    @property
    def frame_gap_s(self) -> float:
        """Silence to keep between transactions: ``inter_frame_ms`` or t3.5.

        Modbus over serial line v1.02 §2.5.1.1: 3.5 character times (11 bits
        each), fixed at 1.75 ms above 19200 baud. Modbus TCP needs none.
        """
        if self.inter_frame_ms > 0:
            return self.inter_frame_ms / 1000.0
        if self.kind == "tcp":
            return 0.0
        return t35(self.baud)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    name: str
    bus: str
    profile_name: str
    profile: Profile
    slave: int
    interval_s: float  # resolved: the device's override or the profile's default
    enabled: bool = True

    def interval_of(self, point: Point) -> float:
        """Poll interval of ``point`` on this device."""
        return point.interval_s if point.interval_s is not None else self.interval_s


class PointTable(Mapping[int, tuple[DeviceConfig, Point]]):
    """Point id -> (device, point), for the enabled devices in file order.

    The points of a device have consecutive ids, in its profile's order, so the
    table keeps one first id per device and computes the rest: 500 devices of
    30 points are 500 entries, not 15,000 tuples in two dicts (3 MB).
    """

    __slots__ = ("_bases", "_devices", "_len", "ids")

    def __init__(self, devices: Sequence[DeviceConfig]) -> None:
        self._devices = tuple(d for d in devices if d.enabled)
        bases, n = [], 0
        for d in self._devices:
            bases.append(n)
            n += len(d.profile.points)
        self._bases = tuple(bases)
        self._len = n
        self.ids = PointIds(self)

    def __getitem__(self, pid: int) -> tuple[DeviceConfig, Point]:
        if not isinstance(pid, int) or not 0 <= pid < self._len:
            raise KeyError(pid)
        i = bisect.bisect_right(self._bases, pid) - 1
        dev = self._devices[i]
        return dev, dev.profile.points[pid - self._bases[i]]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._len))

    def __len__(self) -> int:
        return self._len

    def first_id(self, device: str) -> int:
        """The id of the first point of enabled device ``device`` (KeyError if none)."""
        return self.ids.first[device][0]

    def of(self, device: DeviceConfig) -> Sequence[tuple[int, Point]]:
        """``(point id, point)`` of each point of an enabled device, computed when read."""
        return _DevicePoints(self.first_id(device.name), device.profile.points)


class PointIds(Mapping[tuple[str, str], int]):
    """(device name, point name) -> point id, computed from a :class:`PointTable`."""

    __slots__ = ("_index", "_table", "first")

    def __init__(self, table: PointTable) -> None:
        self._table = table
        self.first = {
            d.name: (base, d) for base, d in zip(table._bases, table._devices, strict=True)
        }
        self._index: dict[int, dict[str, int]] = {}  # id(profile) -> point name -> index

    def __getitem__(self, key: tuple[str, str]) -> int:
        try:
            base, dev = self.first[key[0]]
            profile = dev.profile
            index = self._index.get(id(profile))
            if index is None:
                index = self._index[id(profile)] = {p.name: i for i, p in enumerate(profile.points)}
            return base + index[key[1]]
        except (KeyError, IndexError, TypeError):
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for d in self._table._devices:
            for p in d.profile.points:
                yield (d.name, p.name)

    def __len__(self) -> int:
        return len(self._table)


class _DevicePoints(Sequence[tuple[int, Point]]):
    __slots__ = ("_base", "_points")

    def __init__(self, base: int, points: Sequence[Point]) -> None:
        self._base, self._points = base, points

    @overload
    def __getitem__(self, i: int) -> tuple[int, Point]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[int, Point]]: ...
    def __getitem__(self, i: int | slice) -> tuple[int, Point] | Sequence[tuple[int, Point]]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self._points)))]
        if i < 0:
            i += len(self._points)
        return self._base + i, self._points[i]

    def __len__(self) -> int:
        return len(self._points)


@dataclass(frozen=True, slots=True)
class RuleTarget:
    """One device (and point) a rule watches: ``pids`` are the gateway point ids
    whose readings feed it (the point's id; every point of the device for an
    ``offline`` rule, whose ``point`` is "" and ``pid`` -1)."""

    device: str
    point: str
    pid: int
    pids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """A ``[[rules]]`` block: an edge-event rule, resolved to its targets.

    ``threshold``: fires when the value is above ``above`` (or below
    ``below``) for at least ``for_s``, inside the local-time ``window`` if one
    is set; clears at ``clear`` (hysteresis) or when the window ends.
    ``rate``: fires when the value rose by ``rise`` (or fell by ``fall``)
    within ``within_s``; clears when the change within ``within_s`` is back
    under ``clear``. ``stuck``: fires when the value moved by no more than
    ``tolerance`` for ``for_s``; clears when it moves. ``offline``: fires when
    the device gave no good reading for ``after_s``; clears at the next one.
    """

    id: str
    kind: EventKind
    device: str  # a device name or a glob over device names ("weather-*")
    point: str  # "" for offline rules
    targets: tuple[RuleTarget, ...]
    above: float | None = None
    below: float | None = None
    rise: float | None = None
    fall: float | None = None
    clear: float | None = None  # resolved: never None for threshold and rate
    for_s: float = 0.0
    within_s: float = 0.0
    tolerance: float = 0.0
    after_s: float = 0.0
    window: tuple[int, int] | None = None  # (start, end) minutes after local midnight
    timezone: str = ""  # IANA name; "" = the gateway's local time

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "device": self.device}
        if self.point:
            out["point"] = self.point
        for key in ("above", "below", "rise", "fall", "clear"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        keys = sorted(_RULE_KEYS[self.kind] - {"above", "below", "rise", "fall", "clear"})
        for key in keys:
            if key == "window":
                if self.window is not None:
                    a, b = self.window
                    out["window"] = f"{a // 60:02d}:{a % 60:02d}-{b // 60:02d}:{b % 60:02d}"
            elif key == "timezone":
                if self.timezone:
                    out["timezone"] = self.timezone
            else:
                out[key] = getattr(self, key)
        out["targets"] = [f"{t.device}.{t.point}" if t.point else t.device for t in self.targets]
        return out


@dataclass(frozen=True, slots=True)
class Config:
    """A validated gateway configuration."""

    source: Path
    gateway: GatewayConfig
    uplink: UplinkConfig
    batch: BatchConfig
    spool: SpoolConfig
    log: LogConfig
    buses: tuple[BusConfig, ...]
    devices: tuple[DeviceConfig, ...]
    # point id -> (device, point), enabled devices only
    points: PointTable
    # (device name, point name) -> point id
    point_ids: PointIds
    rules: tuple[RuleConfig, ...] = ()
    metrics: MetricsConfig = MetricsConfig()

    def bus(self, name: str) -> BusConfig:
        for b in self.buses:
            if b.name == name:
                return b
        raise KeyError(name)

    def device(self, name: str) -> DeviceConfig:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def devices_on(self, bus: str) -> tuple[DeviceConfig, ...]:
        """The enabled devices of bus ``bus``, in file order."""
        return tuple(d for d in self.devices if d.bus == bus and d.enabled)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data, secrets replaced by ``***``."""
        tls = self.uplink.tls
        return {
            "source": str(self.source),
            "gateway": {
                "id": self.gateway.id,
                "state_dir": str(self.gateway.state_dir),
                "profile_dirs": [str(p) for p in self.gateway.profile_dirs],
            },
            "uplink": {
                "host": self.uplink.host,
                "port": self.uplink.port,
                "client_id": self.uplink.client_id,
                "keepalive_s": self.uplink.keepalive_s,
                "topic_prefix": self.uplink.topic_prefix,
                "username": self.uplink.username,
                "password": SECRET if self.uplink.password else "",
                "window": self.uplink.window,
                "backlog_share": self.uplink.backlog_share,
                "backoff_min_s": self.uplink.backoff_min_s,
                "backoff_max_s": self.uplink.backoff_max_s,
                "confirm_timeout_s": self.uplink.confirm_timeout_s,
                "heartbeat_s": self.uplink.heartbeat_s,
                "tls": {
                    "enabled": tls.enabled,
                    "ca_file": str(tls.ca_file) if tls.ca_file else "",
                    "cert_file": str(tls.cert_file) if tls.cert_file else "",
                    "key_file": str(tls.key_file) if tls.key_file else "",
                    "insecure": tls.insecure,
                },
            },
            "batch": {
                "max_readings": self.batch.max_readings,
                "max_age_s": self.batch.max_age_s,
                "encoding": self.batch.encoding,
            },
            "spool": {
                "max_bytes": self.spool.max_bytes,
                "max_age_h": self.spool.max_age_h,
                "durability": self.spool.durability,
            },
            "log": {"level": self.log.level, "format": self.log.format},
            "metrics": {
                "listen": self.metrics.listen,
                "allow_remote": self.metrics.allow_remote,
            },
            "buses": [_bus_dict(b) for b in self.buses],
            "devices": [
                {
                    "name": d.name,
                    "bus": d.bus,
                    "profile": d.profile_name,
                    "slave": d.slave,
                    "interval_s": d.interval_s,
                    "enabled": d.enabled,
                    "points": {
                        p.name: self.point_ids[(d.name, p.name)]
                        for p in d.profile.points
                        if (d.name, p.name) in self.point_ids
                    },
                }
                for d in self.devices
            ],
            "rules": [r.to_dict() for r in self.rules],
        }


def _bus_dict(b: BusConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": b.name, "kind": b.kind}
    if b.kind == SENSOR_BUS:
        out.update(port=b.port, baud=b.baud, timeout_s=b.timeout_s)
        return out
    if b.kind == "rtu":
        out.update(
            port=b.port,
            baud=b.baud,
            parity=b.parity,
            stopbits=b.stopbits,
            bytesize=b.bytesize,
            discard_echo=b.discard_echo,
        )
    else:
        out.update(host=b.host, tcp_port=b.tcp_port)
        if b.kind == "rtu-over-tcp":
            out["baud"] = b.baud
    out.update(timeout_s=b.timeout_s, inter_frame_ms=b.inter_frame_ms, retries=b.retries)
    return out


# -- loading -------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read, validate and resolve the gateway configuration at ``path``.

    Relative paths inside it are relative to the file's directory. Raises
    :class:`ConfigError` with every problem found.
    """
    path = Path(path)
    source = str(path)
    data = read_toml(path, source)
    return parse_config(data, source=source, base=path.resolve().parent, path=path)


def parse_config(
    data: dict[str, object], *, source: str, base: Path, path: Path | None = None
) -> Config:
    """Validate parsed TOML; ``source`` names the file in problems, ``base``
    anchors relative paths."""
    problems = Problems(source)
    root = Table(problems, "", data)

    gateway = _gateway(root.get_table("gateway", required=True), base)
    uplink = _uplink(root.get_table("uplink"), gateway.id, base)
    batch = _batch(root.get_table("batch"))
    spool = _spool(root.get_table("spool"))
    log = _log(root.get_table("log"))
    metrics = _metrics(root.get_table("metrics"))

    buses: list[BusConfig] = []
    bus_index: dict[str, int] = {}
    for i, t in enumerate(root.get_tables("buses")):
        bus = _bus(t)
        if bus is None:
            continue
        if bus.name in bus_index:
            t.add("name", f"duplicate bus name '{bus.name}' (also buses[{bus_index[bus.name]}])")
            continue
        bus_index[bus.name] = i
        buses.append(bus)

    bus_tables = root.data.get("buses")
    bus_names = [b.name for b in buses]
    devices: list[DeviceConfig] = []
    device_index: dict[str, int] = {}
    slaves: dict[tuple[str, int], tuple[int, str]] = {}
    for i, t in enumerate(root.get_tables("devices")):
        dev = _device(t, gateway.profile_dirs, bus_names, bus_tables, buses)
        if dev is None:
            continue
        if dev.name in device_index:
            t.add(
                "name",
                f"duplicate device name '{dev.name}' (also devices[{device_index[dev.name]}])",
            )
            continue
        device_index[dev.name] = i
        if dev.enabled and dev.profile.is_sensor:
            other = next(((j, n) for (b, _), (j, n) in slaves.items() if b == dev.bus), None)
            if other is not None:
                t.add(
                    "bus",
                    f"a '{SENSOR_BUS}' bus carries one sensor: '{dev.bus}' already has "
                    f"'{other[1]}' (devices[{other[0]}])",
                )
                continue
        if dev.enabled:
            other = slaves.get((dev.bus, dev.slave))
            if other is not None:
                t.add(
                    "slave",
                    f"slave {dev.slave} on bus '{dev.bus}' is already used by device "
                    f"'{other[1]}' (devices[{other[0]}])",
                )
                continue
            slaves[(dev.bus, dev.slave)] = (i, dev.name)
        devices.append(dev)
    points = PointTable(devices)
    ids = points.ids

    rules: list[RuleConfig] = []
    rule_index: dict[str, int] = {}
    device_names = [d.name for d in devices]
    for i, t in enumerate(root.get_tables("rules")):
        rule = _rule(t, devices, device_names, ids)
        if rule is None:
            continue
        if rule.id in rule_index:
            t.add("id", f"duplicate rule id '{rule.id}' (also rules[{rule_index[rule.id]}])")
            continue
        rule_index[rule.id] = i
        rules.append(rule)
    root.finish()
    problems.raise_if_any()
    return Config(
        source=path if path is not None else Path(source),
        gateway=gateway,
        uplink=uplink,
        batch=batch,
        spool=spool,
        log=log,
        buses=tuple(buses),
        devices=tuple(devices),
        points=points,
        point_ids=ids,
        rules=tuple(rules),
        metrics=metrics,
    )


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _gateway(t: Table, base: Path) -> GatewayConfig:
    gid = t.get_str(
        "id",
        required=True,
        pattern=_GATEWAY_ID,
        pattern_help="use a-z, 0-9 and '-', starting with a letter or digit, at most 63",
    )
    state_dir = _path(base, t.get_str("state_dir", "/var/lib/vitals", nonempty=True))
    dirs: list[Path] = []
    for key, value in t.get_str_list("profile_dirs"):
        d = _path(base, value)
        if not d.is_dir():
            t.add(key, f"no such directory '{d}'")
        else:
            dirs.append(d)
    t.finish()
    return GatewayConfig(id=gid, state_dir=state_dir, profile_dirs=tuple(dirs))


def _uplink(t: Table, gateway_id: str, base: Path) -> UplinkConfig:
    host = t.get_str("host", "127.0.0.1", nonempty=True, max_len=253)
    port = t.get_int("port", 1883, lo=1, hi=65535)
    client_id = t.get_str("client_id", "", max_len=128)
    keepalive_s = t.get_int("keepalive_s", 30, lo=5, hi=65535)
    topic_prefix = t.get_str(
        "topic_prefix",
        topics.DEFAULT_PREFIX,
        pattern=_TOPIC,
        pattern_help="a topic without '+', '#', spaces, or a leading or trailing '/'",
    )
    username = t.get_str("username")
    password = t.get_str("password")
    if password and not username and t.present("password"):
        t.add("password", "a password needs a username")
    window = t.get_int("window", 32, lo=1, hi=1000)
    backlog_share = t.get_float("backlog_share", 0.5, lo=0.0, hi=1.0)
    backoff_min_s = t.get_float("backoff_min_s", 0.5, lo=0.01, hi=60.0)
    backoff_max_s = t.get_float("backoff_max_s", 30.0, lo=0.1, hi=3600.0)
    if backoff_max_s < backoff_min_s:
        t.add("backoff_max_s", f"{backoff_max_s:g} is below backoff_min_s ({backoff_min_s:g})")
    confirm_timeout_s = t.get_float("confirm_timeout_s", 60.0, lo=1.0, hi=86400.0)
    heartbeat_s = t.get_float("heartbeat_s", 10.0, lo=1.0, hi=3600.0)
    tls = _tls(t.get_table("tls"), base)
    t.finish()
    return UplinkConfig(
        gateway=gateway_id,
        host=host,
        port=port,
        client_id=client_id or f"vitals-{gateway_id}",
        keepalive_s=keepalive_s,
        topic_prefix=topic_prefix,
        username=username,
        password=password,
        tls=tls,
        window=window,
        backlog_share=backlog_share,
        backoff_min_s=backoff_min_s,
        backoff_max_s=backoff_max_s,
        confirm_timeout_s=confirm_timeout_s,
        heartbeat_s=heartbeat_s,
    )


def _tls(t: Table, base: Path) -> TlsConfig:
    enabled = t.get_bool("enabled")
    files: dict[str, Path | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value = t.get_str(key)
        files[key] = _path(base, value) if value else None
    insecure = t.get_bool("insecure")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        missing = "key_file" if files["key_file"] is None else "cert_file"
        t.add(missing, "cert_file and key_file go together: set both or neither")
    t.finish()
    return TlsConfig(
        enabled=enabled,
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        insecure=insecure,
    )


def _batch(t: Table) -> BatchConfig:
    out = BatchConfig(
        max_readings=t.get_int("max_readings", 5000, lo=1, hi=10000),
        max_age_s=t.get_float("max_age_s", 5.0, lo=0.05, hi=3600.0),
        encoding=t.get_choice("encoding", ENCODINGS, "msgpack+zlib", what="encoding"),
    )
    t.finish()
    return out


def _spool(t: Table) -> SpoolConfig:
    out = SpoolConfig(
        max_bytes=t.get_int("max_bytes", 256 * 1024 * 1024, lo=1 << 20, hi=1 << 40),
        max_age_h=t.get_float("max_age_h", 168.0, lo=1.0, hi=8760.0),
        durability=t.get_str(
            "durability", "full", choices=["full", "normal", "off"], what="durability"
        ),
    )
    t.finish()
    return out


def _log(t: Table) -> LogConfig:
    out = LogConfig(
        level=t.get_str(
            "level", "info", choices=["debug", "info", "warning", "error"], what="level"
        ),
        format=t.get_str("format", "text", choices=["text", "json"], what="format"),
    )
    t.finish()
    return out


def _metrics(t: Table) -> MetricsConfig:
    listen = t.get_str("listen", max_len=300)
    allow_remote = t.get_bool("allow_remote")
    t.finish()
    if not listen:
        return MetricsConfig(allow_remote=allow_remote)
    try:
        host, port = host_port(listen)
    except LocalError:
        t.add("listen", f"'{listen}' is not host:port; write e.g. \"127.0.0.1:9108\"")
        return MetricsConfig()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        t.add(
            "listen",
            f"{host} is not a loopback address: anyone who reaches it reads the gateway's "
            "counters; set allow_remote = true to mean it, or listen on 127.0.0.1",
        )
    return MetricsConfig(listen=listen, host=host, port=port, allow_remote=allow_remote)


def _bus(t: Table) -> BusConfig | None:
    before = len(t.problems.items)
    name = t.get_str("name", required=True, pattern=_NAME, pattern_help=_NAME_HELP)
    kind = t.get_choice("kind", BUS_KINDS, required=True, what="bus kind")
    t.known(*_SERIAL_KEYS, *_NET_KEYS)
    if kind:
        allowed = _KIND_KEYS[kind]
        for key in (*_SERIAL_KEYS, *_NET_KEYS):
            if t.present(key) and key not in allowed:
                kinds = [k for k in BUS_KINDS if key in _KIND_KEYS[k]]
                t.add(
                    key,
                    f"'{key}' does not apply to a '{kind}' bus (only to {_and(kinds)})",
                )
    if kind == SENSOR_BUS:
        for key in ("inter_frame_ms", "retries"):
            if t.present(key):
                t.add(key, f"'{key}' does not apply to a '{kind}' bus (nothing is polled)")
    port = ""
    if kind in ("rtu", SENSOR_BUS):
        port = t.get_str("port", required=True, nonempty=True)
    host = ""
    if kind in ("tcp", "rtu-over-tcp"):
        host = t.get_str("host", required=True, nonempty=True, max_len=253)
    bus = BusConfig(
        name=name,
        kind=kind or "rtu",  # None: a problem is recorded and this bus dropped below
        port=port,
        baud=t.get_int("baud", 9600, lo=1200, hi=921600) if kind != "tcp" else 9600,
        parity=t.get_str("parity", "E", choices=["N", "E", "O"], what="parity")
        if kind == "rtu"
        else ("N" if kind == SENSOR_BUS else "E"),
        stopbits=t.get_int("stopbits", 1, choices=[1, 2]) if kind == "rtu" else 1,
        bytesize=_bytesize(t) if kind == "rtu" else 8,
        host=host,
        tcp_port=t.get_int("tcp_port", 502, lo=1, hi=65535) if kind in _NET_KINDS else 502,
        # for a sensor: how long it may stay silent before its points read comm-error
        timeout_s=t.get_float("timeout_s", 5.0 if kind == SENSOR_BUS else 1.0, lo=0.01, hi=30.0),
        inter_frame_ms=t.get_float("inter_frame_ms", 0.0, lo=0.0, hi=10000.0),
        retries=t.get_int("retries", 1, lo=0, hi=10),
        discard_echo=t.get_bool("discard_echo") if kind == "rtu" else False,
    )
    t.finish()
    if len(t.problems.items) != before or not name or not kind:
        return None
    return bus


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _bytesize(t: Table) -> int:
    value = t.get_int("bytesize", 8)
    if value != 8 and t.present("bytesize") and isinstance(t.data["bytesize"], int):
        t.add("bytesize", f"value {value} not allowed: Modbus RTU needs 8 data bits")
        return 8
    return value


def _is_sensor(name: str, profile_dirs: tuple[Path, ...]) -> bool:
    try:
        return load_profile(name, search=profile_dirs).is_sensor
    except ConfigError:
        return False


def _device(
    t: Table,
    profile_dirs: tuple[Path, ...],
    bus_names: list[str],
    bus_tables: object,
    buses: list[BusConfig],
) -> DeviceConfig | None:
    before = len(t.problems.items)
    name = t.get_str("name", required=True, pattern=_NAME, pattern_help=_NAME_HELP)
    bus_name = t.get_str("bus", required=True, nonempty=True)
    declared = (
        [b.get("name") for b in bus_tables if isinstance(b, dict)]
        if isinstance(bus_tables, list)
        else []
    )
    if bus_name and bus_name not in bus_names and bus_name not in declared:
        # name every declared bus, also one refused for its own problem (listed apart)
        names = [n for n in declared if isinstance(n, str) and n]
        known = ", ".join(n if n in bus_names else f"{n} (has a problem of its own)" for n in names)
        t.add(
            "bus",
            f"no bus named '{bus_name}'{did_you_mean(bus_name, names)}; "
            f"buses: {known or '(none: add a [[buses]] block)'}",
        )
    kind = next((b.kind for b in buses if b.name == bus_name), None)
    profile_name = t.get_str("profile", required=True, nonempty=True)
    profile: Profile | None = None
    if profile_name:
        try:
            profile = load_profile(profile_name, search=profile_dirs)
        except ConfigError as exc:
            if len(exc.problems) == 1 and exc.problems[0][0] == profile_name:
                available = available_profiles(profile_dirs)
                t.add(
                    "profile",
                    f"unknown profile '{profile_name}'"
                    f"{did_you_mean(profile_name, available)}; "
                    f"available: {', '.join(available) or '(none)'}",
                )
            else:
                t.add("profile", f"profile '{profile_name}' is invalid (its problems follow)")
                t.problems.extend(exc.problems)
    if profile is not None and kind is not None:
        sensors = ", ".join(
            n for n in available_profiles(profile_dirs) if _is_sensor(n, profile_dirs)
        )
        if kind == SENSOR_BUS and not profile.is_sensor:
            t.add(
                "profile",
                f"'{profile_name}' is a Modbus register map; a '{SENSOR_BUS}' bus needs a "
                f"serial-sensor profile ({sensors})",
            )
        elif kind != SENSOR_BUS and profile.is_sensor:
            t.add(
                "profile",
                f"'{profile_name}' is a serial sensor ({profile.protocol}): put it on a bus of "
                f"kind '{SENSOR_BUS}', not '{kind}'",
            )
    # a sensor has no address: slave is optional there (and meaningless)
    slave = t.get_int("slave", 1, required=kind != SENSOR_BUS)
    if (
        t.present("slave")
        and isinstance(t.data["slave"], int)
        and not isinstance(t.data["slave"], bool)
    ):
        if slave == 0:
            t.add("slave", "slave 0 is the broadcast address: devices need 1..247")
        elif slave == 255 and kind not in (None, "tcp"):
            t.add("slave", "slave 255 is allowed only on a tcp bus; use 1..247")
        elif not (1 <= slave <= 247 or slave == 255):
            t.add("slave", f"value {slave} out of range 1..247 (255 on tcp buses)")
    interval = t.opt_float("interval_s", lo=0.05, hi=86400.0)
    enabled = t.get_bool("enabled", True)
    t.finish()
    if len(t.problems.items) != before or profile is None:
        return None
    return DeviceConfig(
        name=name,
        bus=bus_name,
        profile_name=profile_name,
        profile=profile,
        slave=slave,
        interval_s=interval if interval is not None else profile.interval_s,
        enabled=enabled,
    )


def _rule(
    t: Table,
    devices: list[DeviceConfig],
    device_names: list[str],
    ids: Mapping[tuple[str, str], int],
) -> RuleConfig | None:
    before = len(t.problems.items)
    rid = t.get_str("id", required=True, pattern=_NAME, pattern_help=_NAME_HELP)
    kind = t.get_choice("kind", RULE_KINDS, required=True, what="rule kind")
    device = t.get_str("device", required=True, nonempty=True)
    t.known("point", *_ALL_RULE_KEYS)
    if kind:
        for key in _ALL_RULE_KEYS:
            if t.present(key) and key not in _RULE_KEYS[kind]:
                kinds = [k for k in RULE_KINDS if key in _RULE_KEYS[k]]
                t.add(
                    key,
                    f"'{key}' does not apply to a '{kind}' rule (only to {' and '.join(kinds)})",
                )
    point = ""
    if kind == "offline":
        if t.present("point"):
            t.add("point", "an 'offline' rule watches a whole device: drop 'point'")
    elif kind:
        point = t.get_str("point", required=True, nonempty=True)
    # the targets: enabled devices matching `device`, having `point`
    targets: list[RuleTarget] = []
    if device:
        glob = any(c in device for c in "*?[")
        matched = [
            d
            for d in devices
            if d.enabled and (fnmatch.fnmatchcase(d.name, device) if glob else d.name == device)
        ]
        if not matched:
            if glob:
                t.add("device", f"pattern '{device}' matches no enabled device")
            elif device in device_names:
                t.add("device", f"device '{device}' is disabled")
            else:
                known = ", ".join(device_names) or "(none)"
                t.add(
                    "device",
                    f"no device named '{device}'{did_you_mean(device, device_names)}; devices: {known}",
                )
        for d in matched:
            if kind == "offline":
                pids = tuple(ids[(d.name, p.name)] for p in d.profile.points)
                targets.append(RuleTarget(d.name, "", -1, pids))
            elif point:
                pid = ids.get((d.name, point))
                if pid is not None:
                    numeric = d.profile.point(point).spec.type.name not in ("STRING",)
                    if not numeric and kind in ("threshold", "rate"):
                        t.add(
                            "point", f"point '{point}' of device '{d.name}' is a string: no {kind}"
                        )
                    targets.append(RuleTarget(d.name, point, pid, (pid,)))
                elif not glob:
                    names = [p.name for p in d.profile.points]
                    t.add(
                        "point",
                        f"device '{d.name}' ({d.profile_name}) has no point '{point}'"
                        f"{did_you_mean(point, names)}",
                    )
        if glob and matched and point and not targets:
            t.add("point", f"no device matching '{device}' has a point '{point}'")
    above = below = rise = fall = clear = None
    for_s = within_s = tolerance = after_s = 0.0
    window: tuple[int, int] | None = None
    timezone = ""
    if kind == "threshold":
        above = t.opt_float("above")
        below = t.opt_float("below")
        if (above is None) == (below is None) and not (t.present("above") or t.present("below")):
            t.add("", "a threshold rule needs 'above' or 'below'")
        elif t.present("above") and t.present("below"):
            t.add("below", "set 'above' or 'below', not both (use two rules for a band)")
        level = above if above is not None else below
        clear = t.opt_float("clear")
        if clear is None:
            clear = level
        elif level is not None:
            if above is not None and clear > above:
                t.add(
                    "clear",
                    f"value {clear:g} must be at most above ({above:g}): it is the level the value falls back to",
                )
            if below is not None and clear < below:
                t.add(
                    "clear",
                    f"value {clear:g} must be at least below ({below:g}): it is the level the value climbs back to",
                )
        for_s = t.get_float("for_s", 0.0, lo=0.0, hi=86400.0)
        text = t.get_str("window")
        if text:
            m = _WINDOW.fullmatch(text)
            if m is None:
                t.add(
                    "window",
                    f"invalid value '{text}': use HH:MM-HH:MM in local time, e.g. '22:00-07:00'",
                )
            else:
                a = int(m[1]) * 60 + int(m[2])
                b = int(m[3]) * 60 + int(m[4])
                if a == b:
                    t.add("window", f"invalid value '{text}': start and end are the same time")
                else:
                    window = (a, b)
        timezone = t.get_str("timezone")
        if timezone:
            import zoneinfo  # only a rule with a time zone needs it (~0.2 MB resident)

            try:
                zoneinfo.ZoneInfo(timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                t.add(
                    "timezone",
                    f"unknown time zone '{timezone}': use an IANA name like 'Asia/Hong_Kong'",
                )
                timezone = ""
            if not t.present("window"):
                t.add("timezone", "a timezone only applies with a 'window'")
    elif kind == "rate":
        rise = t.opt_float("rise", lo=0.0)
        fall = t.opt_float("fall", lo=0.0)
        if not t.present("rise") and not t.present("fall"):
            t.add("", "a rate rule needs 'rise' or 'fall'")
        elif t.present("rise") and t.present("fall"):
            t.add("fall", "set 'rise' or 'fall', not both (use two rules)")
        step = rise if rise is not None else fall
        if step is not None and step <= 0:
            t.add("rise" if rise is not None else "fall", "must be greater than 0")
        within_s = t.get_float("within_s", 0.0, required=True, lo=1.0, hi=86400.0)
        clear = t.opt_float("clear", lo=0.0)
        if clear is None:
            clear = step / 2 if step is not None else None
        elif step is not None and clear > step:
            key = "rise" if rise is not None else "fall"
            t.add("clear", f"value {clear:g} must be at most {key} ({step:g})")
    elif kind == "stuck":
        for_s = t.get_float("for_s", 0.0, required=True, lo=1.0, hi=30 * 86400.0)
        tolerance = t.get_float("tolerance", 0.0, lo=0.0)
    elif kind == "offline":
        after_s = t.get_float("after_s", 0.0, required=True, lo=1.0, hi=30 * 86400.0)
    t.finish()
    if len(t.problems.items) != before or not rid or not kind:
        return None
    return RuleConfig(
        id=rid,
        kind=kind,
        device=device,
        point=point,
        targets=tuple(targets),
        above=above,
        below=below,
        rise=rise,
        fall=fall,
        clear=clear,
        for_s=for_s,
        within_s=within_s,
        tolerance=tolerance,
        after_s=after_s,
        window=window,
        timezone=timezone,
    )


# -- `vitals config check` -----------------------------------------------------


def check(path: str | Path, *, as_json: bool = False) -> tuple[int, str]:
    """Validate the file for ``vitals config check FILE``.

    Returns ``(0, resolved config as JSON)`` or ``(1, one problem per line)``; with
    ``as_json`` one JSON object, ``{"ok": true, "config": ...}`` or
    ``{"ok": false, "problems": [{"where": ..., "problem": ...}, ...]}``.
    """
    try:
        config = load_config(path)
    except ConfigError as exc:
        if as_json:
            problems = [{"where": where, "problem": msg} for where, msg in exc.problems]
            return 1, json.dumps({"ok": False, "problems": problems}, ensure_ascii=False)
        return 1, "\n".join(f"{where}: {msg}" for where, msg in exc.problems)
    if as_json:
        return 0, json.dumps({"ok": True, "config": config.to_dict()}, ensure_ascii=False)
    return 0, json.dumps(config.to_dict(), indent=2, ensure_ascii=False)
