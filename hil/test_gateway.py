"""Gateway end to end: the agent's own Modbus link polls the terminal with the
device profile, and every point decodes to a value in its profile's range."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hil.bus import Bus, Target
from protocols.modbus import Space, decode, register_count


def test_agent_link_reads_every_profile_point(target: Target, bus: Bus) -> None:
    from agent.fieldbus.links import ModbusLink
    from drivers.profiles import load_profile

    profile = load_profile("sound_level_meter")
    bus.ser.close()  # one master on the line at a time

    async def poll() -> dict[str, object]:
        link = ModbusLink.serial(
            target.port, baud=target.baud, parity=target.parity, timeout_s=target.response_timeout
        )
        values: dict[str, object] = {}
        try:
            await link.connect()
            for point in profile.points:
                spec = point.spec
                words = await link.read(
                    spec.space, spec.address, register_count(spec), target.slave
                )
                values[spec.name] = decode(spec, list(words))
        finally:
            link.close()
        return values

    try:
        values = asyncio.run(poll())
    finally:
        bus.ser.open()
    assert set(values) == {p.spec.name for p in profile.points}
    for point in profile.points:
        value = values[point.spec.name]
        if point.range is not None:
            lo, hi = point.range
            assert isinstance(value, int | float)
            assert lo <= value <= hi, f"{point.spec.name} = {value} outside {point.range}"
    assert isinstance(values["firmware_version"], int) and values["firmware_version"] >= 100
    assert {p.spec.space for p in profile.points} == {Space.INPUT, Space.HOLDING}


def test_agent_delivers_terminal_readings_to_the_hub(
    target: Target, bus: Bus, tmp_path: Path
) -> None:
    """The whole path with this terminal: agent -> MQTT broker -> hub, every batch verified.

    A private broker on a free loopback port (Mosquitto when installed, else the
    embedded one), the reference hub, and the agent polling the terminal on
    ``--port`` with the sound level meter profile.
    """
    from agent.ops.config import parse_config
    from agent.ops.state import create_identity
    from hub.core import HubCore
    from simulator.broker import make_broker
    from simulator.harness import agent_with_hub

    bus.ser.close()  # the agent is the master on the line now

    async def run() -> tuple[int, HubCore]:
        broker = make_broker("auto")
        await broker.start()
        try:
            config = parse_config(
                {
                    "gateway": {"id": "gw-hil-1", "state_dir": str(tmp_path / "gw")},
                    "uplink": {"host": broker.host, "port": broker.port},
                    "batch": {"max_age_s": 0.5},
                    "spool": {"durability": "normal"},
                    "buses": [
                        {
                            "name": "hil",
                            "kind": "rtu",
                            "port": target.port,
                            "baud": target.baud,
                            "parity": target.parity,
                            "timeout_s": target.response_timeout,
                        }
                    ],
                    "devices": [
                        {
                            "name": "terminal",
                            "bus": "hil",
                            "profile": "sound_level_meter",
                            "slave": target.slave,
                            "interval_s": 0.5,
                        }
                    ],
                },
                source="<hil>",
                base=tmp_path,
            )
            identity = create_identity(config.gateway.state_dir)
            async with agent_with_hub(
                config,
                identity,
                broker.host,
                broker.port,
                tmp_path / "hub.sqlite3",
                shared=broker.shared_subscriptions,
            ) as run:
                await asyncio.sleep(4)
            return run.polled, run.core
        finally:
            await broker.stop()

    try:
        polled, core = asyncio.run(run())
    finally:
        bus.ser.open()
    assert polled >= 14, "the agent polled less than one round of the profile's points"
    assert core.counters["readings"] == polled
    assert not [k for k in core.counters if k.startswith("rejected.")]
    good = core.db.execute("SELECT count(*) FROM readings WHERE quality = 0").fetchone()[0]
    assert good > 0, "no reading from the terminal was good"
    core.close()
