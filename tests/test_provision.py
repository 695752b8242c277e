"""Provisioning: from nothing to the first verified batch with one command and a token.

The end-to-end test runs a private Mosquitto, the hub (HubCore + Hub worker)
with its enrollment desk, and an emulated Modbus TCP terminal; the technician's
command runs as a separate process (``python -m agent.ops.provision provision``,
the same function ``vitals provision`` calls); then an Agent with the written
configuration polls the terminal and its batches arrive verified.
"""

from __future__ import annotations

import asyncio
import difflib
import io
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.ops import state
from agent.ops.config import TlsConfig, load_config
from agent.ops.provision import (
    ProvisionError,
    edit_config,
    label_png,
    label_qr,
    plan_config,
    render_config,
)
from agent.service import Agent
from drivers.profiles import load_profile
from hub.core import HubCore
from hub.enroll import EnrollmentDesk, serve
from hub.worker import Hub
from protocols.ed25519 import PrivateKey
from protocols.enroll import new_token
from protocols.errors import ConfigError, LocalError
from simulator.broker import MosquittoBroker, free_port, mosquitto_path
from simulator.tcp import TcpTerminal

GW = "gw-e2e-1"
FULL = Path(__file__).resolve().parents[1] / "docs" / "examples" / "gateway-full.toml"

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
    """Run ``python -m agent.ops.provision ARGS`` with no terminal: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.ops.provision",
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
        code, out, err = await vitals("key", "show", "--json", "--config", str(config_path))
        assert code == 0, err
        doc = json.loads(out)
        assert doc["gateway"] == GW and doc["key_id"] == new.kid.hex()
        assert doc["fingerprint"] == new.fingerprint and doc["public_key"] == new.public_raw.hex()
    finally:
        await term.stop()


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (what a step may have left behind)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _clean(out: str, err: str) -> None:
    """One line and a hint: no traceback, no raw errno."""
    assert "Traceback" not in out + err
    assert "Errno" not in out + err
    assert err.count("error: ") == 1 and "\nhint: " in err, err


@pytest.mark.mosquitto
async def test_force_on_a_gateways_configuration_changes_only_the_broker(
    hub_side: HubSide, tmp_path: Path
) -> None:
    """A gateway with 3 buses, 7 devices and 6 rules and a key from `vitals keygen`,
    enrolled with --force: the broker lines change, nothing else, the id stays."""
    config = tmp_path / "gateway.toml"
    config.write_text(FULL.read_text().replace("/var/lib/vitals", str(tmp_path / "state")))
    ident = state.create_identity(tmp_path / "state")
    before, mode = config.read_text(), config.stat().st_mode
    token = hub_side.desk.issue_token("gw-0001", ttl_s=600)
    code, out, err = await vitals(
        "provision", "--token", token, "--broker", hub_side.addr, "--config", str(config),
        "--force", "--timeout", "20",
    )  # fmt: skip
    assert code == 0, err
    assert f"config       {config} (edited)" in out and "(kept)" in out
    assert "enrolled     gw-0001" in out
    after = config.read_text()
    changed = [
        line for line in difflib.ndiff(before.splitlines(), after.splitlines())
        if line[:1] in "+-"
    ]  # fmt: skip
    assert hub_side.broker.host == "127.0.0.1"  # as in the file: that line stays as it is
    assert changed == [
        "- port = 1883                      # 1..65535 (8883 is usual with TLS)",
        f"+ port = {hub_side.broker.port}                      # 1..65535 (8883 is usual with TLS)",
    ]
    assert state.load_identity(tmp_path / "state").kid == ident.kid
    assert hub_side.core.counters["enroll.enrolled"] == 1
    assert config.stat().st_mode == mode, "an edited file keeps its mode"


@pytest.mark.mosquitto
async def test_no_answer_from_the_hub_leaves_nothing_behind(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    token = new_token(PrivateKey.generate().public_key())
    code, out, err = await vitals(
        "provision",
        "--token",
        token,
        "--broker",
        f"{mosquitto.host}:{mosquitto.port}",
        "--config",
        str(tmp_path / "etc" / "gw.toml"),
        "--state-dir",
        str(tmp_path / "state"),
        "--timeout",
        "1",
    )
    assert code == 1 and "no answer from the hub within 1 s" in err
    assert "hint: is the hub's enrollment desk running" in err
    _clean(out, err)
    # no key, no state directory it made, no configuration, no temporary file
    assert _files(tmp_path) == {}
    assert not (tmp_path / "state").exists()


async def test_broker_down_is_one_line_and_a_hint(tmp_path: Path) -> None:
    token = new_token(PrivateKey.generate().public_key())
    state_dir = tmp_path / "state"
    state.create_identity(state_dir)  # `vitals keygen` first: the manual way
    before = _files(tmp_path)
    code, out, err = await vitals(
        "provision", "--token", token, "--broker", f"127.0.0.1:{free_port()}",
        "--config", str(tmp_path / "gw.toml"), "--state-dir", str(state_dir),
    )  # fmt: skip
    assert code == 3, err  # README: 3 = endpoint unusable
    assert "error: cannot reach the broker: nothing accepts connections on 127.0.0.1:" in err
    assert "hint: is the broker running" in err
    _clean(out, err)
    assert _files(tmp_path) == before, "the key it did not make stays, nothing else is written"


async def test_an_existing_configuration_is_refused_byte_identical(tmp_path: Path) -> None:
    """The configuration of a running gateway, with a key from `vitals keygen`."""
    config = tmp_path / "gateway.toml"
    config.write_text(FULL.read_text().replace("/var/lib/vitals", str(tmp_path / "state")))
    state.create_identity(tmp_path / "state")
    before = _files(tmp_path)
    token = new_token(PrivateKey.generate().public_key())
    code, out, err = await vitals(
        "provision", "--token", token, "--broker", f"127.0.0.1:{free_port()}",
        "--config", str(config),
    )  # fmt: skip
    assert code == 1
    assert f"error: {config} exists (gateway gw-0001); nothing was changed" in err
    assert "hint: pass --force" in err
    _clean(out, err)
    assert _files(tmp_path) == before
    # a different gateway id is refused even with --force: a gateway keeps its id
    code, out, err = await vitals(
        "provision", "--token", token, "--broker", f"127.0.0.1:{free_port()}",
        "--config", str(config), "--force", "--gateway-id", "gw-0002",
    )  # fmt: skip
    assert code == 1 and "--gateway-id gw-0002 would change its id" in err
    assert _files(tmp_path) == before


async def test_dry_run_shows_the_edit_and_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(FULL.read_text().replace("/var/lib/vitals", str(tmp_path / "state")))
    before = _files(tmp_path)
    code, out, err = await vitals(
        "provision", "--dry-run", "--force", "--broker", "mqtt.city.example:8883",
        "--tls", "--ca-file", str(tmp_path / "city-ca.pem"), "--config", str(config),
    )  # fmt: skip
    assert code == 0, err
    assert "dry run: nothing is written, nothing is sent" in out
    assert f"config       {config} (would be edited)" in out
    assert '-host = "127.0.0.1"               # broker name or IP' in out
    assert '+host = "mqtt.city.example"               # broker name or IP' in out
    assert "+port = 8883                      # 1..65535" in out
    assert "identity     " in out and "(would be created)" in out
    assert "enroll       gw-0001 through mqtt.city.example:8883" in out
    assert _files(tmp_path) == before
    code, out, err = await vitals(
        "provision", "--dry-run", "--json", "--broker", "10.1.2.3:1883",
        "--config", str(tmp_path / "new.toml"), "--state-dir", str(tmp_path / "s2"),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["dry_run"] and doc["config_action"] == "created" and doc["key"] == "created"
    assert 'host = "10.1.2.3"' in doc["config_text"] and doc["gateway"] is None
    assert _files(tmp_path) == before


async def test_flags_are_required_without_a_terminal(tmp_path: Path) -> None:
    code, _, err = await vitals("provision", "--config", str(tmp_path / "gw.toml"))
    assert code == 2 and "--token is required" in err and "hint: pass --token" in err
    code, _, err = await vitals(
        "provision", "--token", "not-a-token", "--broker", "127.0.0.1:1",
        "--config", str(tmp_path / "gw.toml"), "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 2 and "enrollment token looks like" in err
    token = new_token(PrivateKey.generate().public_key())
    code, _, err = await vitals(
        "provision", "--token", token, "--broker", "gw-0042",
        "--config", str(tmp_path / "gw.toml"), "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 2 and "'gw-0042' is not HOST:PORT (that looks like a gateway id)" in err
    assert not (tmp_path / "s").exists() and not (tmp_path / "gw.toml").exists()


def test_the_prompts_check_each_answer_as_it_is_typed(tmp_path: Path) -> None:
    """Interactive, in a real terminal (tmux): a wrong answer is refused at its own
    prompt and asked again, not after the token was typed."""
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux (apt-get install tmux)")
    token = new_token(PrivateKey.generate().public_key())
    port = free_port()
    name = f"vitals-prov-{os.getpid()}"
    cmd = shlex.join(
        [sys.executable, "-m", "agent.ops.provision", "provision",
         "--config", str(tmp_path / "gw.toml"), "--state-dir", str(tmp_path / "s")]
    )  # fmt: skip
    tmux = ["tmux", "-L", name]
    env = {**os.environ, "NO_COLOR": "1", "TERM": "xterm"}
    subprocess.run(
        [*tmux, "new-session", "-d", "-x", "200", "-y", "50", "sh", "-c",
         f"{cmd}; echo \"[exit $?]\"; sleep 60"],
        check=True, env=env,
    )  # fmt: skip

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-J", "-S", "-100"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip

    def wait(text: str, count: int = 1) -> str:
        for _ in range(300):
            now = screen()
            if now.count(text) >= count:
                return now
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} x{count} on the screen:\n{screen()}")

    def answer(text: str) -> None:
        subprocess.run([*tmux, "send-keys", "-l", text], check=True)
        subprocess.run([*tmux, "send-keys", "Enter"], check=True)

    try:
        wait("enrollment token:")
        answer("gw-0042")
        wait("enrollment token looks like")
        wait("enrollment token:", 2)
        answer(token)
        wait("MQTT broker HOST:PORT")
        answer("gw-0042")  # the gateway id, one prompt too early
        wait("'gw-0042' is not HOST:PORT (that looks like a gateway id)")
        wait("MQTT broker HOST:PORT", 2)
        answer(f"127.0.0.1:{port}")
        wait("gateway id (empty")
        answer("GW 42")
        wait("'GW 42' is not a gateway id")
        wait("gateway id (empty", 2)
        answer("gw-0042")
        text = wait("[exit ")
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, capture_output=True)
    assert "[exit 3]" in text  # nothing listens on that port: refused at the end, as expected
    assert "error: cannot reach the broker" in text and "hint: " in text
    assert "Traceback" not in text
    assert not (tmp_path / "s").exists() and not (tmp_path / "gw.toml").exists()


# --------------------------------------------------------------------------- config


def test_default_template_renders_a_valid_config(tmp_path: Path) -> None:
    plan = plan_config(
        tmp_path / "gw.toml",
        gateway_id="gw-0001",
        state_dir=tmp_path / "state",
        broker_host="mqtt.city.example",
        broker_port=8883,
        tls=TlsConfig(enabled=True, ca_file=tmp_path / "ca.crt"),
    )
    cfg = plan.config
    assert plan.action == "created" and plan.text.startswith("# Gateway configuration")
    assert cfg.gateway.id == "gw-0001" and cfg.uplink.port == 8883
    assert cfg.uplink.tls.enabled and cfg.uplink.tls.ca_file == tmp_path / "ca.crt"
    assert not cfg.uplink.tls.insecure
    assert not (tmp_path / "gw.toml").exists(), "a plan writes nothing"


def test_template_errors(tmp_path: Path) -> None:
    with pytest.raises(LocalError, match="placeholder"):
        render_config("${nope}", gateway_id="g", state_dir=tmp_path, broker_host="h", broker_port=1)
    with pytest.raises(ConfigError, match=r"gateway\.id"):
        plan_config(
            tmp_path / "gw.toml",
            gateway_id="Not An Id",
            state_dir=tmp_path,
            broker_host="h",
            broker_port=1,
        )


def _full(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(FULL.read_text().replace("/var/lib/vitals", str(tmp_path / "state")))
    return path


def _without_owned(data: dict[str, object]) -> dict[str, object]:
    out = json.loads(json.dumps(data))
    for key in ("host", "port"):
        out["uplink"].pop(key)
    for key in ("enabled", "ca_file"):
        out["uplink"]["tls"].pop(key)
    return dict(out)


def test_force_edits_only_the_keys_provision_owns(tmp_path: Path) -> None:
    """Every bus, device and rule, every comment and the gateway id stay."""
    path = _full(tmp_path)
    before = path.read_text()
    plan = plan_config(
        path,
        gateway_id=None,
        state_dir=None,
        broker_host="mqtt.city.example",
        broker_port=8883,
        tls=TlsConfig(enabled=True, ca_file=tmp_path / "city-ca.pem"),
        force=True,
    )
    assert plan.action == "edited" and plan.gateway_id == "gw-0001"
    changed = [
        line for line in difflib.ndiff(before.splitlines(), plan.text.splitlines())
        if line[:1] in "+-"
    ]  # fmt: skip
    assert changed == [
        '- host = "127.0.0.1"               # broker name or IP',
        '+ host = "mqtt.city.example"               # broker name or IP',
        "- port = 1883                      # 1..65535 (8883 is usual with TLS)",
        "+ port = 8883                      # 1..65535 (8883 is usual with TLS)",
        "- enabled = false",
        "+ enabled = true",
        '- ca_file = ""                     # CA bundle that signed the broker\'s certificate',
        f'+ ca_file = "{tmp_path / "city-ca.pem"}"                     # CA bundle that signed '
        "the broker's certificate",
    ], changed
    old, new = tomllib.loads(before), tomllib.loads(plan.text)
    assert _without_owned(new) == _without_owned(old)
    assert len(new["buses"]) == 3 and len(new["devices"]) == 7 and len(new["rules"]) == 6
    # the same again changes nothing: a re-provision leaves the file byte-identical
    again = plan_config(
        path, gateway_id="gw-0001", state_dir=None, broker_host="127.0.0.1", broker_port=1883,
        force=True,
    )  # fmt: skip
    assert again.action == "unchanged" and again.text == before


def test_edit_config_adds_missing_keys_and_tables() -> None:
    text = '# mine\n[gateway]\nid = "gw-1"\n\n[[buses]]\nname = "b"\nkind = "tcp"\nhost = "h"\n'
    out = edit_config(text, {"gateway": {"state_dir": "/s"}, "uplink": {"host": "m", "port": 1883}})
    assert tomllib.loads(out) == {
        "gateway": {"id": "gw-1", "state_dir": "/s"},
        "buses": [{"name": "b", "kind": "tcp", "host": "h"}],
        "uplink": {"host": "m", "port": 1883},
    }
    assert out.startswith('# mine\n[gateway]\nid = "gw-1"\n')  # what was there stays as it was
    # the same edits again change nothing, byte for byte
    assert edit_config(out, {"gateway": {"state_dir": "/s"}, "uplink": {"host": "m"}}) == out


def test_edit_config_keeps_comments_and_follows_dotted_keys() -> None:
    text = 'uplink.host = "x"  # the city broker\n[gateway]\nid = "gw-1"  # on the label\n'
    out = edit_config(text, {"uplink": {"host": "m"}})
    assert out == 'uplink.host = "m"  # the city broker\n[gateway]\nid = "gw-1"  # on the label\n'
    with pytest.raises(ProvisionError, match="not valid TOML"):
        edit_config("[gateway\n", {"uplink": {"host": "m"}})


def test_the_label_png_has_the_qr_code_and_the_text_under_it(tmp_path: Path) -> None:
    from PIL import Image

    ident = state.create_identity(tmp_path)
    data = label_png("gw-0042", ident)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    page = Image.open(io.BytesIO(data)).convert("L")
    qr = label_qr("gw-0042", ident)
    size = (len(qr.matrix) + 8) * 8
    # the code: each module's centre pixel is black where segno says dark
    for r, line in enumerate(qr.matrix):
        for c, dark in enumerate(line):
            assert (page.getpixel(((c + 4) * 8 + 4, (r + 4) * 8 + 4)) < 128) == bool(dark)
    # under it, ink: five lines of text (id, key id, "fingerprint", two halves)
    ink = page.point(lambda v: 255 if v < 128 else 0)  # white where there is ink
    inked = [y for y in range(size, page.height) if ink.crop((0, y, page.width, y + 1)).getbbox()]
    bands = sum(1 for y in inked if y - 1 not in inked)
    assert bands == 5, bands
    # the first line, the gateway id, is the largest print (read from across a cabinet)
    heights = []
    for y in inked:
        if y - 1 not in inked:
            heights.append(1)
        else:
            heights[-1] += 1
    assert heights[0] == max(heights)


async def test_keygen_json_and_refusal(tmp_path: Path) -> None:
    code, out, err = await vitals("keygen", "--json", "--state-dir", str(tmp_path / "s"))
    assert code == 0, err
    doc = json.loads(out)
    ident = state.load_identity(tmp_path / "s")
    assert doc["key_id"] == ident.kid.hex() and doc["key_file"] == str(ident.path)
    code, out, err = await vitals("keygen", "--state-dir", str(tmp_path / "s"))
    assert code == 1 and "an identity key exists already" in err
    assert state.load_identity(tmp_path / "s").kid == ident.kid


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


def test_a_spinner_shows_the_wait_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal (tmux), the wait for the hub is shown on stderr, then a clear timeout."""
    if shutil.which("tmux") is None or not mosquitto_path():
        pytest.skip("needs tmux and mosquitto (apt-get install tmux mosquitto)")
    broker = MosquittoBroker()
    asyncio.run(broker.start())
    token = new_token(PrivateKey.generate().public_key())
    name = f"vitals-spin-{os.getpid()}"
    tmux = ["tmux", "-L", name]
    cmd = shlex.join(
        [sys.executable, "-m", "agent.ops.provision", "provision", "--token", token,
         "--broker", f"{broker.host}:{broker.port}", "--gateway-id", "gw-0042",
         "--config", str(tmp_path / "gw.toml"), "--state-dir", str(tmp_path / "s"),
         "--timeout", "4"]
    )  # fmt: skip
    try:
        subprocess.run(
            [*tmux, "new-session", "-d", "-x", "200", "-y", "50", "sh", "-c",
             f"{cmd}; echo \"[exit $?]\"; sleep 60"],
            check=True, env={**os.environ, "TERM": "xterm"},
        )  # fmt: skip
        seen, text = False, ""
        for _ in range(300):
            text = subprocess.run(
                [*tmux, "capture-pane", "-p", "-J", "-S", "-100"],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            seen = seen or "waiting for the hub's answer (up to 4 s)" in text
            if "[exit " in text:
                break
            time.sleep(0.05)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, capture_output=True)
        asyncio.run(broker.stop())
    assert seen, text
    assert "[exit 1]" in text and "error: no answer from the hub within 4 s" in text
    assert "waiting for the hub" not in text.split("error:")[1], "the spinner is gone at the end"
