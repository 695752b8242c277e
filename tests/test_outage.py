"""Broker outages: Mosquitto stopped for 30 s and started again, twice, mid-run.

The agent keeps polling and spooling while the broker is away, reconnects
(jittered, capped back-off, here capped at 1 s), and drains the backlog while
live batches keep flowing. At the end every polled reading is at the hub and
the spool is empty. The hub keeps a persistent session on a broker with
persistence, so what the agent publishes before the hub is back is queued for
the hub; and a batch leaves the agent's spool only on the hub's signed receipt
(the agent knows the hub key), not on the broker's PUBACK.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ops.config import parse_config
from agent.ops.state import create_identity, save_hub_key
from agent.service import Agent
from drivers.profiles import load_profile
from hub.core import HubCore
from hub.enroll import hub_key_path, load_or_create_hub_key
from hub.stats import hub_stats
from hub.worker import Hub
from simulator.broker import MosquittoBroker, mosquitto_path
from simulator.tcp import TcpTerminal

pytestmark = pytest.mark.mosquitto

OUTAGE_S = float(os.environ.get("VITALS_OUTAGE_S", "30"))
PROFILES = ("sound_level_meter", "weather_station", "gas_detector")


@pytest.fixture
def persist() -> Iterator[Path]:
    """Mosquitto's persistence directory, outside pytest's (root-only) tmp tree."""
    d = Path(tempfile.mkdtemp(prefix="vitals-mq-persist-"))
    d.chmod(0o777)  # mosquitto started as root drops to its own user
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_two_30_s_broker_outages_lose_nothing(tmp_path: Path, persist: Path) -> None:
    if not mosquitto_path():
        pytest.skip("needs the mosquitto binary")
    broker = MosquittoBroker(
        extra_config=f"persistence true\npersistence_location {persist}/\nautosave_interval 1\n"
    )
    await broker.start()
    terms = [TcpTerminal(load_profile(p), seed=i) for i, p in enumerate(PROFILES)]
    for t in terms:
        await t.start()
    cfg = parse_config(
        {
            "gateway": {"id": "gw-outage-1", "state_dir": str(tmp_path / "gw")},
            "uplink": {"host": broker.host, "port": broker.port},
            "batch": {"max_age_s": 0.5, "max_readings": 100},
            "spool": {"durability": "full"},
            "buses": [
                {"name": f"tcp-{i}", "kind": "tcp", "host": "127.0.0.1", "tcp_port": t.port}
                for i, t in enumerate(terms)
            ],
            "devices": [
                {"name": f"dev-{i}", "bus": f"tcp-{i}", "profile": p, "slave": 1, "interval_s": 0.1}
                for i, p in enumerate(PROFILES)
            ],
        },
        source="<outage test>",
        base=tmp_path,
    )
    ident = create_identity(cfg.gateway.state_dir)
    core = HubCore(tmp_path / "hub.sqlite3")
    core.enroll(cfg.gateway.id, ident.public_raw)
    # receipts on: the gateway knows the hub key (as enrollment teaches it) and a batch
    # leaves its spool only on the hub's signed receipt
    hub_key = load_or_create_hub_key(hub_key_path(tmp_path / "hub.sqlite3"))
    save_hub_key(cfg.gateway.state_dir, hub_key.public_key().public_bytes_raw())
    hub = Hub(
        core,
        host=broker.host,
        port=broker.port,
        shared=False,
        persistent=True,
        client_id="hub-outage-test",
        hub_key=hub_key,
    )
    agent = Agent(
        cfg,
        identity=ident,
        uplink_overrides={"backoff_min_s": 0.2, "backoff_max_s": 1.0},
        drain_timeout_s=20.0,
    )
    stop = asyncio.Event()
    depth_at_restart: list[int] = []
    try:
        async with asyncio.TaskGroup() as tg:
            hub_task = tg.create_task(hub.run(), name="hub")
            await asyncio.wait_for(hub.subscribed.wait(), 10)
            run = tg.create_task(agent.run(stop), name="agent")
            await asyncio.wait_for(agent.ready.wait(), 10)
            assert agent.uplink is not None and agent.spool is not None
            await asyncio.sleep(3)
            for _ in range(2):
                await broker.stop()
                await asyncio.sleep(OUTAGE_S)
                depth_at_restart.append(agent.spool.statistics()["depth_batches"])
                await broker.start()
                await asyncio.wait_for(agent.uplink.connected.wait(), 10)
                await asyncio.wait_for(hub.subscribed.wait(), 10)
                # backlog drains while live data flows; wait until it has
                for _ in range(200):
                    if agent.spool.statistics()["depth_batches"] <= 2:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1)
            stop.set()
            await run
            polled = agent.batcher.readings_in if agent.batcher else -1
            for _ in range(200):  # the hub may still be reading what the broker queued
                if core.counters["readings"] >= polled:
                    break
                await asyncio.sleep(0.05)
            hub_task.cancel()
    finally:
        for t in terms:
            await t.stop()
        await broker.stop()
        core.close()
    stats = hub_stats(tmp_path / "hub.sqlite3")
    up = agent.uplink.statistics() if agent.uplink else {}
    sp = agent.spool.statistics() if agent.spool else {}
    print(
        f"\noutage test: 2 x {OUTAGE_S:.0f} s, spool depth at restart {depth_at_restart} batches, "
        f"polled {polled} readings, at the hub {stats['readings']}, duplicates "
        f"{stats['duplicates']}, connects {up.get('connects')}, "
        f"backlog/live batches sent {up.get('backlog_batches_sent')}/{up.get('live_batches_sent')}"
    )
    assert all(d >= 2 * OUTAGE_S for d in depth_at_restart), "the outages must build a backlog"
    assert polled > 0 and stats["readings"] == polled, "readings lost"
    assert sp["depth_batches"] == 0 and sp["dropped_batches"] == 0
    gw = stats["gateways"]["gw-outage-1"]
    assert gw["missing_batches"] == 0 and gw["dropped_batches"] == 0
    assert stats["rejected"] == {}
    assert up["connects"] == 3
    assert up["confirm"] == "receipt" and up["receipts"] > 0 and up["receipts_refused"] == 0
    assert up["live_batches_sent"] > 0 and up["backlog_batches_sent"] > 0
