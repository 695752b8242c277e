"""``vitals diag uplink`` against a private Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from pathlib import Path

import aiomqtt
import pytest
from typer.testing import CliRunner

from agent.cli.diag import diag_app
from agent.cli.diag.uplink import check_uplink
from agent.ops.config import TlsConfig, UplinkConfig
from hub.core import HubCore
from hub.worker import Hub
from simulator.broker import MosquittoBroker, free_port, mosquitto_path

needs_mosquitto = pytest.mark.skipif(
    mosquitto_path() is None, reason="needs mosquitto (Debian package)"
)


@needs_mosquitto
async def test_every_step_against_a_broker_then_clock_from_hub_time() -> None:
    broker = MosquittoBroker()
    await broker.start()
    try:
        target = UplinkConfig(host="127.0.0.1", port=broker.port, client_id="vitals-gw-1")
        steps = {s.name: s for s in await check_uplink(target, timeout_s=5)}
        assert [steps[n].status for n in ("dns", "tcp", "mqtt", "round trip")] == ["pass"] * 4
        assert steps["tls"].status == "skip" and "not enabled" in steps["tls"].detail
        assert steps["clock"].status == "skip" and "vitals/v1/hub/time" in steps["clock"].detail
        # the hub publishes its time, retained: the offset is measured against it
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:
            await c.publish("vitals/v1/hub/time", f"{time.time() - 100:.3f}", qos=1, retain=True)
        steps = {s.name: s for s in await check_uplink(target, timeout_s=5)}
        assert steps["clock"].status == "fail"
        assert "local clock +10" in steps["clock"].detail  # ~ +100 s
    finally:
        await broker.stop()


async def test_refused_port_fails_tcp_and_skips_the_rest() -> None:
    steps = await check_uplink(UplinkConfig(host="127.0.0.1", port=free_port()), timeout_s=2)
    by = {s.name: s for s in steps}
    assert by["dns"].status == "pass"
    assert by["tcp"].status == "fail" and "refused" in by["tcp"].detail.lower()
    assert [by[n].status for n in ("tls", "mqtt", "round trip", "clock")] == ["skip"] * 4


async def test_unknown_host_fails_dns() -> None:
    steps = await check_uplink(UplinkConfig(host="no-such-host.invalid", port=1883), timeout_s=2)
    assert steps[0].name == "dns" and steps[0].status == "fail"
    assert all(s.status == "skip" for s in steps[1:])


@needs_mosquitto
async def test_clock_checked_against_a_running_hub(tmp_path: Path) -> None:
    """The reference hub publishes its time every second: the step passes on this machine."""
    broker = MosquittoBroker()
    await broker.start()
    core = HubCore(tmp_path / "hub.sqlite3")
    hub = asyncio.create_task(Hub(core, host="127.0.0.1", port=broker.port).run())
    try:
        target = UplinkConfig(host="127.0.0.1", port=broker.port, client_id="vitals-gw-2")
        await asyncio.sleep(0.5)
        steps = {s.name: s for s in await check_uplink(target, timeout_s=5)}
    finally:
        hub.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hub
        core.close()
        await broker.stop()
    assert steps["clock"].status == "pass", steps["clock"].detail
    assert "(live)" in steps["clock"].detail


# -- the command: exit codes, option names, what is printed -------------------------

runner = CliRunner()


@pytest.mark.parametrize("option", ["--tcp-port", "--port"])
def test_refused_endpoint_exits_3_with_a_hint(option: str) -> None:
    """The docs' table: 3 = the endpoint cannot be used (refused). --port is the old
    name of --tcp-port, still accepted."""
    r = runner.invoke(diag_app, ["uplink", "--host", "127.0.0.1", option, str(free_port())])
    assert r.exit_code == 3, r.output
    assert "Connection refused" in r.output and "hint: is the broker running" in r.output


def test_port_is_hidden_and_tcp_port_shown() -> None:
    import agent.cli.main  # noqa: F401  (the vitals CLI drops typer's <bool> on flags, for all)

    r = runner.invoke(diag_app, ["uplink", "--help"], env={"COLUMNS": "200"})
    options = re.findall(r"(?<![\w-])--[\w-]+", r.output)
    assert "--tcp-port" in options and "--port" not in options
    # a flag takes no value: no <bool> beside it
    assert "<bool>" not in r.output


def test_config_and_host_together_is_a_usage_error(tmp_path: Path) -> None:
    r = runner.invoke(diag_app, ["uplink", "--config", str(tmp_path / "gw.toml"), "--host", "h"])
    assert r.exit_code == 2, r.output
    assert "which one?" in r.output


def test_a_later_step_fails_exit_1_and_brackets_are_printed_as_is() -> None:
    """A TCP port that is not a broker: tcp passes, mqtt fails (exit 1); the tls step's
    reason names [uplink.tls], which rich markup used to swallow."""
    with socket.create_server(("127.0.0.1", 0)) as srv:  # accepts (backlog), never speaks MQTT
        port = srv.getsockname()[1]
        r = runner.invoke(
            diag_app, ["uplink", "--host", "127.0.0.1", "--tcp-port", str(port), "--timeout", "1"]
        )
    assert r.exit_code == 1, r.output
    assert "TLS not enabled in [uplink.tls]" in r.output
    assert "FAIL" in r.output and "hint: check username and password in [uplink]" in r.output


async def test_a_missing_tls_file_is_named_without_an_errno(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        tls = TlsConfig(enabled=True, ca_file=tmp_path / "ca.pem")
        target = UplinkConfig(host="127.0.0.1", port=srv.getsockname()[1], tls=tls)
        steps = {s.name: s for s in await check_uplink(target, timeout_s=2)}
    assert steps["tls"].status == "fail"
    assert steps["tls"].detail == f"[uplink.tls] ca_file {tmp_path / 'ca.pem'}: no such file"
    assert "[uplink.tls]" in steps["tls"].hint
    assert [steps[n].status for n in ("mqtt", "round trip", "clock")] == ["skip"] * 3


async def test_a_client_key_others_can_read_fails_as_it_fails_the_agent(tmp_path: Path) -> None:
    """The agent's own TLS context (agent.ops.tls): a client key readable by others is
    refused here as at the agent's start, before any handshake."""
    key = tmp_path / "client.key"
    key.write_text("not read: its mode is checked first\n")
    key.chmod(0o644)
    tls = TlsConfig(enabled=True, cert_file=tmp_path / "client.crt", key_file=key)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        target = UplinkConfig(host="127.0.0.1", port=srv.getsockname()[1], tls=tls)
        steps = {s.name: s for s in await check_uplink(target, timeout_s=2)}
    assert steps["tls"].status == "fail"
    assert f"chmod 600 {key}" in steps["tls"].detail
    assert [steps[n].status for n in ("mqtt", "round trip", "clock")] == ["skip"] * 3


@needs_mosquitto
def test_config_checks_the_gateways_own_connection(tmp_path: Path) -> None:
    """--config: the gateway's [uplink] as the agent reads it (its client id, with -diag-)."""
    broker = MosquittoBroker()
    asyncio.run(broker.start())
    try:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[gateway]\nid = "gw-diag"\nstate_dir = "{tmp_path}"\n\n'
            f'[uplink]\nhost = "127.0.0.1"\nport = {broker.port}\nclient_id = "cabinet-7"\n'
        )
        r = runner.invoke(diag_app, ["uplink", "--config", str(config), "--json"])
    finally:
        asyncio.run(broker.stop())
    assert r.exit_code == 0, r.output
    steps = {s["step"]: s for s in json.loads(r.output)["steps"]}
    assert steps["mqtt"]["status"] == "pass"
    assert steps["mqtt"]["detail"].startswith("connected as cabinet-7-diag-")
