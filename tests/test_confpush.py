"""Signed remote configuration: the messages, the per-topic MQTT cap, the gateway's
store of versions, and pushes through a real Mosquitto to a real ``vitals run``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.ops.config import Config, load_config
from agent.ops.confpush import ConfigReceiver, ConfigStore, judge
from agent.ops.reload import supervise
from agent.ops.state import create_identity, save_hub_key
from drivers.profiles import load_profile
from hub.core import HubCore
from protocols import confpush, ed25519, topics
from protocols.errors import FrameError, LocalError, SignatureError
from simulator.broker import MosquittoBroker, free_port
from simulator.tcp import TcpTerminal

HUB = ed25519.PrivateKey.from_private_bytes(bytes(range(32)))
GWKEY = ed25519.PrivateKey.from_private_bytes(bytes(range(1, 33)))
OTHER = ed25519.PrivateKey.from_private_bytes(bytes(range(2, 34)))
HUB_PUB = HUB.public_key().public_bytes_raw()


# --------------------------------------------------------------------------- messages


def test_push_round_trip_and_forgeries() -> None:
    wire = confpush.push(
        "[gateway]\nid = 'gw-1'\n", gateway="gw-1", version=3, hub_key=HUB, now_ms=5
    )
    p = confpush.parse_push(wire)
    p.verify(HUB_PUB)
    assert (p.gw, p.v, p.trial, p.text()) == ("gw-1", 3, 120, "[gateway]\nid = 'gw-1'\n")
    forged = confpush.push("x", gateway="gw-1", version=4, hub_key=OTHER, now_ms=5)
    with pytest.raises(SignatureError):
        confpush.parse_push(forged).verify(HUB_PUB)
    # the payload swapped under a valid header: the hash says so before any signature check
    tampered = wire.replace(b"gw-1'", b"gw-2'")
    with pytest.raises(FrameError, match="SHA-256"):
        confpush.parse_push(tampered)
    with pytest.raises(LocalError, match="reads at most"):
        confpush.push(
            "#" * confpush.MAX_CONFIG_BYTES, gateway="g", version=1, hub_key=HUB, now_ms=0
        )


def test_report_round_trip() -> None:
    wire = confpush.report(
        gateway="gw-1",
        key=GWKEY,
        version=3,
        status="rolled_back",
        running=2,
        reason="noise-1 is offline",
        now_ms=9,
        details={"checks": ["x"]},
    )
    r = confpush.parse_report(wire)
    r.verify(GWKEY.public_key().public_bytes_raw())
    assert (r.v, r.status, r.running, r.details()) == (3, "rolled_back", 2, {"checks": ["x"]})
    with pytest.raises(SignatureError):
        r.verify(HUB_PUB)


# --------------------------------------------------------------------------- the gateway's side


def _cfg_text(
    state: Path, port: int, *, gid: str = "gw-conf", extra: str = "", mq: int = 1883
) -> str:
    return (
        f'[gateway]\nid = "{gid}"\nstate_dir = "{state}"\n'
        f'[uplink]\nhost = "127.0.0.1"\nport = {mq}\n{extra}'
        f'[[buses]]\nname = "lan"\nkind = "tcp"\nhost = "127.0.0.1"\ntcp_port = {port}\n'
        "timeout_s = 0.3\n"
        '[[devices]]\nname = "noise-1"\nbus = "lan"\nprofile = "sound_level_meter"\nslave = 1\n'
        "interval_s = 0.2\n"
    )


def _receiver(tmp_path: Path, reloads: list[int]) -> ConfigReceiver:
    state = tmp_path / "state"
    f = tmp_path / "gw.toml"
    f.write_text(_cfg_text(state, 1502))
    return ConfigReceiver(
        gateway="gw-conf",
        hub_key=HUB_PUB,
        key=GWKEY,
        store=ConfigStore.of(state),
        config=load_config(f),
        stats=lambda: {},
        reload=lambda: reloads.append(1),
    )


def _push(text: str, version: int, key: ed25519.PrivateKey = HUB, gw: str = "gw-conf") -> bytes:
    return confpush.push(text, gateway=gw, version=version, hub_key=key, now_ms=1, trial_s=5)


def test_the_gateway_refuses_what_it_must(tmp_path: Path) -> None:
    reloads: list[int] = []
    r = _receiver(tmp_path, reloads)
    state = tmp_path / "state"
    good = _cfg_text(state, 1503)

    def outcome(data: bytes, retained: bool = False) -> tuple[str, str] | None:
        answer, _, reload = r.handle(data, retained, ["noise-1"])
        if reload:
            reloads.append(1)
        if answer is None:
            return None
        rep = confpush.parse_report(answer)
        rep.verify(GWKEY.public_key().public_bytes_raw())
        return rep.status, rep.reason.split(":")[0]

    assert outcome(b"garbage") is None  # malformed: counted, not answered
    assert outcome(_push(good, 1, key=OTHER)) == ("refused", "unknown_key")
    r._next_answer = 0.0  # unverified refusals are answered once a second
    assert outcome(_push(good, 1, gw="gw-other")) == ("refused", "misaddressed")
    assert outcome(_push("[gateway\n", 1)) == ("refused", "invalid")
    assert outcome(_push(_cfg_text(state, 1503, gid="gw-new"), 2)) == ("refused", "identity")
    moved = _cfg_text(tmp_path / "elsewhere", 1503)
    assert outcome(_push(moved, 3)) == ("refused", "identity")
    assert reloads == [] and r.store.active == 0
    # a good one: kept as version 4, on trial, the agent asked to reload
    assert outcome(_push(good, 4)) == ("trying", "5 s to show it works")
    assert reloads == [1] and r.store.active == 4 and r.store.trial is not None
    assert r.store.trial["online"] == ["noise-1"]
    assert r.store.effective(tmp_path / "gw.toml") == r.store.path_of(4)
    assert outcome(_push(good, 5)) == ("refused", "busy")  # for now: 5 is not used up
    # replays: an old version is refused; the retained copy of the last one is ignored
    assert outcome(_push(good, 3)) == ("refused", "replayed")
    assert outcome(_push(good, 4), retained=True) is None
    r.store.commit()
    assert outcome(_push(good, 5), retained=True) == ("trying", "5 s to show it works")


def test_judge() -> None:
    def stats(state: str, connected: bool = True) -> dict[str, object]:
        dev = {"state": state, "last_error": "connection refused"}
        return {"buses": {"lan": {"devices": {"noise-1": dev}}}, "uplink": {"connected": connected}}

    trial = {"online": ["noise-1"], "uplink_changed": True}
    seen: set[str] = set()
    assert judge(stats("unknown"), trial, seen) == (None, "noise-1 online again")
    assert judge(stats("online", connected=False), trial, seen)[0] is None
    assert judge(stats("online"), trial, seen) == (True, "")
    ok, why = judge(stats("offline"), trial, set())
    assert ok is False and "was online before the push" in why and "connection refused" in why
    # a device that did not answer before may be offline, with its reason
    assert judge(stats("offline"), {"online": []}, set()) == (True, "")


def test_store_rolls_back_a_trial_the_process_died_in(tmp_path: Path) -> None:
    store = ConfigStore.of(tmp_path)
    store.begin_trial(1, "a", {"trial_s": 5})
    store.commit()
    store.begin_trial(2, "b", {"trial_s": 5})
    again = ConfigStore.of(tmp_path)  # the next process
    assert "version 2 was on trial" in again.recover()
    assert again.active == 1 and again.trial is None
    assert again.state["unreported"]["version"] == 2
    assert [h["status"] for h in again.state["history"]] == ["applied", "rolled_back"]
    again.save_report(b"signed")
    assert "unreported" not in ConfigStore.of(tmp_path).state


async def test_the_supervisor_rolls_back_a_version_the_agent_cannot_start_on(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    local = tmp_path / "gw.toml"
    local.write_text(_cfg_text(state, 1502))
    pushed = _cfg_text(state, 1502, extra="keepalive_s = 20\n")
    runs: list[int] = []
    stop, hup = asyncio.Event(), asyncio.Event()

    async def run_agent(cfg: Config, agent_stop: asyncio.Event) -> None:
        runs.append(cfg.uplink.keepalive_s)
        if len(runs) == 1:  # a push arrives: version 1 on trial, the agent reloads
            ConfigStore.of(state).begin_trial(1, pushed, {"trial_s": 5})
            hup.set()
            await agent_stop.wait()
        elif cfg.uplink.keepalive_s == 20:
            raise OSError("the bus's port is gone")
        else:
            stop.set()

    await asyncio.wait_for(
        supervise(
            load_config(local),
            local,
            stop=stop,
            hup=hup,
            run_agent=run_agent,
            pushed=ConfigStore.of(state),
        ),
        10,
    )
    assert runs == [30, 20, 30]  # local, version 1 (fails to start), local again
    store = ConfigStore.of(state)
    assert store.active == 0 and store.trial is None
    assert "the agent failed on it" in store.state["unreported"]["reason"]


# --------------------------------------------------------------------------- end to end


VITALS = [sys.executable, "-m", "agent"]


async def _hub_cli(db: Path, broker: MosquittoBroker, *args: str) -> tuple[int, dict[str, Any]]:
    r = await asyncio.to_thread(
        subprocess.run,
        [*VITALS, "hub", "--db", str(db), "--broker", f"{broker.host}:{broker.port}", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.stdout.strip(), r.stderr
    return r.returncode, json.loads(r.stdout)


async def _polled_since(term: TcpTerminal, within: float = 10.0) -> int:
    """Requests the terminal gets from now on (waits for at least 3)."""
    start = term.requests
    for _ in range(int(within / 0.1)):
        await asyncio.sleep(0.1)
        if term.requests - start >= 3:
            break
    return term.requests - start


@pytest.mark.mosquitto
async def test_pushes_through_mosquitto_to_a_real_agent(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """A good push applied; one that validates but breaks polling rolled back by itself
    within its trial; a forged push and a replayed one refused; polling throughout."""
    term = TcpTerminal(load_profile("sound_level_meter"))
    await term.start()
    state, gw = tmp_path / "state", "gw-conf"
    local = tmp_path / "gateway.toml"
    local.write_text(_cfg_text(state, term.port, mq=mosquitto.port))
    identity = create_identity(state)
    save_hub_key(state, HUB_PUB)
    db = tmp_path / "hub.sqlite3"
    core = HubCore(db)
    core.enroll(gw, identity.public_raw)
    core.close()
    (tmp_path / "hub.key").write_bytes(HUB.private_pem())
    (tmp_path / "hub.key").chmod(0o600)
    env = {**os.environ, "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    log = (tmp_path / "agent.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *VITALS, "run", "--config", str(local), env=env, stderr=log
    )
    try:
        assert await _polled_since(term) >= 3

        # 1. a good push (another interval): applied, the gateway runs version 1
        good = tmp_path / "good.toml"
        good.write_text(_cfg_text(state, term.port, mq=mosquitto.port).replace("0.2", "0.25"))
        code, out = await _hub_cli(db, mosquitto, "config", "push", gw, str(good), "--json")
        assert code == 0, out
        assert out["report"]["status"] == "applied" and out["report"]["running"] == 1
        assert await _polled_since(term) >= 3

        # 2. valid, but the bus now points where no terminal is: rolled back by itself
        bad = tmp_path / "bad.toml"
        bad.write_text(_cfg_text(state, free_port(), mq=mosquitto.port))
        t0 = time.monotonic()
        code, out = await _hub_cli(
            db, mosquitto, "config", "push", gw, str(bad), "--trial", "6", "--json"
        )
        assert code == 1, out
        rep = out["report"]
        assert (rep["version"], rep["status"], rep["running"]) == (2, "rolled_back", 1)
        assert rep["reason"].startswith(
            ("noise-1 was online before the push and is offline on it: tcp://", "not within 6 s")
        ), rep
        # two reloads (each drains for up to 10 s with no hub to confirm) and the trial
        assert time.monotonic() - t0 < 6 + 2 * 10 + 10
        assert await _polled_since(term) >= 3  # back on version 1, polling again

        # 3. forged (another key) and replayed (version 2 again): refused, polling goes on
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="attacker") as c:
            await c.subscribe(topics.config_status(gw), qos=1)
            text = good.read_text()
            forged = confpush.push(text, gateway=gw, version=9, hub_key=OTHER, now_ms=1)
            await c.publish(topics.config(gw), forged, qos=1)
            replay = confpush.push(text, gateway=gw, version=2, hub_key=HUB, now_ms=1)
            await asyncio.sleep(1.1)  # unverified refusals are answered once a second
            await c.publish(topics.config(gw), replay, qos=1)
            seen: dict[str, str] = {}
            async with asyncio.timeout(15):
                async for msg in c.messages:
                    assert isinstance(msg.payload, bytes)
                    r = confpush.parse_report(msg.payload)
                    r.verify(identity.public_raw)
                    if r.status == "refused":
                        seen[r.reason.split(":")[0]] = r.reason
                    if {"unknown_key", "replayed"} <= set(seen):
                        break
        assert await _polled_since(term) >= 3

        # the hub's view, and the gateway's own
        code, out = await _hub_cli(db, mosquitto, "config", "status", gw, "--json")
        assert code == 0 and out["report"]["running"] == 1
        r2 = await asyncio.to_thread(
            subprocess.run,
            [*VITALS, "config", "history", "--state-dir", str(state), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        hist = json.loads(r2.stdout)
        assert hist["active"] == 1 and hist["kept"] == [1, 2]
        statuses = [(h["version"], h["status"]) for h in hist["history"]]
        assert (1, "applied") in statuses and (2, "rolled_back") in statuses
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
        await term.stop()
    text = (tmp_path / "agent.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "configuration version 2 rolled back to version 1" in text


def test_config_history_and_rollback_by_hand(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from agent.cli.main import app

    state = tmp_path / "state"
    store = ConfigStore.of(state)
    for v in (1, 2):
        store.begin_trial(v, f"# version {v}\n", {"trial_s": 5})
        store.commit()
    run = CliRunner()
    sd = ["--state-dir", str(state)]
    out = run.invoke(app, ["config", "history", *sd])
    assert out.exit_code == 0 and "running version 2; kept: 1, 2" in out.output
    out = run.invoke(app, ["config", "rollback", *sd])
    assert out.exit_code == 0 and "version 1 is active from the agent's next start" in out.output
    assert ConfigStore.of(state).active == 1
    out = run.invoke(app, ["config", "rollback", "7", *sd])
    assert out.exit_code == 1 and "version 7 is not kept" in out.output
    out = run.invoke(app, ["config", "rollback", "--local", *sd])
    assert out.exit_code == 0 and ConfigStore.of(state).active == 0
    assert ConfigStore.of(state).effective(tmp_path / "gw.toml") == tmp_path / "gw.toml"
