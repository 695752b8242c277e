"""``vitals health``: healthy (0), degraded (1), failed (2), against a real ``vitals run``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.ops.health import DEGRADED, FAILED, HEALTHY, assess, verdict
from agent.ops.state import create_identity
from drivers.profiles import load_profile
from simulator.broker import MosquittoBroker
from simulator.tcp import TcpTerminal

VITALS = [sys.executable, "-m", "agent"]


def _doc(*states: str, connected: bool = True) -> dict[str, Any]:
    devices = {
        f"d{i}": {"state": s, "polls": 0 if s == "unknown" else 3, "last_error": f"why {i}"}
        for i, s in enumerate(states)
    }
    return {"pid": 1, "buses": {"b": {"devices": devices}}, "uplink": {"connected": connected}}


@pytest.mark.parametrize(
    ("doc", "why", "level"),
    [
        (_doc("online", "online"), "", HEALTHY),
        (_doc("online", "offline"), "", DEGRADED),
        (_doc("online", "degraded"), "", DEGRADED),
        (_doc("online", connected=False), "", DEGRADED),
        (_doc("online", "unknown"), "", FAILED),
        (_doc("offline", "offline"), "", FAILED),
        (_doc("online"), "the agent stopped", FAILED),
    ],
)
def test_verdicts(doc: dict[str, Any], why: str, level: int) -> None:
    assert verdict(assess(doc, why)) == level


def test_an_offline_device_says_why() -> None:
    checks = assess(_doc("online", "offline"))
    assert any(c.name == "device d1" and "why 1" in c.detail for c in checks)


def test_require_uplink_makes_a_down_uplink_a_failure() -> None:
    assert verdict(assess(_doc("online", connected=False), require_uplink=True)) == FAILED


def test_no_status_file_is_failed(tmp_path: Path) -> None:
    r = subprocess.run(
        [*VITALS, "health", "--status-file", str(tmp_path / "none.json"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    out = json.loads(r.stdout)
    assert out["health"] == "failed" and "no status file" in out["checks"][0]["detail"]


async def _health(status: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    r = await asyncio.to_thread(
        subprocess.run,
        [*VITALS, "health", "--status-file", str(status), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.returncode, json.loads(r.stdout)


@pytest.mark.mosquitto
async def test_three_outcomes_of_a_real_agent(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    terms = [TcpTerminal(load_profile("sound_level_meter"), seed=i) for i in range(2)]
    for t in terms:
        await t.start()
    state, run = tmp_path / "state", tmp_path / "run"
    cfg = tmp_path / "gateway.toml"
    devices = "".join(
        f'[[buses]]\nname = "lan{i}"\nkind = "tcp"\nhost = "127.0.0.1"\ntcp_port = {t.port}\n'
        f"timeout_s = 0.3\n"
        f'[[devices]]\nname = "noise-{i}"\nbus = "lan{i}"\nprofile = "sound_level_meter"\n'
        "slave = 1\ninterval_s = 0.2\n"
        for i, t in enumerate(terms)
    )
    cfg.write_text(
        f'[gateway]\nid = "gw-health"\nstate_dir = "{state}"\n'
        f'[uplink]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n' + devices
    )
    create_identity(state)
    env = {**os.environ, "RUNTIME_DIRECTORY": str(run)}
    proc = await asyncio.create_subprocess_exec(
        *VITALS, "run", "--config", str(cfg), env=env, stderr=asyncio.subprocess.DEVNULL
    )
    status = run / "status.json"
    try:
        # healthy: both terminals answer, the uplink is connected
        code, out = await _health(status, "--wait", "60")
        assert code == 0, out
        assert out["health"] == "healthy"
        assert {c["name"] for c in out["checks"]} >= {"agent", "uplink", "device noise-0"}

        # degraded: one terminal stops answering (offline, with the reason)
        await terms[1].stop()
        for _ in range(60):
            code, out = await _health(status)
            if code == 1 and any(
                c["name"] == "device noise-1" and "offline" in c["detail"] for c in out["checks"]
            ):
                break
            await asyncio.sleep(0.5)
        assert code == 1, out
        assert out["health"] == "degraded"
        dev = next(c for c in out["checks"] if c["name"] == "device noise-1")
        assert dev["level"] == "degraded" and "offline on lan1:" in dev["detail"]

        # failed: the agent is stopped
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        code, out = await _health(status)
        assert code == 2 and out["health"] == "failed"
        assert "the agent stopped" in out["checks"][0]["detail"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for t in terms:
            await t.stop()
