"""The whole signed path, end to end: terminals -> agent -> Mosquitto -> hub.

Every reading the agent polls must arrive at the hub verified, with its point,
timestamp, value and quality intact.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from agent.ops.state import create_identity
from agent.pipeline.batcher import Batcher
from drivers.profiles import load_profile
from hub.core import HubCore
from hub.stats import hub_stats
from hub.worker import Hub
from protocols.reading import Reading
from simulator.broker import MosquittoBroker
from simulator.demo import demo_config
from simulator.harness import agent_with_hub
from simulator.tcp import TcpTerminal

PROFILES = ("sound_level_meter", "weather_station", "gas_detector", "pump_meter")


async def _terminals() -> dict[str, TcpTerminal]:
    terms = {}
    for i, name in enumerate(PROFILES):
        t = TcpTerminal(load_profile(name), seed=i)
        await t.start()
        terms[name] = t
    return terms


def _hub_rows(db: Path) -> Counter[tuple[int, int, object, int]]:
    con = sqlite3.connect(db)
    try:
        return Counter(con.execute("SELECT point, ts, value, quality FROM readings"))
    finally:
        con.close()


async def test_every_polled_reading_arrives_verified(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    polled: list[Reading] = []
    real_add = Batcher.add

    async def tap(self: Batcher, readings: list[Reading]) -> None:
        polled.extend(readings)
        await real_add(self, readings)

    monkeypatch.setattr(Batcher, "add", tap)
    terms = await _terminals()
    # devices named after the demo's, served here by this test's terminals
    names = ("noise-1", "weather-1", "gas-1", "river-1")
    try:
        config = demo_config(
            tmp_path / "gw",
            (mosquitto.host, mosquitto.port),
            {n: t.port for n, t in zip(names, terms.values(), strict=True)},
            max_age_s=0.5,
            durability="full",
        )
        identity = create_identity(config.gateway.state_dir)
        db = tmp_path / "hub.sqlite3"
        async with agent_with_hub(config, identity, mosquitto.host, mosquitto.port, db) as run:
            for _ in range(300):  # a few batches of every terminal at the hub
                await asyncio.sleep(0.05)
                if len(polled) > 150 and run.core.counters["batches"] >= 3:
                    break
    finally:
        for t in terms.values():
            await t.stop()
    run.core.close()
    agent = run.agent

    assert len(polled) == run.polled > 100, "the agent polled almost nothing"
    assert agent.spool is not None and agent.spool.statistics()["depth_batches"] == 0
    sent = Counter((r.point, r.ts, r.value, int(r.quality)) for r in polled)
    got = _hub_rows(tmp_path / "hub.sqlite3")
    assert got == sent
    # values really moved and kept their types: floats stay floats, ints ints
    assert any(isinstance(v, float) for (_, _, v, _) in got)
    assert any(isinstance(v, int) and not isinstance(v, bool) for (_, _, v, _) in got)
    stats = hub_stats(tmp_path / "hub.sqlite3")
    assert stats["rejected"] == {}
    assert stats["duplicates"] == 0
    epochs = stats["gateways"][config.gateway.id]["epochs"]
    assert all(e["missing"] == [] for e in epochs.values())
    # the hub could name every point from the signed point table
    con = sqlite3.connect(tmp_path / "hub.sqlite3")
    named = {row[0] for row in con.execute("SELECT id FROM points")}
    con.close()
    assert {p for (p, _, _, _) in got} <= named


async def test_vitals_run_subprocess_stops_cleanly_on_sigterm(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """`vitals run --config F` as an installer starts it; SIGTERM flushes and exits 0."""
    term = TcpTerminal(load_profile("sound_level_meter"))
    await term.start()
    state = tmp_path / "state"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f"""
[gateway]
id = "gw-e2e-1"
state_dir = "{state}"
[uplink]
host = "{mosquitto.host}"
port = {mosquitto.port}
[batch]
max_age_s = 0.5
[[buses]]
name = "tcp-1"
kind = "tcp"
host = "127.0.0.1"
tcp_port = {term.port}
[[devices]]
name = "noise-1"
bus = "tcp-1"
profile = "sound_level_meter"
slave = 1
interval_s = 0.2
"""
    )
    vitals = [sys.executable, "-m", "agent"]
    keygen = await asyncio.to_thread(
        subprocess.run,
        [*vitals, "keygen", "--state-dir", str(state)],
        capture_output=True,
        text=True,
    )
    assert keygen.returncode == 0, keygen.stderr
    pub = next(
        line.split()[-1] for line in keygen.stdout.splitlines() if line.startswith("public key")
    )
    assert os.stat(state / "identity.key").st_mode & 0o777 == 0o600

    core = HubCore(tmp_path / "hub.sqlite3")
    core.enroll("gw-e2e-1", bytes.fromhex(pub))
    hub = Hub(core, host=mosquitto.host, port=mosquitto.port)
    hub_task = asyncio.create_task(hub.run())
    try:
        await asyncio.wait_for(hub.subscribed.wait(), 10)
        proc = await asyncio.create_subprocess_exec(
            *vitals, "run", "--config", str(cfg), stderr=asyncio.subprocess.PIPE
        )
        for _ in range(600):  # until its batches reach the hub: running, its handlers set
            if core.counters["readings"] > 20 and core.counters["batches"] >= 2:
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert "stay in the spool" not in err.decode()
        for _ in range(100):  # the broker has them all; give the hub a moment
            if core.counters["batches"] >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        hub_task.cancel()
        await term.stop()
    assert core.counters["readings"] > 20
    assert core.counters["batches"] >= 2
    assert sum(v for k, v in core.counters.items() if k.startswith("rejected.")) == 0
    core.close()


async def test_edge_events_reach_the_hub_signed_ahead_of_the_batches(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """A rule that fires on the first reading: its signed event is verified and stored."""
    term = TcpTerminal(load_profile("sound_level_meter"))
    await term.start()
    rules = [
        {
            "id": "always-loud",
            "kind": "threshold",
            "device": "noise-1",
            "point": "laeq",
            "above": 0.0,
        },
        {"id": "never", "kind": "threshold", "device": "noise-1", "point": "laeq", "above": 1000.0},
    ]
    try:
        config = demo_config(
            tmp_path / "gw",
            (mosquitto.host, mosquitto.port),
            {"noise-1": term.port},
            max_age_s=30.0,  # the batch waits: the event must not
            rules=rules,
        )
        identity = create_identity(config.gateway.state_dir)
        db = tmp_path / "hub.sqlite3"
        async with agent_with_hub(config, identity, mosquitto.host, mosquitto.port, db) as run:
            for _ in range(200):
                if run.core.counters["events"]:
                    break
                await asyncio.sleep(0.05)
            batches_when_event_arrived = run.core.counters["batches"]
    finally:
        await term.stop()
    rows = run.core.db.execute("SELECT rule, state, device, point, value FROM events").fetchall()
    run.core.close()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("always-loud", "fired", "noise-1", "laeq")]
    assert isinstance(rows[0][4], float) and rows[0][4] > 0
    assert batches_when_event_arrived == 0, "the event waited for a batch"
