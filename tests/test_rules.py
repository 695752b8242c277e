"""Edge-event rules: config validation, each rule kind on scripted readings, cost index."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest

from agent.edge.rules import EdgeEvents, RuleEngine
from agent.ops.config import load_config, parse_config
from protocols.ed25519 import PrivateKey
from protocols.errors import ConfigError
from protocols.event import Event, parse_event
from protocols.reading import Columns, Quality, Reading
from tests.virtual_time import VirtualClock

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
T0 = 1_767_225_600_000  # 2026-01-01 00:00:00 UTC
S = 1000


class FakeClock:
    """A wall clock the test sets (the rule engine reads it; nothing here sleeps on it)."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.ms / 1000


BASE = {
    "gateway": {"id": "gw-0001"},
    "buses": [{"name": "lan", "kind": "tcp", "host": "10.0.0.5"}],
    "devices": [
        {"name": "noise-1", "bus": "lan", "profile": "sound_level_meter", "slave": 1},
        {"name": "river-1", "bus": "lan", "profile": "radar_water_level", "slave": 2},
        {"name": "weather-1", "bus": "lan", "profile": "weather_station", "slave": 3},
        {"name": "weather-2", "bus": "lan", "profile": "weather_station", "slave": 4},
        {"name": "gas-1", "bus": "lan", "profile": "gas_detector", "slave": 5},
    ],
}


def config(*rules: dict[str, object]):  # type: ignore[no-untyped-def]
    return parse_config({**BASE, "rules": list(rules)}, source="gw.toml", base=Path("."))


def engine(*rules: dict[str, object], clock: FakeClock | None = None) -> tuple[RuleEngine, dict]:  # type: ignore[type-arg]
    cfg = config(*rules)
    return RuleEngine(cfg.rules, clock=clock or FakeClock()), dict(cfg.point_ids)


def run(eng: RuleEngine, pid: int, series: list[tuple[int, object]]) -> list[Event]:
    out: list[Event] = []
    for t, v in series:
        q = Quality.COMM_ERROR if v is None else Quality.GOOD
        out.extend(eng.feed(Reading(pid, T0 + t, v, q)) or [])  # type: ignore[arg-type]
    return out


