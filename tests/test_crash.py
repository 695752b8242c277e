"""kill -9 under load, many times: nothing the agent reported as spooled is lost.

The agent runs as a subprocess (``vitals run --config F``) polling emulated
Modbus TCP terminals fast, through a real Mosquitto, to a hub in this process
that signs receipts (the agent knows its key: a batch leaves the spool on the
hub's receipt).
It is killed with SIGKILL at random moments and restarted each time (a quarter
of the runs during start-up, the others at a random moment after their 4th to
24th spooled batch); a last run is stopped with SIGTERM. Every batch the agent logged as spooled
("spooled epoch=E seq=S n=N t0=T", written only after the spool's commit
returned) must be at the hub exactly once, with the same count and first
timestamp, and no batch may be refused (a torn or corrupted batch would fail
its signature).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ops.state import save_hub_key
from drivers.profiles import load_profile
from hub.core import HubCore
from hub.enroll import hub_key_path, load_or_create_hub_key
from hub.stats import hub_stats
from hub.worker import Hub
from simulator.broker import MosquittoBroker
from simulator.tcp import TcpTerminal

pytestmark = pytest.mark.mosquitto

GW = "gw-crash-1"
KILLS = 22
PROFILES = ("sound_level_meter", "weather_station", "gas_detector", "pump_meter")
SPOOLED = re.compile(r"spooled epoch=(\d+) seq=(\d+) n=(\d+) t0=(\d+)")
VITALS = [sys.executable, "-m", "agent"]


def _config(path: Path, state: Path, broker: MosquittoBroker, ports: list[int]) -> None:
    text = f"""
[gateway]
id = "{GW}"
state_dir = "{state}"
[uplink]
host = "{broker.host}"
port = {broker.port}
[batch]
max_readings = 60
max_age_s = 0.2
[spool]
durability = "full"
[log]
level = "debug"
"""
    for i, (profile, port) in enumerate(zip(PROFILES, ports, strict=True)):
        text += f"""
