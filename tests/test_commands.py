"""Signed commands: the executor refuses what it must and says why, signed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.edge.commands import (
    MAX_COMMAND_BYTES,
    CommandExecutor,
    CommandRefused,
    agent_handlers,
    on_message,
)
from agent.fieldbus.links import ModbusLink
from agent.mqtt import MqttClient
from agent.ops.config import Config, load_config, parse_config
from drivers.profiles import load_profile
from hub.commander import Commander
from hub.core import HubCore
from protocols import command, envelope, topics
from protocols.ed25519 import PrivateKey
from protocols.errors import LocalError, SignatureError
from simulator.broker import MosquittoBroker
from simulator.tcp import TcpTerminal

GW = "gw-cmd-1"
T0 = 1_767_225_600.0
HUB = PrivateKey.generate()
GW_KEY = PrivateKey.generate()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def executor(
    clock: Clock,
    seen: Path | None = None,
    handlers: dict[str, Any] | None = None,
    monotonic: Clock | None = None,
) -> CommandExecutor:
    return CommandExecutor(
        GW,
        HUB.public_key().public_bytes_raw(),
        GW_KEY,
        handlers,
        clock=clock,
        seen_path=seen,
        monotonic=monotonic or Clock(),
    )


def cmd(op: str = "ping", args: dict[str, Any] | None = None, **kw: Any) -> bytes:
    kw.setdefault("gateway", GW)
    kw.setdefault("hub_key", HUB)
    kw.setdefault("now_ms", int(T0 * 1000))
    return command.command(op, args, **kw)[0]


def answer(data: bytes | None) -> command.CommandResult:
    assert data is not None, "not answered"
    res = command.parse_result(data)
    res.verify(GW_KEY.public_key())  # every answer is signed by the gateway
    assert res.gw == GW
    return res


async def test_ping_is_answered_signed() -> None:
    clock = Clock()
    wire, cid = command.command("ping", gateway=GW, hub_key=HUB, now_ms=int(T0 * 1000))
    res = answer(await executor(clock).handle(wire))
    assert (res.id, res.status, res.reason) == (cid, "ok", "")
    assert res.value() == {"gw": GW, "t": int(T0 * 1000)}
    with pytest.raises(SignatureError):
        res.verify(HUB.public_key())


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("forged", "bad_signature"),
        ("other_key", "unknown_key"),
        ("misaddressed", "misaddressed"),
        ("expired", "expired"),
        ("too_long", "too_long"),
        ("unknown_op", "unknown_op"),
        ("bad_args", "bad_args"),
    ],
)
async def test_refusals_say_why(case: str, reason: str) -> None:
    clock = Clock()
    now = int(T0 * 1000)
    if case == "forged":
        flipped = bytearray(cmd())
        flipped[-3] ^= 0x10
        data = bytes(flipped)
    elif case == "other_key":
        data = cmd(hub_key=PrivateKey.generate())
    elif case == "misaddressed":
        data = cmd(gateway="gw-other")
    elif case == "expired":
        data = cmd(now_ms=now - 120_000, ttl_ms=60_000)
    elif case == "too_long":
        data = cmd(ttl_ms=30 * 86_400_000)
    elif case in ("unknown_op", "bad_args"):
        protected = {"gw": GW, "kid": envelope.key_id(HUB), "id": b"i" * 16, "op": "ping",
                     "t": now, "exp": now + 60_000}  # fmt: skip
        payload = envelope._pack({})
        if case == "unknown_op":
            protected["op"] = "format_disk"
        else:
            payload = envelope._pack([1, 2, 3])
        data = envelope.sign_message(command.CMD_DOMAIN, protected, payload, HUB)
    res = answer(await executor(clock).handle(data))
    assert (res.status, res.reason) == ("refused", reason)


@pytest.mark.parametrize("case", ["unsigned", "garbage", "empty", "batch_key_domain", "oversized"])
async def test_what_is_no_command_is_counted_never_answered(case: str) -> None:
    """Answering costs a signature and a publish: what anyone can send is only counted."""
    now = int(T0 * 1000)
    reason = "malformed"
    if case == "unsigned":
        good = command.parse_command(cmd())
        data = envelope._pack([1, good.message.protected, good.message.payload, b""])
    elif case == "garbage":
        data = b"\x00\x01\x02"
    elif case == "empty":
        data = b""
    elif case == "batch_key_domain":  # a batch signed by the hub key is no command
        data = envelope.seal([envelope.Reading(1, now, 1.0)], gateway=GW, key=HUB, epoch=1, seq=1)
    else:  # over the limit (no hub makes one: command() refuses): dropped before decoding
        data = cmd() + bytes(MAX_COMMAND_BYTES)
        reason = "oversized"
    ex = executor(Clock())
    assert await ex.handle(data) is None
    assert ex.statistics() == {f"refused.{reason}": 1}
    # and the next good command is answered at once
    assert answer(await ex.handle(cmd())).status == "ok"


async def test_a_command_at_the_size_limit_is_executed() -> None:
    ex = executor(Clock(), handlers={"read": _echo_size})
    pad = MAX_COMMAND_BYTES - 300  # the envelope and the header take the rest
    while len(wire := cmd("read", {"device": "d" * pad})) != MAX_COMMAND_BYTES:
        pad += MAX_COMMAND_BYTES - len(wire)  # msgpack's length prefixes grow with it
    res = answer(await ex.handle(wire))
    assert (res.status, res.value()) == ("ok", pad)


async def _echo_size(args: dict[str, Any]) -> object:
    return len(args["device"])


async def test_refusals_are_answered_at_most_once_a_second() -> None:
    """Forged, misaddressed, expired, replayed: anyone can send those (a replay needs no
    key), so their signed reasons go out at most once per second; the rest are counted.
    A command signed by the hub for us is always answered."""
    clock, mono = Clock(), Clock()
    ex = executor(clock, monotonic=mono)
    first = cmd()
    assert answer(await ex.handle(first)).status == "ok"
    flipped = bytearray(cmd())
    flipped[-3] ^= 0x10
    refused = [bytes(flipped), cmd(gateway="gw-other"), cmd(now_ms=0), first] * 5
    answers = [await ex.handle(data) for data in refused]
    assert answer(answers[0]).reason == "bad_signature"
    assert answers[1:] == [None] * 19
    assert answer(await ex.handle(cmd())).status == "ok", "a good command is never held back"
    mono.now += 0.999
    assert await ex.handle(first) is None
    mono.now += 0.001
    assert answer(await ex.handle(first)).reason == "replayed"
    stats = ex.statistics()
    assert stats["unanswered"] == 20
    assert stats["refused.bad_signature"] == 5 and stats["refused.misaddressed"] == 5
    assert stats["refused.expired"] == 5 and stats["refused.replayed"] == 7
    assert stats["ok"] == 2


async def test_replay_is_refused_even_after_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    seen = tmp_path / "commands.seen"
    wire = cmd(ttl_ms=60_000)
    assert answer(await executor(clock, seen).handle(wire)).status == "ok"
    assert answer(await executor(clock, seen).handle(wire)).reason == "replayed"  # new process
    clock.now += 61
    assert answer(await executor(clock, seen).handle(wire)).reason == "expired"
    # expired ids are forgotten: the memory stays bounded
    ex = executor(clock, seen)
    await ex.handle(cmd(now_ms=int(clock.now * 1000)))
    assert len(ex._seen) == 1


async def test_no_hub_key_means_no_commands() -> None:
    ex = CommandExecutor(GW, None, GW_KEY)
    assert answer(await ex.handle(cmd())).reason == "no_hub_key"


async def test_refusals_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.edge.commands")
    ex = executor(Clock())
    for _ in range(10):
        assert await ex.handle(b"junk") is None
    for _ in range(10):
        ex.on_drop("oversized", "vitals/v1/gw/cmd", 900_000)
        ex.on_drop("overflow", "vitals/v1/gw/cmd", 10)
    stats = ex.statistics()
    assert stats["refused.malformed"] == 10 and stats["refused.oversized"] == 10
    assert stats["dropped.overflow"] == 10
    assert [r.getMessage() for r in caplog.records] == [
        f"command {what}; further ones only counted"
        for what in ("refused: malformed", "refused: oversized", "dropped: overflow")
    ]


async def test_handler_refusal_and_failure() -> None:
    async def refuse(args: dict[str, Any]) -> object:
        raise CommandRefused("busy", "try later")

    async def crash(args: dict[str, Any]) -> object:
        raise LocalError("boom")

    ex = executor(Clock(), handlers={"reload": refuse, "log_level": crash})
    res = answer(await ex.handle(cmd("reload")))
    assert (res.status, res.reason) == ("refused", "busy")
    res = answer(await ex.handle(cmd("log_level")))
    assert (res.status, res.reason, res.value()) == ("failed", "LocalError", "boom")


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_executor_never_raises_and_never_answers_garbage(data: bytes) -> None:
    ex = executor(Clock())
    assert asyncio.run(ex.handle(data)) is None
    assert ex.statistics() == {"refused.malformed": 1}


# --------------------------------------------------------------------------- the agent's ops


def _config(tmp_path: Path, port: int) -> Config:
    data: dict[str, Any] = {
        "gateway": {"id": GW, "state_dir": str(tmp_path)},
        "buses": [{"name": "tcp-1", "kind": "tcp", "host": "127.0.0.1", "tcp_port": port}],
        "devices": [
            {"name": "noise-1", "bus": "tcp-1", "profile": "sound_level_meter", "slave": 1}
        ],
    }
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[gateway]\nid = "{GW}"\nstate_dir = "{tmp_path}"\n'
        f'[[buses]]\nname = "tcp-1"\nkind = "tcp"\nhost = "127.0.0.1"\ntcp_port = {port}\n'
        '[[devices]]\nname = "noise-1"\nbus = "tcp-1"\nprofile = "sound_level_meter"\nslave = 1\n'
    )
    return parse_config(data, source=str(path), base=tmp_path, path=path)


@pytest.fixture
async def terminal() -> AsyncIterator[TcpTerminal]:
    t = TcpTerminal(load_profile("sound_level_meter"), seed=3)
    await t.start()
    try:
        yield t
    finally:
        await t.stop()


async def test_read_write_reload_log_level(terminal: TcpTerminal, tmp_path: Path) -> None:
    cfg = _config(tmp_path, terminal.port)
    link = ModbusLink.tcp("127.0.0.1", terminal.port, timeout_s=1.0)
    levels: list[tuple[str, str]] = []
    reloaded: list[bool] = []

    async def reload() -> None:
        reloaded.append(True)

    ex = executor(
        Clock(),
        handlers=agent_handlers(
            cfg,
            {"tcp-1": link},
            reload=reload,
            set_level=lambda lv, lg: levels.append((lv, lg)),
        ),
    )
    try:
        res = answer(await ex.handle(cmd("read", {"device": "noise-1"})))
        assert res.status == "ok"
        values = res.value()
        assert set(values) == {p.name for p in cfg.device("noise-1").profile.points}

        ok = answer(
            await ex.handle(
                cmd("write", {"device": "noise-1", "point": "averaging_s", "value": 60})
            )
        )
        assert (ok.status, ok.value()) == ("ok", {"written": 60})
        back = answer(
            await ex.handle(cmd("read", {"device": "noise-1", "points": ["averaging_s"]}))
        )
        assert back.value() == {"averaging_s": 60}

        for args, reason in [
            ({"device": "noise-1", "point": "averaging_s", "value": 5000}, "out_of_range"),
            ({"device": "noise-1", "point": "calibration_offset", "value": -10.5}, "out_of_range"),
            ({"device": "noise-1", "point": "laeq", "value": 1}, "not_writable"),
            ({"device": "noise-1", "point": "nope", "value": 1}, "unknown_point"),
            ({"device": "ghost", "point": "averaging_s", "value": 1}, "unknown_device"),
            ({"device": "noise-1", "point": "averaging_s", "value": "60"}, "bad_args"),
        ]:
            res = answer(await ex.handle(cmd("write", args)))
            assert (res.status, res.reason) == ("refused", reason), args
        assert answer(await ex.handle(cmd("reload"))).status == "ok" and reloaded
        res = answer(await ex.handle(cmd("log_level", {"level": "debug", "logger": "agent"})))
        assert res.status == "ok" and levels == [("debug", "agent")]
        res = answer(await ex.handle(cmd("log_level", {"level": "loud"})))
        assert res.reason == "bad_args"
    finally:
        link.close()


# --------------------------------------------------------------------------- over MQTT


@pytest.mark.mosquitto
async def test_commands_over_mqtt(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    core = HubCore(tmp_path / "hub.sqlite3")
    core.enroll(GW, GW_KEY.public_key().public_bytes_raw())
    commander = Commander(core, HUB)
    ex = CommandExecutor(GW, HUB.public_key().public_bytes_raw(), GW_KEY)
    ready = asyncio.Event()

    async def gateway() -> None:  # what the uplink does with its connection
        async with MqttClient(mosquitto.host, mosquitto.port, client_id="gw") as c:
            await c.subscribe(topics.cmd(GW), qos=1)
            ready.set()
            async for msg in c.messages:
                await on_message(c, msg, ex)

    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(gateway())
            await asyncio.wait_for(ready.wait(), 10)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="hub") as hub:
                res = await commander.send(hub, GW, "ping")
                assert res.status == "ok" and res.value()["gw"] == GW
                wire, _ = commander.build(GW, "ping")
                assert (await commander.send(hub, GW, "", data=wire)).status == "ok"
                again = await commander.send(hub, GW, "", data=wire)
                assert again.reason == "replayed"
                with pytest.raises(TimeoutError):  # garbage is never answered
                    await commander.send(hub, GW, "", data=b"not signed", timeout_s=1.0)
                assert ex.statistics()["refused.malformed"] == 1
            task.cancel()
        # a result signed by a revoked gateway key is not believed
        core.revoke(GW, envelope.key_id(GW_KEY))
        wire = command.result(gateway=GW, key=GW_KEY, command_id=b"x" * 16, status="ok", now_ms=1)
        with pytest.raises(SignatureError):
            commander.verify_result(GW, wire)
    finally:
        core.close()


async def test_the_agents_reload_command_asks_its_supervisor(tmp_path: Path) -> None:
    """`vitals run` passes SIGHUP's event as the agent's reload: the hub's reload
    command re-reads the file (refusing a bad one) and sets it."""
    from agent.ops.state import create_identity
    from agent.service import Agent

    cfg_file = tmp_path / "gw.toml"
    cfg_file.write_text(
        f'[gateway]\nid = "gw-reload"\nstate_dir = "{tmp_path / "state"}"\n'
        '[[buses]]\nname = "t"\nkind = "tcp"\nhost = "127.0.0.1"\n'
        '[[devices]]\nname = "n"\nbus = "t"\nprofile = "sound_level_meter"\nslave = 1\n'
    )
    config = load_config(cfg_file)
    create_identity(config.gateway.state_dir)
    hup = asyncio.Event()
    agent = Agent(config, reload=hup.set)
    await agent._setup()
    assert agent.commands is not None
    do_reload = agent.commands.handlers["reload"]
    assert await do_reload({}) == {"devices": 1, "points": len(config.points)}
    assert hup.is_set()
    hup.clear()
    cfg_file.write_text("[gateway]\nid = 'BAD ID'\n")
    with pytest.raises(CommandRefused) as info:
        await do_reload({})
    assert info.value.reason == "config_invalid"
    assert not hup.is_set(), "a bad file must not restart the agent"
    assert agent.spool is not None
    await agent.spool.close()


def test_the_hub_cannot_make_a_command_the_gateway_would_drop() -> None:
    with pytest.raises(LocalError, match=f"a gateway reads at most {MAX_COMMAND_BYTES}"):
        cmd("read", {"device": "d" * MAX_COMMAND_BYTES})
