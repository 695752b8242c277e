"""Provisioning: from nothing to the first verified batch with one command and a token.

The end-to-end test runs a private Mosquitto, the hub (HubCore + Hub worker)
with its enrollment desk, and an emulated Modbus TCP terminal; the technician's
command runs as a separate process (``python -m agent.provision provision``,
the same function ``vitals provision`` calls); then an Agent with the written
configuration polls the terminal and its batches arrive verified.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import state
from agent.config import TlsConfig, load_config
from agent.provision import DEFAULT_TEMPLATE, render_config, write_config
from agent.service import Agent
from drivers.profiles import load_profile
from protocols.ed25519 import PrivateKey
from protocols.enroll import new_token
from protocols.errors import ConfigError, LocalError
from simulator.broker import MosquittoBroker
from simulator.enroll import EnrollmentDesk, serve
from simulator.hub import Hub, HubCore
from simulator.tcp import TcpTerminal

GW = "gw-e2e-1"

TEMPLATE = """\
[gateway]
id = "${gateway_id}"
state_dir = "${state_dir}"

[uplink]
host = "${broker_host}"
port = ${broker_port}
${tls}
[batch]
max_age_s = 0.3

[[buses]]
name = "tcp-1"
kind = "tcp"
host = "127.0.0.1"
tcp_port = @PORT@

[[devices]]
name = "noise-1"
bus = "tcp-1"
profile = "sound_level_meter"
slave = 1
interval_s = 0.2
"""


async def vitals(*args: str) -> tuple[int, str, str]:
    """Run ``python -m agent.provision ARGS`` with no terminal: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.provision",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class HubSide:
    broker: MosquittoBroker
    core: HubCore
    desk: EnrollmentDesk
    hub: Hub

    @property
    def addr(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"


@pytest.fixture
async def hub_side(mosquitto: MosquittoBroker, tmp_path: Path) -> AsyncIterator[HubSide]:
    core = HubCore(tmp_path / "hub" / "hub.sqlite3")
    desk = EnrollmentDesk(core, PrivateKey.generate(), rotation_grace_s=0)
    hub = Hub(core, host=mosquitto.host, port=mosquitto.port)
    desk_ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(hub.run(), name="hub"),
            tg.create_task(
                serve(desk, host=mosquitto.host, port=mosquitto.port, ready=desk_ready),
                name="enroll.desk",
            ),
        ]
        await asyncio.wait_for(hub.subscribed.wait(), 10)
        await asyncio.wait_for(desk_ready.wait(), 10)
        try:
            yield HubSide(mosquitto, core, desk, hub)
        finally:
            for t in tasks:
                t.cancel()
    core.close()


async def run_agent_until_verified(config_path: Path, core: HubCore, kid: bytes) -> int:
    """Run an Agent until the hub has stored a batch signed by ``kid``; batches stored."""
    config = load_config(config_path)
    agent = Agent(config, drain_timeout_s=5)
    stop = asyncio.Event()

    def stored_by_kid() -> int:
        # the hub stores (gw, epoch, seq); the epoch of this run is the agent's
        return int(
            core.db.execute(
                "SELECT count(*) FROM batches WHERE gw = ? AND epoch = ?", (GW, agent.epoch)
            ).fetchone()[0]
        )

    async with asyncio.TaskGroup() as tg:
        tg.create_task(agent.run(stop), name="agent")
        await asyncio.wait_for(agent.ready.wait(), 10)
        assert state.load_identity(config.gateway.state_dir).kid == kid
        for _ in range(600):  # up to 30 s; the hub is polled, it has no event to wait on
            if stored_by_kid():
                break
            await asyncio.sleep(0.05)
        stop.set()
    return stored_by_kid()