[[buses]]
name = "tcp-{i}"
kind = "tcp"
host = "127.0.0.1"
tcp_port = {port}
timeout_s = 1.0
[[devices]]
name = "dev-{i}"
bus = "tcp-{i}"
profile = "{profile}"
slave = 1
interval_s = 0.05
"""
    path.write_text(text)


def _spooled(logs: list[Path]) -> dict[tuple[int, int], tuple[int, int]]:
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for f in logs:
        for m in SPOOLED.finditer(f.read_text(errors="replace")):
            e, s, n, t0 = map(int, m.groups())
            key = (e, s)
            assert key not in out or out[key] == (n, t0), f"(epoch, seq) {key} reused"
            out[key] = (n, t0)
    return out


async def _start(cfg: Path, log_file: Path) -> asyncio.subprocess.Process:
    with log_file.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            *VITALS, "run", "--config", str(cfg), stdout=subprocess.DEVNULL, stderr=err
        )


async def test_kill_9_at_random_moments_loses_nothing_spooled(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("VITALS_CRASH_SEED", "4")))
    terms = [TcpTerminal(load_profile(p), seed=i) for i, p in enumerate(PROFILES)]
    for t in terms:
        await t.start()
    state = tmp_path / "state"
    cfg = tmp_path / "gateway.toml"
    _config(cfg, state, mosquitto, [t.port for t in terms])
    keygen = await asyncio.to_thread(
        subprocess.run,
        [*VITALS, "keygen", "--state-dir", str(state)],
        capture_output=True,
        text=True,
    )
    assert keygen.returncode == 0, keygen.stderr
    pub = next(ln.split()[-1] for ln in keygen.stdout.splitlines() if ln.startswith("public key"))

    core = HubCore(tmp_path / "hub.sqlite3")
    core.enroll(GW, bytes.fromhex(pub))
    # receipts on: a batch leaves the spool only on the hub's signed receipt
    hub_key = load_or_create_hub_key(hub_key_path(tmp_path / "hub.sqlite3"))
    save_hub_key(state, hub_key.public_key().public_bytes_raw())
    hub = Hub(core, host=mosquitto.host, port=mosquitto.port, shared=False, hub_key=hub_key)
    logs: list[Path] = []
    at_stake = 0  # batches the killed runs had spooled at least
    try:
        async with asyncio.TaskGroup() as tg:
            hub_task = tg.create_task(hub.run(), name="hub")
            await asyncio.wait_for(hub.subscribed.wait(), 10)
            for i in range(KILLS):
                logs.append(tmp_path / f"agent-{i:02d}.log")
                proc = await _start(cfg, logs[-1])
                if rng.random() < 0.25:  # during the interpreter's start and imports
                    await asyncio.sleep(rng.uniform(0.05, 0.5))
                else:  # a random moment in its k-th batch: counted in batches, not
                    # seconds, so a slow machine still puts batches at stake
                    k = rng.randint(4, 24)
                    at_stake += k
                    for _ in range(600):
                        if len(_spooled(logs[-1:])) >= k:
                            break
                        assert proc.returncode is None, logs[-1].read_text()[-3000:]
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError(f"run {i}: not {k} batches spooled within 30 s")
                    await asyncio.sleep(rng.uniform(0.0, 0.2))  # batches of 0.2 s at most
                assert proc.returncode is None, logs[-1].read_text()[-3000:]
                proc.kill()
                assert await proc.wait() == -signal.SIGKILL
            # last run: let it drain, then a graceful stop
            logs.append(tmp_path / "agent-final.log")
            proc = await _start(cfg, logs[-1])
            for _ in range(300):  # until it runs and every killed run's backlog is at the hub
                await asyncio.sleep(0.1)
                if _spooled(logs[-1:]) and set(_spooled(logs[:-1])) <= core.delivered(GW):
                    break
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0, logs[-1].read_text()[-3000:]
            reported = _spooled(logs)
            for _ in range(100):
                if set(reported) <= core.delivered(GW):
                    break
                await asyncio.sleep(0.1)
            hub_task.cancel()
    finally:
        for t in terms:
            await t.stop()
        core.close()

    reported = _spooled(logs)
    stats = hub_stats(tmp_path / "hub.sqlite3")
    con = sqlite3.connect(tmp_path / "hub.sqlite3")
    at_hub = {
        (e, s): (n, t0)
        for e, s, n, t0 in con.execute("SELECT epoch, seq, n, t0 FROM batches WHERE gw = ?", (GW,))
    }
    stored = dict(
        ((e, s), c)
        for e, s, c in con.execute("SELECT epoch, seq, count(*) FROM readings GROUP BY epoch, seq")
    )
    con.close()
    epochs = sorted({e for e, _ in reported})
    print(
        f"\ncrash test: {KILLS} kill -9, {len(epochs)} epochs with batches, "
        f"{len(reported)} batches reported spooled, {len(at_hub)} at the hub, "
        f"{stats['duplicates']} duplicates delivered and dropped "
        f"({stats['duplicate_readings']} readings), rejected {stats['rejected'] or 0}"
    )
    assert len(reported) >= at_stake > 150, "too little at stake to mean anything"
    missing = sorted(set(reported) - set(at_hub))
    assert not missing, f"{len(missing)} spooled batches never reached the hub: {missing[:10]}"
    for key, (n, t0) in reported.items():
        assert at_hub[key] == (n, t0), f"batch {key} differs at the hub"
        assert stored[key] == n, f"batch {key}: {stored[key]} readings stored, not {n}"
    assert stats["rejected"] == {}
    assert stats["gateways"][GW]["dropped_batches"] == 0
    # the final run stopped on SIGTERM and said so
    assert "stopping: sealing the open batch" in logs[-1].read_text()
    # every run confirmed by the hub's receipts, not by the broker's PUBACK
    assert not [f.name for f in logs if "no hub key" in f.read_text(errors="replace")]
    assert "receipt confirmed" in logs[-1].read_text()