def states(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.state, (e.ts - T0) // S) for e in events]


# -- threshold ---------------------------------------------------------------------


def test_threshold_with_hysteresis() -> None:
    eng, ids = engine(
        {
            "id": "gas",
            "kind": "threshold",
            "device": "gas-1",
            "point": "co",
            "above": 35,
            "clear": 30,
        }
    )
    pid = ids[("gas-1", "co")]
    ev = run(eng, pid, [(0, 10.0), (1 * S, 36.0), (2 * S, 33.0), (3 * S, 37.0), (4 * S, 29.9)])
    assert states(ev) == [("fired", 1), ("cleared", 4)]  # 33 and 37 are inside the band
    assert ev[0].value == 36.0 and ev[0].device == "gas-1" and ev[0].point == "co"
    assert ev[0].kind == "threshold" and ev[0].rule == "gas" and ev[0].pid == pid
    assert eng.statistics()["fired"] == 1 and eng.statistics()["cleared"] == 1


def test_threshold_below() -> None:
    eng, ids = engine(
        {"id": "low", "kind": "threshold", "device": "river-1", "point": "level", "below": 0.5}
    )
    ev = run(eng, ids[("river-1", "level")], [(0, 1.0), (S, 0.4), (2 * S, 0.6)])
    assert states(ev) == [("fired", 1), ("cleared", 2)]


def test_threshold_minimum_duration() -> None:
    eng, ids = engine(
        {
            "id": "loud",
            "kind": "threshold",
            "device": "noise-1",
            "point": "laeq",
            "above": 55,
            "for_s": 300,
        }
    )
    pid = ids[("noise-1", "laeq")]
    # loud for 200 s, a quiet second resets, then loud for 300 s
    series = [(t * S, 60.0) for t in range(0, 200)] + [(200 * S, 50.0)]
    series += [(t * S, 60.0) for t in range(201, 502)]
    ev = run(eng, pid, series)
    assert states(ev) == [("fired", 501)]
    assert ev[0].since == T0 + 201 * S


def test_comm_errors_neither_fire_nor_reset() -> None:
    eng, ids = engine(
        {
            "id": "loud",
            "kind": "threshold",
            "device": "noise-1",
            "point": "laeq",
            "above": 55,
            "for_s": 10,
        }
    )
    ev = run(eng, ids[("noise-1", "laeq")], [(0, 60.0), (5 * S, None), (10 * S, 61.0)])
    assert states(ev) == [("fired", 10)]


def test_night_window_in_local_time() -> None:
    # Hong Kong is UTC+8: 22:00 local is 14:00 UTC
    eng, ids = engine(
        {
            "id": "night",
            "kind": "threshold",
            "device": "noise-1",
            "point": "laeq",
            "above": 55,
            "window": "22:00-07:00",
            "timezone": "Asia/Hong_Kong",
        }
    )
    pid = ids[("noise-1", "laeq")]
    h = 3600 * S
    ev = run(eng, pid, [(13 * h, 70.0), (14 * h, 70.0), (22 * h, 70.0), (23 * h, 70.0)])
    # 21:00 local: outside; 22:00: fires; 06:00: still; 07:00 local: window ends -> cleared
    assert states(ev) == [("fired", 14 * 3600), ("cleared", 23 * 3600)]
    assert ev[1].detail == "time window ended"


def test_window_without_wrap() -> None:
    eng, ids = engine(
        {
            "id": "day",
            "kind": "threshold",
            "device": "noise-1",
            "point": "laeq",
            "above": 55,
            "window": "08:00-09:00",
            "timezone": "UTC",
        }
    )
    h = 3600 * S
    ev = run(eng, ids[("noise-1", "laeq")], [(7 * h, 70.0), (8 * h + 1, 70.0), (9 * h, 70.0)])
    assert states(ev) == [("fired", 8 * 3600), ("cleared", 9 * 3600)]


def test_bool_alarm_bit_as_threshold() -> None:
    eng, ids = engine(
        {
            "id": "co-alarm",
            "kind": "threshold",
            "device": "gas-1",
            "point": "co_alarm",
            "above": 0.5,
        }
    )
    ev = run(eng, ids[("gas-1", "co_alarm")], [(0, False), (S, True), (2 * S, False)])
    assert states(ev) == [("fired", 1), ("cleared", 2)]
    assert ev[0].value is True


# -- rate ----------------------------------------------------------------------------


def test_rate_of_rise_within_window() -> None:
    eng, ids = engine(
        {
            "id": "river",
            "kind": "rate",
            "device": "river-1",
            "point": "level",
            "rise": 0.10,
            "within_s": 600,
        }
    )
    pid = ids[("river-1", "level")]
    # slow rise: 0.9 cm per minute for 20 min: 9 cm in any 10 min, never 10
    slow = [(m * 60 * S, 1.0 + 0.009 * m) for m in range(21)]
    assert run(eng, pid, slow) == []
    # then fast: 3 cm per minute
    fast = [((20 + m) * 60 * S, 1.18 + 0.03 * m) for m in range(1, 6)]
    ev = run(eng, pid, fast)
    assert states(ev) == [("fired", 21 * 60)]  # 1.21 m vs 1.099 m ten minutes before
    assert "rose" in ev[0].detail
    # it levels off: once the last 10 min rose less than rise/2 (the default clear), cleared
    flat = [((25 + m) * 60 * S, 1.33) for m in range(1, 12)]
    ev = run(eng, pid, flat)
    assert [e.state for e in ev] == ["cleared"]


def test_rate_of_fall() -> None:
    eng, ids = engine(
        {
            "id": "drop",
            "kind": "rate",
            "device": "river-1",
            "point": "level",
            "fall": 0.5,
            "within_s": 60,
            "clear": 0.1,
        }
    )
    ev = run(eng, ids[("river-1", "level")], [(0, 3.0), (10 * S, 2.4), (80 * S, 2.4)])
    assert states(ev) == [("fired", 10), ("cleared", 80)]


# -- stuck and offline -------------------------------------------------------------


def test_stuck_value() -> None:
    eng, ids = engine(
        {
            "id": "stuck",
            "kind": "stuck",
            "device": "weather-1",
            "point": "air_temperature",
            "for_s": 60,
            "tolerance": 0.05,
        }
    )
    pid = ids[("weather-1", "air_temperature")]
    series = [(t * 10 * S, 21.0 + (0.01 if t % 2 else 0)) for t in range(8)] + [(80 * S, 22.0)]
    ev = run(eng, pid, series)
    assert states(ev) == [("fired", 60), ("cleared", 80)]


def test_offline_on_tick_and_clear_on_good_reading() -> None:
    clock = FakeClock()
    eng, ids = engine(
        {"id": "wx-offline", "kind": "offline", "device": "weather-*", "after_s": 30}, clock=clock
    )
    p1, p2 = ids[("weather-1", "wind_speed_avg")], ids[("weather-2", "wind_speed_avg")]
    clock.ms = T0 + 20 * S
    assert run(eng, p1, [(20 * S, 5.0)]) == []
    assert run(eng, p2, [(20 * S, None)]) == []  # a comm error is not a sign of life
    clock.ms = T0 + 31 * S
    ev = eng.tick()
    assert [(e.device, e.state, e.point, e.pid) for e in ev] == [("weather-2", "fired", "", -1)]
    assert ev[0].since == T0  # never answered since start
    assert eng.tick() == []  # fires once
    clock.ms = T0 + 51 * S
    assert [e.device for e in eng.tick()] == ["weather-1"]
    ev = run(eng, p2, [(52 * S, 4.0)])
    assert states(ev) == [("cleared", 52)] and ev[0].device == "weather-2"
    assert eng.active() == [("wx-offline", "weather-1", "")]


def test_readings_without_rules_cost_one_lookup() -> None:
    eng, ids = engine(
        {"id": "gas", "kind": "threshold", "device": "gas-1", "point": "co", "above": 35}
    )
    assert eng.watched_points == frozenset({ids[("gas-1", "co")]})
    assert eng.feed(Reading(ids[("noise-1", "laeq")], T0, 99.0)) is None
    assert eng.statistics()["readings_evaluated"] == 0
    assert eng.feed_many([Reading(ids[("gas-1", "co")], T0, 40.0)])[0].state == "fired"
    assert eng.statistics()["readings_evaluated"] == 1


def test_columns_from_a_bus_feed_only_the_watched_points() -> None:
    eng, ids = engine(
        {"id": "gas", "kind": "threshold", "device": "gas-1", "point": "co", "above": 35}
    )
    cols = Columns()  # one poll of each device, as the pollers hand them on
    cols.add([ids[("noise-1", "laeq")]], T0, [99.0], [Quality.GOOD])
    cols.add([ids[("gas-1", "co")]], T0 + 1, [40.0], [Quality.GOOD])
    (event,) = eng.feed_many(cols)
    assert (event.state, event.ts) == ("fired", T0 + 1)
    assert eng.statistics()["readings_evaluated"] == 1


def test_globs_expand_to_every_matching_device() -> None:
    cfg = config(
        {
            "id": "gust",
            "kind": "threshold",
            "device": "weather-*",
            "point": "wind_speed_max",
            "above": 25,
        }
    )
    assert [t.device for t in cfg.rules[0].targets] == ["weather-1", "weather-2"]
    assert cfg.to_dict()["rules"][0]["targets"] == [
        "weather-1.wind_speed_max",
        "weather-2.wind_speed_max",
    ]


# -- the shipped examples ----------------------------------------------------------


def test_shipped_example_rules() -> None:
    cfg = load_config(EXAMPLES / "gateway-full.toml")
    by_id = {r.id: r for r in cfg.rules}
    assert {"night-noise", "heavy-rain", "river-rising", "gas-alarm"} <= set(by_id)
    night = by_id["night-noise"]
    assert (night.above, night.for_s, night.window) == (55.0, 300.0, (22 * 60, 7 * 60))
    assert by_id["heavy-rain"].above == 50.0
    river = by_id["river-rising"]
    assert (river.rise, river.within_s) == (0.10, 600.0)
    eng = RuleEngine(cfg.rules, clock=FakeClock())
    assert len(eng.states) == sum(len(r.targets) for r in cfg.rules)


# -- the agent side ----------------------------------------------------------------


@pytest.mark.virtual_time
async def test_edge_events_seal_in_order_and_tick(virtual_clock: VirtualClock) -> None:
    key = PrivateKey.generate()
    clock = virtual_clock
    start = clock.now_ms()
    cfg = config(
        {"id": "gas", "kind": "threshold", "device": "gas-1", "point": "co", "above": 35},
        {"id": "off", "kind": "offline", "device": "noise-1", "after_s": 2},
    )
    seen: list[Event] = []
    edge = EdgeEvents(cfg.rules, gateway="gw-0001", key=key, epoch=4, clock=clock, max_outbox=2)
    edge.on_event = seen.append
    pid = cfg.point_ids[("gas-1", "co")]
    edge.observe([Reading(pid, T0, 40.0), Reading(pid, T0 + S, 20.0)])
    assert list(edge.outbox) == [(4, 0), (4, 1)]
    sealed = parse_event(edge.outbox[(4, 0)])
    sealed.verify(key.public_key())
    assert (sealed.header.epoch, sealed.header.seq) == (4, 0)
    assert sealed.event().state == "fired" and edge.has_events.is_set()
    ticks = asyncio.create_task(edge.run_ticks(1.0))
    await asyncio.sleep(1.5)  # one tick: noise-1 silent for 1 s of its 2
    assert [e.rule for e in seen] == ["gas", "gas"]
    await asyncio.sleep(1.0)  # the second tick, 2 s after the start: offline
    ticks.cancel()
    assert [e.rule for e in seen] == ["gas", "gas", "off"]
    assert seen[-1].ts == start + 2 * S and seen[-1].since == start
    # the offline event pushed the oldest one out of the bounded outbox
    assert list(edge.outbox) == [(4, 1), (4, 2)]
    assert edge.statistics()["dropped"] == 1


# -- config validation -------------------------------------------------------------

R = {"id": "r1", "kind": "threshold", "device": "noise-1", "point": "laeq", "above": 55}

BROKEN_RULES: list[tuple[str, dict[str, object], list[tuple[str, str]]]] = [
    (
        "missing id",
        {k: v for k, v in R.items() if k != "id"},
        [("rules[0].id", "missing required key")],
    ),
    (
        "unknown kind",
        {**R, "kind": "treshold"},
        [
            (
                "rules[0].kind",
                "unknown rule kind 'treshold' (did you mean 'threshold'?); "
                "expected one of: threshold, rate, stuck, offline",
            )
        ],
    ),
    (
        "unknown device",
        {**R, "device": "noise-2"},
        [
            (
                "rules[0].device",
                "no device named 'noise-2' (did you mean 'noise-1'?); "
                "devices: noise-1, river-1, weather-1, weather-2, gas-1",
            )
        ],
    ),
    (
        "glob matches nothing",
        {**R, "device": "pm-*"},
        [("rules[0].device", "pattern 'pm-*' matches no enabled device")],
    ),
    (
        "unknown point",
        {**R, "point": "leq"},
        [
            (
                "rules[0].point",
                "device 'noise-1' (sound_level_meter) has no point 'leq' (did you mean 'laeq'?)",
            )
        ],
    ),
    (
        "no level",
        {k: v for k, v in R.items() if k != "above"},
        [("rules[0]", "a threshold rule needs 'above' or 'below'")],
    ),
    (
        "both levels",
        {**R, "below": 20},
        [("rules[0].below", "set 'above' or 'below', not both (use two rules for a band)")],
    ),
    (
        "clear on the wrong side",
        {**R, "clear": 60},
        [
            (
                "rules[0].clear",
                "value 60 must be at most above (55): it is the level the value falls back to",
            )
        ],
    ),
    (
        "key of another kind",
        {**R, "within_s": 60},
        [("rules[0].within_s", "'within_s' does not apply to a 'threshold' rule (only to rate)")],
    ),
    (
        "bad window",
        {**R, "window": "22h-7h"},
        [
            (
                "rules[0].window",
                "invalid value '22h-7h': use HH:MM-HH:MM in local time, e.g. '22:00-07:00'",
            )
        ],
    ),
    (
        "unknown timezone",
        {**R, "window": "22:00-07:00", "timezone": "Mars/Olympus"},
        [
            (
                "rules[0].timezone",
                "unknown time zone 'Mars/Olympus': use an IANA name like 'Asia/Hong_Kong'",
            )
        ],
    ),
    (
        "negative duration",
        {**R, "for_s": -1},
        [("rules[0].for_s", "value -1 out of range 0.0..86400.0")],
    ),
    (
        "rate without window",
        {"id": "r", "kind": "rate", "device": "river-1", "point": "level", "rise": 0.1},
        [("rules[0].within_s", "missing required key")],
    ),
    (
        "offline with a point",
        {"id": "o", "kind": "offline", "device": "river-1", "point": "level", "after_s": 60},
        [("rules[0].point", "an 'offline' rule watches a whole device: drop 'point'")],
    ),
    ("unknown key", {**R, "abvoe": 3}, [("rules[0].abvoe", "unknown key (did you mean 'above'?)")]),
]


@pytest.mark.parametrize(
    ("case", "rule", "expected"), BROKEN_RULES, ids=[c[0] for c in BROKEN_RULES]
)
def test_broken_rules_report_precise_problem(
    case: str, rule: dict[str, object], expected: list[tuple[str, str]]
) -> None:
    with pytest.raises(ConfigError) as info:
        config(rule)
    assert info.value.problems == [(f"gw.toml: {k}", m) for k, m in expected], case


def test_duplicate_rule_id() -> None:
    with pytest.raises(ConfigError) as info:
        config(R, R)
    assert info.value.problems == [
        ("gw.toml: rules[1].id", "duplicate rule id 'r1' (also rules[0])")
    ]


def test_local_minutes_follow_dst() -> None:
    from agent.edge.rules import _LocalMinutes

    berlin = _LocalMinutes("Europe/Berlin")
    summer = int(datetime.datetime(2026, 7, 1, 12, 0, tzinfo=datetime.UTC).timestamp() * 1000)
    winter = int(datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC).timestamp() * 1000)
    assert berlin(summer) == 14 * 60
    assert berlin(winter) == 13 * 60
