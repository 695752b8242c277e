"""Serial sensors on a gateway: a `serial-sensor` bus, its profile, and the agent reading it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent.fieldbus.poller import DeviceState, PolledDevice
from agent.ops.config import parse_config
from agent.ops.state import create_identity
from agent.pipeline.batcher import Batcher
from protocols.errors import ConfigError
from protocols.reading import Quality, Reading
from simulator.broker import EmbeddedBroker, MosquittoBroker
from simulator.harness import agent_with_hub
from simulator.serial_sensors import SerialSensorEmulator
from tests.virtual_time import VirtualClock


def config(
    tmp_path: Path, buses: list[dict[str, Any]], devices: list[dict[str, Any]], port: int = 1
):
    return parse_config(
        {
            "gateway": {"id": "gw-sensor-1", "state_dir": str(tmp_path / "gw")},
            "uplink": {"port": port},
            "batch": {"max_age_s": 0.2},
            "spool": {"durability": "off"},
            "buses": buses,
            "devices": devices,
        },
        source="gw.toml",
        base=tmp_path,
    )


SENSOR_BUS = {"name": "uart-1", "kind": "serial-sensor", "port": "/dev/ttyAMA0"}
PMS = {"name": "pm-2", "bus": "uart-1", "profile": "pms5003"}


def test_a_sensor_bus_and_its_device(tmp_path: Path) -> None:
    cfg = config(tmp_path, [SENSOR_BUS], [PMS])
    (bus,) = cfg.buses
    assert (bus.kind, bus.baud, bus.parity, bus.timeout_s) == ("serial-sensor", 9600, "N", 5.0)
    names = [p.name for _, p in cfg.points.values()]
    assert names == ["pm1", "pm2_5", "pm10", "n0_3"]
    assert cfg.to_dict()["buses"][0] == {
        "name": "uart-1",
        "kind": "serial-sensor",
        "port": "/dev/ttyAMA0",
        "baud": 9600,
        "timeout_s": 5.0,
    }


@pytest.mark.parametrize(
    ("buses", "devices", "where", "message"),
    [
        (
            [SENSOR_BUS],
            [{**PMS, "profile": "sound_level_meter"}],
            "devices[0].profile",
            "'sound_level_meter' is a Modbus register map; a 'serial-sensor' bus needs a "
            "serial-sensor profile (gps_nmea, pms5003, sds011)",
        ),
        (
            [{"name": "rs485-1", "kind": "rtu", "port": "/dev/ttyUSB0"}],
            [{**PMS, "bus": "rs485-1", "slave": 1}],
            "devices[0].profile",
            "'pms5003' is a serial sensor (pms5003): put it on a bus of kind 'serial-sensor', "
            "not 'rtu'",
        ),
        (
            [SENSOR_BUS],
            [PMS, {**PMS, "name": "pm-3"}],
            "devices[1].bus",
            "a 'serial-sensor' bus carries one sensor: 'uart-1' already has 'pm-2' (devices[0])",
        ),
        (
            [{**SENSOR_BUS, "retries": 2}],
            [PMS],
            "buses[0].retries",
            "'retries' does not apply to a 'serial-sensor' bus (nothing is polled)",
        ),
        (
            [{**SENSOR_BUS, "parity": "E"}],
            [PMS],
            "buses[0].parity",
            "'parity' does not apply to a 'serial-sensor' bus (only to rtu)",
        ),
    ],
)
def test_broken_sensor_configs(
    tmp_path: Path,
    buses: list[dict[str, Any]],
    devices: list[dict[str, Any]],
    where: str,
    message: str,
) -> None:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, buses, devices)
    assert (f"gw.toml: {where}", message) in info.value.problems, info.value.problems


async def test_the_agent_reads_a_pms5003_and_notices_when_it_falls_silent(
    tmp_path: Path, broker: MosquittoBroker | EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Reading] = []
    real_add = Batcher.add

    async def tap(self: Batcher, readings: list[Reading]) -> None:
        seen.extend(readings)
        await real_add(self, readings)

    monkeypatch.setattr(Batcher, "add", tap)
    async with SerialSensorEmulator("pms5003", period=0.05, seed=4) as emu:
        cfg = parse_config(
            {
                "gateway": {"id": "gw-sensor-1", "state_dir": str(tmp_path / "gw")},
                "uplink": {"host": broker.host, "port": broker.port},
                "batch": {"max_age_s": 0.2},
                "spool": {"durability": "off"},
                "buses": [{**SENSOR_BUS, "port": emu.port, "timeout_s": 0.5}],
                "devices": [PMS],
            },
            source="gw.toml",
            base=tmp_path,
        )
        identity = create_identity(cfg.gateway.state_dir)
        emitting = asyncio.create_task(emu.run())
        async with agent_with_hub(
            cfg,
            identity,
            broker.host,
            broker.port,
            tmp_path / "hub.sqlite3",
            shared=broker.shared_subscriptions,
        ) as run:
            pm25 = next(pid for pid, (_, p) in cfg.points.items() if p.name == "pm2_5")
            for _ in range(200):  # until ten good frames have arrived
                await asyncio.sleep(0.05)
                if sum(r.point == pm25 and r.quality is Quality.GOOD for r in seen) >= 10:
                    break
            (reader,) = run.agent.sensors
            state_while_talking = reader.devices[0].state
            emitting.cancel()  # the sensor falls silent
            for _ in range(200):  # its frame timeout is 0.5 s
                await asyncio.sleep(0.05)
                if reader.devices[0].state is DeviceState.OFFLINE:
                    break
            state_when_silent = reader.devices[0].state
    core = run.core
    core.close()

    ids = {p.name: pid for pid, (_, p) in cfg.points.items()}
    good = [r for r in seen if r.quality is Quality.GOOD]
    sent_pm25 = [f.pm2_5 for f in emu.sent if hasattr(f, "pm2_5")]
    got_pm25 = [r.value for r in good if r.point == ids["pm2_5"]]
    assert len(got_pm25) >= 10
    # frames sent before the agent opened the port are gone: the rest arrive, in order
    n = len(got_pm25)
    assert any(sent_pm25[i : i + n] == got_pm25 for i in range(len(sent_pm25) - n + 1)), (
        got_pm25,
        sent_pm25,
    )
    assert state_while_talking is DeviceState.ONLINE
    assert state_when_silent is DeviceState.OFFLINE
    silent = [r for r in seen if r.quality is Quality.COMM_ERROR]
    assert sorted(r.point for r in silent) == sorted(ids.values()), "one comm-error per point"
    assert core.counters["readings"] == len(seen)


@pytest.mark.virtual_time
async def test_a_missing_sensor_port_is_one_warning_with_a_hint_and_the_reader_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, virtual_clock: VirtualClock
) -> None:
    """A serial sensor whose adapter is not plugged in: the bus goes offline with a
    reason an installer can act on (no raw errno), says it once, and keeps trying
    (after 1, 2, 4 ... s, at most every 60 s; on virtual time, to the instant)."""
    from agent.fieldbus.sensors import SensorReader

    missing = tmp_path / "ttyUSB9"
    cfg = config(tmp_path, [{**SENSOR_BUS, "port": str(missing)}], [PMS])
    points = list(cfg.points.items())
    got: list[Reading] = []

    async def sink(readings: list[Reading]) -> None:
        got.extend(readings)

    dev = PolledDevice("pm-2", 0, 1.0, 1, 0, [(pid, p) for pid, (_, p) in points])
    reader = SensorReader(
        "uart-1",
        port=str(missing),
        baud=9600,
        timeout_s=0.5,
        protocol="pms5003",
        device=dev,
        sink=sink,
        clock=virtual_clock,
        max_backoff_s=60.0,
    )
    reopens_at: dict[float, int] = {}
    with caplog.at_level("WARNING", logger="agent.fieldbus.sensors"):
        t0 = virtual_clock.monotonic()
        task = asyncio.create_task(reader.run())
        # reopened at 1, 3, 7, 15, 31, 63, then every 60 s: 123, 183
        for t in (0.5, 1.5, 2.5, 3.5, 62.5, 63.5, 122.5, 123.5, 183.5):
            await asyncio.sleep(t - (virtual_clock.monotonic() - t0))
            reopens_at[t] = reader.reopens
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert reopens_at == {
        0.5: 0, 1.5: 1, 2.5: 1, 3.5: 2, 62.5: 5, 63.5: 6, 122.5: 6, 123.5: 7, 183.5: 8
    }  # fmt: skip
    assert dev.state is DeviceState.OFFLINE
    assert "no such port" in dev.last_error and "Errno" not in dev.last_error
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    assert got and all(r.quality is Quality.COMM_ERROR for r in got)
