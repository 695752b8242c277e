"""Fleet scenarios: shipped files load, broken ones say where, the typhoon's shape."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from protocols.errors import ConfigError
from simulator.fleet import GatewayRun, OutageProxy, TerminalPlan, _gateway_config, _percentiles
from simulator.scenario import (
    Scenario,
    available_scenarios,
    load_scenario,
    parse_scenario,
)


def test_shipped_scenarios_load_and_round_trip() -> None:
    assert {"steady", "faults", "typhoon"} <= set(available_scenarios())
    for name in available_scenarios():
        s = load_scenario(name)
        assert s.name == name
        assert Scenario.from_dict(s.to_dict()).to_dict() == s.to_dict()


def test_typhoon_scenario_shape() -> None:
    s = load_scenario("typhoon")
    ty = s.typhoon
    assert ty is not None
    assert {r.point for r in ty.raises} >= {"rain_intensity", "wind_speed_avg"}
    # nothing before the start, full strength at the peak, and it sweeps east
    assert ty.intensity(0.0, 0, 10) == 0.0
    assert ty.intensity(ty.peak, 0, 10) == pytest.approx(1.0)
    assert ty.intensity(ty.peak, 9, 10) < 0.5
    assert ty.intensity(ty.peak + ty.sweep, 9, 10) == pytest.approx(1.0)
    assert ty.peak_at(9, 10) == pytest.approx(ty.peak + ty.sweep)
    # failures are a deterministic share of the terminals
    fails = [ty.fails(g, t) for g in range(50) for t in range(16)]
    assert fails == [ty.fails(g, t) for g in range(50) for t in range(16)]
    assert 0.05 < sum(fails) / len(fails) < 0.3
    assert {r["id"] for r in s.rules} >= {"heavy-rain", "gale", "terminal-offline"}


def test_signal_model_lookup_prefers_first_match() -> None:
    s = load_scenario("typhoon")
    m = s.signal_for("rain_gauge", "rain_intensity")
    assert m is not None and m.profile == "*" and m.base == 4.0
    assert s.signal_for("rain_gauge", "tip_count") is None


BROKEN = [
    ("no scenario table", {}, [("scenario", "missing required table [scenario]")]),
    (
        "unknown profile",
        {"scenario": {"name": "x", "profiles": ["weather"]}},
        [("scenario.profiles[0]", "unknown profile 'weather'; available: ")],
    ),
    (
        "unknown event kind",
        {"scenario": {"name": "x"}, "events": [{"kind": "meteor", "at": 0.5}]},
        [("events[0].kind", "unknown event kind 'meteor'; expected one of: ")],
    ),
    (
        "time outside the run",
        {"scenario": {"name": "x"}, "events": [{"kind": "terminal_dies", "at": 1.5}]},
        [("events[0].at", "value 1.5 out of range 0.0..1.0")],
    ),
    (
        "outage without duration",
        {"scenario": {"name": "x"}, "events": [{"kind": "broker_outage", "at": 0.5}]},
        [("events[0].duration", "a broker outage needs a duration > 0")],
    ),
    (
        "typhoon out of order",
        {
            "scenario": {"name": "x"},
            "typhoon": {"start": 0.6, "peak": 0.5, "raise": [{"point": "p", "peak": 1.0}]},
        },
        [("typhoon.peak", "need start < peak < end, got 0.6, 0.5, 0.9")],
    ),
]


@pytest.mark.parametrize(("case", "data", "expected"), BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_scenarios(
    case: str, data: dict[str, object], expected: list[tuple[str, str]]
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(data, source="s.toml")
    got = info.value.problems
    assert len(got) == len(expected), got
    for (where, msg), (key, start) in zip(got, expected, strict=True):
        assert where == f"s.toml: {key}"
        assert msg.startswith(start), msg


def test_unknown_scenario_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="typhoon"):
        load_scenario("hurricane")


def test_generated_gateway_config_loads_with_scenario_rules(tmp_path: Path) -> None:
    from agent.ops.config import load_config

    s = load_scenario("typhoon")
    terms = [TerminalPlan(0, i, p, 1000 + i, i) for i, p in enumerate(s.profiles)]
    gw = GatewayRun(0, "fleet-gw-000", tmp_path / "gw", tmp_path / "gw.toml", terms)
    gw.config_path.write_text(_gateway_config(gw, 1883, s, 1.0))
    cfg = load_config(gw.config_path)
    assert [d.name for d in cfg.devices] == [t.device for t in terms]
    rules = {r.id: r for r in cfg.rules}
    assert [t.device for t in rules["heavy-rain"].targets] == [
        "t000-weather-station",
        "t001-rain-gauge",
    ]
    assert len(rules["terminal-offline"].targets) == len(terms)


def test_percentiles() -> None:
    p = _percentiles(list(range(1, 101)))
    assert (p["p50_ms"], p["p99_ms"], p["max_ms"]) == (51.0, 99.0, 100.0)
    assert _percentiles([])["p99_ms"] == 0.0


async def test_outage_proxy_cuts_and_restores() -> None:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(100):
            w.write(data)
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = OutageProxy(server.sockets[0].getsockname()[1])
    await proxy.start()
    r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
    w.write(b"ping")
    assert await r.read(4) == b"ping"
    proxy.cut()
    assert await r.read(4) == b""  # the agent sees the broker go away
    with pytest.raises(OSError):  # and cannot come back while it is down: refused
        await asyncio.open_connection("127.0.0.1", proxy.port)
    await proxy.restore()
    r3, w3 = await asyncio.open_connection("127.0.0.1", proxy.port)
    w3.write(b"pong")
    assert await r3.read(4) == b"pong"
    for writer in (w, w3):
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    await proxy.stop()
    server.close()
    await server.wait_closed()