@pytest.mark.mosquitto
async def test_from_nothing_to_a_verified_batch_with_one_command(
    hub_side: HubSide, tmp_path: Path
) -> None:
    term = TcpTerminal(load_profile("sound_level_meter"), seed=1)
    await term.start()
    try:
        template = tmp_path / "cabinet.toml.in"
        template.write_text(TEMPLATE.replace("@PORT@", str(term.port)))
        token = hub_side.desk.issue_token(GW, ttl_s=600)
        config_path = tmp_path / "etc" / "gateway.toml"
        state_dir = tmp_path / "state"
        label = tmp_path / "label.png"
        # the technician's one command (no terminal: flags only)
        code, out, err = await vitals(
            "provision",
            "--token",
            token,
            "--gateway-id",
            GW,
            "--broker",
            hub_side.addr,
            "--config",
            str(config_path),
            "--state-dir",
            str(state_dir),
            "--template",
            str(template),
            "--label-png",
            str(label),
            "--timeout",
            "20",
        )
        assert code == 0, err
        ident = state.load_identity(state_dir)
        assert f"enrolled     {GW}" in out
        assert ident.kid.hex() in out and ident.fingerprint in out
        assert "█" in out or "▀" in out  # the QR code on the terminal
        assert label.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert ident.private_key.private_bytes_raw().hex() not in out + err
        # the hub knows the key; the gateway knows the hub's
        assert state.load_hub_key(state_dir) == hub_side.desk.hub_public
        assert hub_side.core.counters["enroll.enrolled"] == 1
        # and the first batch arrives verified
        stored = await run_agent_until_verified(config_path, hub_side.core, ident.kid)
        assert stored >= 1
        assert hub_side.core.counters.get("rejected.unknown_key", 0) == 0

        # the same token a second time: refused, and the technician is told why
        code, out, err = await vitals(
            "provision",
            "--token",
            token,
            "--gateway-id",
            GW,
            "--broker",
            hub_side.addr,
            "--config",
            str(tmp_path / "other.toml"),
            "--state-dir",
            str(tmp_path / "other-state"),
            "--timeout",
            "20",
        )
        assert code == 1 and "token_used" in err

        # key rotation: a new key enrolled by a request signed with the old one
        code, out, err = await vitals("key", "rotate", "--config", str(config_path))
        assert code == 0, err
        new = state.load_identity(state_dir)
        assert new.kid != ident.kid and new.kid.hex() in out
        assert not (state_dir / state.PENDING_KEY_FILE).exists()
        revoked = dict(
            hub_side.core.db.execute("SELECT kid, revoked FROM gateways WHERE gw = ?", (GW,))
        )
        assert revoked == {ident.kid: 1, new.kid: 0}  # grace 0 in this test: revoked at once
        assert await run_agent_until_verified(config_path, hub_side.core, new.kid) >= 1
    finally:
        await term.stop()


@pytest.mark.mosquitto
async def test_no_answer_from_the_hub_is_a_clear_error(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    token = new_token(PrivateKey.generate().public_key())
    code, _, err = await vitals(
        "provision",
        "--token",
        token,
        "--broker",
        f"{mosquitto.host}:{mosquitto.port}",
        "--config",
        str(tmp_path / "gw.toml"),
        "--state-dir",
        str(tmp_path / "state"),
        "--timeout",
        "1",
    )
    assert code == 1 and "no answer from the hub" in err
    # the key stays for the retry; the config is written with the derived id
    ident = state.load_identity(tmp_path / "state")
    assert load_config(tmp_path / "gw.toml").gateway.id == ident.default_gateway_id


async def test_flags_are_required_without_a_terminal(tmp_path: Path) -> None:
    code, _, err = await vitals("provision", "--config", str(tmp_path / "gw.toml"))
    assert code == 2 and "--token is required" in err
    code, _, err = await vitals(
        "provision", "--token", "not-a-token", "--broker", "127.0.0.1:1",
        "--config", str(tmp_path / "gw.toml"), "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 1 and "enrollment token looks like" in err
    assert not (tmp_path / "s").exists()  # nothing written for a mistyped token


# --------------------------------------------------------------------------- config


def test_default_template_renders_a_valid_config(tmp_path: Path) -> None:
    text = render_config(
        DEFAULT_TEMPLATE,
        gateway_id="gw-0001",
        state_dir=tmp_path / "state",
        broker_host="mqtt.city.example",
        broker_port=8883,
        tls=TlsConfig(enabled=True, ca_file=tmp_path / "ca.crt"),
    )
    cfg = write_config(tmp_path / "gw.toml", text)
    assert cfg.gateway.id == "gw-0001" and cfg.uplink.port == 8883
    assert cfg.uplink.tls.enabled and cfg.uplink.tls.ca_file == tmp_path / "ca.crt"
    assert not cfg.uplink.tls.insecure


def test_template_errors(tmp_path: Path) -> None:
    with pytest.raises(LocalError, match="placeholder"):
        render_config("${nope}", gateway_id="g", state_dir=tmp_path, broker_host="h", broker_port=1)
    bad = render_config(
        DEFAULT_TEMPLATE,
        gateway_id="Not An Id",
        state_dir=tmp_path,
        broker_host="h",
        broker_port=1,
    )
    with pytest.raises(ConfigError, match=r"gateway\.id"):
        write_config(tmp_path / "gw.toml", bad)
    assert not (tmp_path / "gw.toml").exists()


def test_existing_config_needs_force(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    text = render_config(
        DEFAULT_TEMPLATE, gateway_id="gw-1", state_dir=tmp_path, broker_host="h", broker_port=1
    )
    write_config(path, text)
    with pytest.raises(LocalError, match="--force"):
        write_config(path, text)
    assert write_config(path, text, force=True).gateway.id == "gw-1"


def test_hub_db_is_plain_sqlite(tmp_path: Path) -> None:
    """Tokens and rotations live in the hub database, beside the keys."""
    core = HubCore(tmp_path / "hub.sqlite3")
    EnrollmentDesk(core, PrivateKey.generate()).issue_token("gw-1")
    core.close()
    con = sqlite3.connect(tmp_path / "hub.sqlite3")
    try:
        assert con.execute("SELECT gw FROM enroll_tokens").fetchall() == [("gw-1",)]
    finally:
        con.close()
