"""Fleet scenarios: a TOML file of signal models, timed faults, weather and rules.

Times are fractions of the run (0.0 = start, 1.0 = end), so one scenario fits
``--duration 20`` in CI and ``--duration 3600`` on a bench. Shipped scenarios
live in ``simulator/scenarios/<name>.toml``; ``docs/fleet.md`` is the format
reference. Validation reports every problem with its key path, like the
gateway configuration (``typhoon.toml: events[2].kind: ...``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers._schema import Problems, Table, read_toml
from drivers.profiles import available_profiles

__all__ = [
    "EVENT_KINDS",
    "SCENARIO_DIR",
    "FaultEvent",
    "Raise",
    "Scenario",
    "SignalModel",
    "Typhoon",
    "available_scenarios",
    "load_scenario",
]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
EVENT_KINDS = ("terminal_dies", "bus_noisy", "broker_outage")


@dataclass(frozen=True, slots=True)
class SignalModel:
    """Replaces the default signal of ``point`` of ``profile`` ("*" = every profile)."""

    profile: str
    point: str
    base: float
    noise: float = 0.0
    daily: float = 0.0  # amplitude of a 24 h sine
    drift_per_min: float = 0.0
    stuck_fraction: float = 0.0  # share of terminals where the point holds still


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """A timed fault. ``gateway``/``terminal`` are indexes, -1 = every one."""

    kind: str
    at: float
    duration: float  # 0 = until the end
    gateway: int = -1
    terminal: int = -1
    error_rate: float = 0.5  # bus_noisy: share of requests answered with an exception


@dataclass(frozen=True, slots=True)
class Raise:
    point: str
    peak: float  # added to the point's value at the storm's peak


@dataclass(frozen=True, slots=True)
class Typhoon:
    """A storm crossing the district: gateway g sees it ``sweep * g / (G-1)`` later."""

    start: float
    peak: float
    end: float
    sweep: float
    raises: tuple[Raise, ...]
    fail_fraction: float = 0.0  # terminals of the raised points that die at their peak
    seed: int = 7

    def intensity(self, frac: float, gateway: int, gateways: int) -> float:
        """0..1 at run fraction ``frac`` for gateway index ``gateway``: a smooth bump."""
        shift = self.sweep * gateway / max(1, gateways - 1)
        t = frac - shift
        if t <= self.start or t >= self.end:
            return 0.0
        if t <= self.peak:
            x = (t - self.start) / (self.peak - self.start)
        else:
            x = (self.end - t) / (self.end - self.peak)
        return 0.5 - 0.5 * math.cos(math.pi * x)

    def peak_at(self, gateway: int, gateways: int) -> float:
        return self.peak + self.sweep * gateway / max(1, gateways - 1)

    def fail_at(self, gateway: int, gateways: int) -> float:
        """When failing terminals of ``gateway`` die: a third of the way down from the peak."""
        return self.peak_at(gateway, gateways) + (self.end - self.peak) / 3

    def fails(self, gateway: int, terminal: int) -> bool:
        """Whether this terminal dies at its gateway's peak (deterministic by seed)."""
        rng = random.Random(f"{self.seed}:{gateway}:{terminal}")
        return rng.random() < self.fail_fraction


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    profiles: tuple[str, ...] = ()  # terminal mix, round robin; () = every shipped profile
    interval_s: float = 1.0  # poll interval of every device (points with their own keep it)
    signals: tuple[SignalModel, ...] = ()
    events: tuple[FaultEvent, ...] = ()
    typhoon: Typhoon | None = None
    rules: tuple[dict[str, Any], ...] = ()  # [[rules]] copied into every gateway config
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def signal_for(self, profile: str, point: str) -> SignalModel | None:
        for s in self.signals:
            if s.point == point and s.profile in ("*", profile):
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the emulator processes and the JSON report)."""
        from dataclasses import asdict

        return {
            "name": self.name,
            "description": self.description,
            "profiles": list(self.profiles),
            "interval_s": self.interval_s,
            "signals": [asdict(s) for s in self.signals],
            "events": [asdict(e) for e in self.events],
            "typhoon": asdict(self.typhoon) if self.typhoon else None,
            "rules": list(self.rules),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scenario:
        ty = d.get("typhoon")
        return Scenario(
            name=d["name"],
            description=d.get("description", ""),
            profiles=tuple(d.get("profiles", ())),
            interval_s=float(d.get("interval_s", 1.0)),
            signals=tuple(SignalModel(**s) for s in d.get("signals", ())),
            events=tuple(FaultEvent(**e) for e in d.get("events", ())),
            typhoon=Typhoon(
                **{k: v for k, v in ty.items() if k != "raises"},
                raises=tuple(Raise(**r) for r in ty["raises"]),
            )
            if ty
            else None,
            rules=tuple(d.get("rules", ())),
        )


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A shipped scenario by name, or a scenario file by path; :class:`ConfigError` if invalid."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{name_or_path}.toml"
        if not path.exists():
            from protocols.errors import ConfigError

            raise ConfigError(
                [
                    (
                        str(name_or_path),
                        f"no such scenario; shipped: {', '.join(available_scenarios())}",
                    )
                ]
            )
    source = path.name
    data = read_toml(path, source)
    return parse_scenario(data, source=source)


def _frac(t: Table, key: str, default: float, *, required: bool = False) -> float:
    return t.get_float(key, default, required=required, lo=0.0, hi=1.0)


def parse_scenario(data: dict[str, object], *, source: str) -> Scenario:
    problems = Problems(source)
    root = Table(problems, "", data)
    head = root.get_table("scenario", required=True)
    name = head.get_str("name", required=True, nonempty=True)
    description = head.get_str("description")
    known = available_profiles(())
    profiles: list[str] = []
    for key, value in head.get_str_list("profiles"):
        if value not in known:
            head.problems.add(
                head.key(key), f"unknown profile '{value}'; available: {', '.join(known)}"
            )
        else:
            profiles.append(value)
    interval = head.get_float("interval_s", 1.0, lo=0.1, hi=3600.0)
    head.finish()

    signals: list[SignalModel] = []
    for t in root.get_tables("signals"):
        prof = t.get_str("profile", "*", nonempty=True)
        if prof != "*" and prof not in known:
            t.add("profile", f"unknown profile '{prof}'; available: {', '.join(known)}")
        signals.append(
            SignalModel(
                profile=prof,
                point=t.get_str("point", required=True, nonempty=True),
                base=t.get_float("base", 0.0, required=True),
                noise=t.get_float("noise", 0.0, lo=0.0),
                daily=t.get_float("daily", 0.0, lo=0.0),
                drift_per_min=t.get_float("drift_per_min", 0.0),
                stuck_fraction=_frac(t, "stuck_fraction", 0.0),
            )
        )
        t.finish()

    events: list[FaultEvent] = []
    for t in root.get_tables("events"):
        kind = t.get_str("kind", required=True, choices=EVENT_KINDS, what="event kind")
        ev = FaultEvent(
            kind=kind,
            at=_frac(t, "at", 0.0, required=True),
            duration=_frac(t, "duration", 0.0),
            gateway=t.get_int("gateway", -1, lo=-1),
            terminal=t.get_int("terminal", -1, lo=-1),
            error_rate=_frac(t, "error_rate", 0.5),
        )
        if kind == "broker_outage" and (t.present("gateway") or t.present("terminal")):
            t.add("kind", "a broker outage hits every gateway: drop 'gateway' and 'terminal'")
        if kind == "broker_outage" and ev.duration <= 0:
            t.add("duration", "a broker outage needs a duration > 0")
        events.append(ev)
        t.finish()

    typhoon: Typhoon | None = None
    if root.present("typhoon"):
        t = root.get_table("typhoon")
        start = _frac(t, "start", 0.1)
        peak = _frac(t, "peak", 0.5)
        end = _frac(t, "end", 0.9)
        if not start < peak < end:
            t.add("peak", f"need start < peak < end, got {start:g}, {peak:g}, {end:g}")
        raises = []
        for r in t.get_tables("raise", required=True):
            raises.append(
                Raise(
                    r.get_str("point", required=True, nonempty=True),
                    r.get_float("peak", 0.0, required=True),
                )
            )
            r.finish()
        typhoon = Typhoon(
            start=start,
            peak=peak,
            end=end,
            sweep=_frac(t, "sweep", 0.0),
            raises=tuple(raises),
            fail_fraction=_frac(t, "fail_fraction", 0.0),
            seed=t.get_int("seed", 7),
        )
        t.finish()

    rules: list[dict[str, Any]] = []
    for t in root.get_tables("rules"):
        # checked against each gateway's devices when its config is built
        t.known(*t.data)
        rules.append(dict(t.data))
    root.finish()
    problems.raise_if_any()
    return Scenario(
        name=name,
        description=description,
        profiles=tuple(profiles),
        interval_s=interval,
        signals=tuple(signals),
        events=tuple(events),
        typhoon=typhoon,
        rules=tuple(rules),
        source=source,
    )
