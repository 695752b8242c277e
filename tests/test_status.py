"""The status file: written by the running agent, read by ``vitals status``."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from agent.cli.main import app
from agent.ops.status import StatusWriter, build_status, read_status, summary

runner = CliRunner()


def _fake_agent(state_dir: Path) -> Any:
    stats = {
        "gateway": "gw-7",
        "epoch": 4,
        "uptime_s": 3725.0,
        "batch": {"readings_in": 900, "batches_sealed": 9},
        "spool": {"depth_batches": 2, "depth_bytes": 4096, "dropped_batches": 0},
        "uplink": {
            "connected": True,
            "batches_acked": 7,
            "readings_acked": 700,
            "last_acked": [4, 7],
            "last_error": "",
        },
        "buses": {
            "rs485-1": {
                "transactions": 120,
                "timeouts": 3,
                "overruns": 0,
                "readings": 900,
                "devices": {
                    "noise-1": {
                        "state": "online",
                        "polls": 60,
                        "polls_failed": 0,
                        "last_error": "",
                        "rtt_ms": 12.5,
                    },
                    "rain-2": {
                        "state": "offline",
                        "polls": 60,
                        "polls_failed": 60,
                        "last_error": "rtu:///dev/ttyUSB0: no response from slave 2",
                        "rtt_ms": 0.0,
                    },
                },
            }
        },
    }
    cfg = SimpleNamespace(
        source=Path("/etc/vitals/gateway.toml"), gateway=SimpleNamespace(state_dir=state_dir)
    )
    return SimpleNamespace(statistics=lambda: stats, config=cfg)


async def test_writer_replaces_the_file_atomically_and_marks_stop(tmp_path: Path) -> None:
    agent = _fake_agent(tmp_path)
    lines: list[str] = []
    three = asyncio.Event()

    def on_write(d: dict[str, Any]) -> None:
        lines.append(summary(d))
        if len(lines) >= 3:
            three.set()

    w = StatusWriter(agent, tmp_path / "status.json", interval_s=0.01, on_write=on_write)
    task = asyncio.create_task(w.run())
    await three.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    doc = json.loads((tmp_path / "status.json").read_text())
    assert doc["state"] == "stopped"
    assert doc["gateway"] == "gw-7" and doc["pid"] == os.getpid()
    assert doc["spool"]["depth_batches"] == 2 and doc["spool"]["oldest_age_s"] is None
    assert lines[0] == "1/2 devices online, spool 2 batches, uplink up"
    # no temporary file left behind
    assert os.listdir(tmp_path) == ["status.json"]


def test_cli_renders_buses_devices_spool_uplink(tmp_path: Path) -> None:
    doc = build_status(_fake_agent(tmp_path))
    (tmp_path / "status.json").write_text(json.dumps(doc))
    r = runner.invoke(
        app, ["status", "--status-file", str(tmp_path / "status.json")], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    assert "gateway gw-7  running" in r.output
    assert "last acked epoch 4 seq 7" in r.output
    assert "spool   2 batches, 4096 bytes" in r.output
    row = next(line for line in r.output.splitlines() if "rain-2" in line)
    assert "offline" in row and "rtu:///dev/ttyUSB0: no response from slave 2" in row
    assert "bus rs485-1: online, 120 transactions, 3 timeouts" in r.output


def test_cli_shows_a_bus_down_and_a_full_disk_with_their_reasons(tmp_path: Path) -> None:
    doc = build_status(_fake_agent(tmp_path))
    doc["buses"]["rs485-1"].update(
        state="offline", last_error="port lost: [Errno 5] input/output error", link_downs=2
    )
    doc["spool"].update(
        disk_full=1, dropped_batches=3, dropped_disk_full=3, disk_bytes=900_000, max_bytes=10**6
    )
    (tmp_path / "status.json").write_text(json.dumps(doc))
    r = runner.invoke(
        app, ["status", "--status-file", str(tmp_path / "status.json")], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    assert "bus rs485-1: offline" in r.output and "2 times down" in r.output
    assert "port lost: [Errno 5] input/output error" in r.output  # not eaten as markup
    assert "900000 of 1000000 bytes on disk" in r.output
    assert "dropped 3 (3 disk full)" in r.output and "DISK FULL" in r.output


def test_cli_shows_firmware_updates_in_progress_and_done(tmp_path: Path) -> None:
    from agent.ops.fwupdate import Outcome
    from protocols.fwimage import version_text

    doc = build_status(_fake_agent(tmp_path))
    failed = Outcome(False, "the terminal rolled back: the image crashed at boot", 0x10200, 0x10200)
    doc["firmware"] = {
        "noise-1": {"state": "sending", "image": "1.3.0", "held": 12000, "size": 48000},
        "rain-2": {"state": "done", "image": "1.3.0", **failed.as_dict()},
    }
    (tmp_path / "status.json").write_text(json.dumps(doc))
    r = runner.invoke(
        app, ["status", "--status-file", str(tmp_path / "status.json")], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    assert "firmware noise-1: sending 1.3.0: 12000 of 48000 bytes (25 %)" in r.output
    line = next(x for x in r.output.splitlines() if x.startswith("firmware rain-2"))
    assert "failed to 1.3.0" in line and "crashed at boot" in line
    assert f"now {version_text(0x10200)}" in line


def test_cli_json(tmp_path: Path) -> None:
    doc = build_status(_fake_agent(tmp_path))
    (tmp_path / "status.json").write_text(json.dumps(doc))
    r = runner.invoke(app, ["status", "--status-file", str(tmp_path / "status.json"), "--json"])
    assert r.exit_code == 0
    out = json.loads(r.output)
    assert out["running"] is True
    assert out["buses"]["rs485-1"]["devices"]["noise-1"]["state"] == "online"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"state": "stopped"}, "the agent stopped"),
        ({"pid": 2**22 + 12345}, "is gone"),
        ({"written_at": time.time() - 60}, "the agent is hung"),
    ],
)
def test_stale_status_says_why_and_exits_1(
    tmp_path: Path, change: dict[str, Any], why: str
) -> None:
    doc = {**build_status(_fake_agent(tmp_path)), **change}
    (tmp_path / "status.json").write_text(json.dumps(doc))
    _, _, got = read_status([tmp_path / "status.json"])
    assert why in got
    r = runner.invoke(app, ["status", "--status-file", str(tmp_path / "status.json")])
    assert r.exit_code == 1
    assert "not running" in r.output


def test_no_status_file_is_one_line_and_a_hint(tmp_path: Path) -> None:
    r = runner.invoke(app, ["status", "--status-file", str(tmp_path / "nope.json")])
    assert r.exit_code == 1
    assert "no status file" in r.output and "systemctl status vitals" in r.output
    assert "Traceback" not in r.output


def test_oldest_spool_age_from_the_database(tmp_path: Path) -> None:
    import sqlite3

    from agent.ops.status import spool_oldest_age_s

    db = tmp_path / "spool.sqlite3"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE batches (id INTEGER PRIMARY KEY, created REAL NOT NULL)")
    con.executemany("INSERT INTO batches (created) VALUES (?)", [(1000.0,), (1500.0,)])
    con.commit()
    con.close()
    assert spool_oldest_age_s(db, now=1600.0) == pytest.approx(600.0)
    assert spool_oldest_age_s(tmp_path / "missing.sqlite3") is None


async def test_with_the_real_agent(tmp_path: Path) -> None:
    """The writer beside a real Agent polling an emulated TCP terminal."""
    from agent.ops.config import load_config
    from agent.ops.state import create_identity
    from agent.service import Agent
    from drivers.profiles import load_profile
    from simulator.broker import free_port
    from simulator.tcp import TcpTerminal

    term = TcpTerminal(load_profile("sound_level_meter"))
    await term.start()
    cfg_file = tmp_path / "gw.toml"
    cfg_file.write_text(
        f'[gateway]\nid = "gw-status"\nstate_dir = "{tmp_path / "state"}"\n'
        f"[uplink]\nport = {free_port()}\n"  # no broker: the uplink keeps retrying
        f'[[buses]]\nname = "lan"\nkind = "tcp"\nhost = "127.0.0.1"\ntcp_port = {term.port}\n'
        '[[devices]]\nname = "noise-1"\nbus = "lan"\nprofile = "sound_level_meter"\nslave = 1\n'
        "interval_s = 0.1\n"
    )
    cfg = load_config(cfg_file)
    create_identity(cfg.gateway.state_dir)
    agent = Agent(cfg, drain_timeout_s=0.1)
    stop = asyncio.Event()
    path = tmp_path / "run" / "status.json"
    writer = StatusWriter(agent, path, interval_s=0.05)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(agent.run(stop), name="agent")
            await agent.ready.wait()
            wtask = tg.create_task(writer.run(), name="status.write")
            doc: dict[str, Any] = {}
            for _ in range(200):
                await asyncio.sleep(0.05)
                if path.exists():
                    doc = json.loads(path.read_text())
                    dev = doc["buses"]["lan"]["devices"]["noise-1"]
                    if dev["state"] == "online" and dev["polls"] >= 2:
                        break
            wtask.cancel()
            stop.set()
    finally:
        await term.stop()
    assert doc["gateway"] == "gw-status"
    assert doc["buses"]["lan"]["devices"]["noise-1"]["state"] == "online"
    assert doc["uplink"]["connected"] is False
    assert "depth_batches" in doc["spool"] and "oldest_age_s" in doc["spool"]
    assert json.loads(path.read_text())["state"] == "stopped"


def test_a_status_caught_half_written_is_read_again(tmp_path: Path) -> None:
    """On a full disk the agent rewrites the status in place: a reader can meet the
    first half of it. read_status reads again rather than calling it "not JSON"."""
    import threading

    path = tmp_path / "status.json"
    whole = json.dumps({"gateway": "gw-1", "written_at": time.time(), "buses": {}})
    path.write_text(whole[: len(whole) // 2])  # the first half, as a torn read sees it
    done = threading.Timer(0.06, path.write_text, args=(whole,))
    done.start()
    try:
        found, doc, _ = read_status([path])
    finally:
        done.join()
    assert found == path and doc["gateway"] == "gw-1"
