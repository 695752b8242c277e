"""Fault: serial ports that go away, never were, refuse their settings or are held.

Issue 12 item 4: a port lost while the agent waited on it ended in
``ValueError: Invalid file descriptor: -1`` from the timer, exit 1; parity E
on a port that refuses it, an uncaught ``termios.error`` after 0 polls.
Item 5: nothing locked the port.

Each test runs the real agent (``agent.service.Agent``, no broker: the uplink
just retries) with two RTU buses on real ptys: ``good`` on an emulated bus
(``simulator.rtu``) and ``bad`` with the fault. Each asserts that the agent is
alive, that ``good`` keeps being polled (poll counts, no clock), and that the
status and the log say what happened to ``bad``, with the reason, in one
WARNING line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.fieldbus.rtu import Timer
from agent.ops.config import load_config
from agent.ops.state import create_identity
from agent.ops.status import build_status
from agent.service import Agent
from drivers.profiles import load_profile
from simulator.broker import free_port
from simulator.rtu import RtuBus, RtuSlave

SLM = load_profile("sound_level_meter")


@dataclass
class Running:
    agent: Agent
    task: asyncio.Task[None]

    def polls(self, bus: str) -> int:
        return sum(d.polls for p in self.agent.pollers if p.name == bus for d in p.devices)

    def status(self, bus: str) -> dict[str, Any]:
        doc: dict[str, Any] = build_status(self.agent)
        bus_doc: dict[str, Any] = doc["buses"][bus]
        return bus_doc

    def alive(self) -> bool:
        return not self.task.done()

    async def until(self, what: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Wait for ``what`` (a safety limit only: nothing here measures time)."""
        deadline = time.monotonic() + timeout_s
        while not what():
            assert self.alive(), "the agent stopped"
            assert time.monotonic() < deadline, "gave up waiting"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def agent_with(tmp_path: Path, bad_port: str, *, parity: str = "N") -> AsyncIterator[Running]:
    with RtuBus([RtuSlave(SLM, slave=1)], baud=115200) as good:
        cfg_file = tmp_path / "gw.toml"
        bus = '[[buses]]\nname = "{}"\nkind = "rtu"\nport = "{}"\nbaud = 115200\nparity = "{}"\n'
        dev = (
            '[[devices]]\nname = "{0}-1"\nbus = "{0}"\nprofile = "sound_level_meter"\n'
            "slave = 1\ninterval_s = 0.1\n"
        )
        cfg_file.write_text(
            f'[gateway]\nid = "gw-serial"\nstate_dir = "{tmp_path / "state"}"\n'
            f"[uplink]\nport = {free_port()}\n"  # no broker: the uplink keeps retrying
            + bus.format("good", good.port, "N")
            + bus.format("bad", bad_port, parity)
            + dev.format("good")
            + dev.format("bad")
        )
        cfg = load_config(cfg_file)
        create_identity(cfg.gateway.state_dir)
        agent = Agent(cfg, drain_timeout_s=0.1)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await agent.ready.wait()
        try:
            yield Running(agent, task)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


def _warnings(caplog: pytest.LogCaptureFixture, bus: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"bus {bus} offline")
    ]


async def test_pty_that_disappears_mid_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The other end of the pty closes (as a USB adapter pulled out: EIO, then no
    device node): the bus goes offline with the reason, the agent carries on.

    The agent's port is a link to the pty, removed with it as udev removes an
    adapter's names: a freed /dev/pts number is soon another test's pty on a busy
    machine, and the agent would open that one."""
    caplog.set_level(logging.INFO)
    bad = RtuBus([RtuSlave(SLM, slave=1)], baud=115200).start()
    port = tmp_path / "ttyUSB0"
    port.symlink_to(bad.port)
    try:
        async with agent_with(tmp_path, str(port)) as run:
            await run.until(lambda: run.polls("bad") >= 3 and run.polls("good") >= 3)
            assert run.status("bad")["state"] == "online"
            bad.stop()  # the master side closes: the pty is gone
            port.unlink()  # and its name
            await run.until(lambda: run.status("bad")["state"] == "offline")
            lost = run.status("bad")
            good_then = run.polls("good")
            await run.until(lambda: run.polls("good") >= good_then + 10)
            # the loss first (EIO or a hang-up), then, while it stays gone, the missing port
            await run.until(lambda: "no such port" in run.status("bad")["last_error"])
            bad_status = run.status("bad")
            assert run.alive()
    finally:
        bad.stop()
    assert "port lost" in lost["last_error"]
    assert bad_status["devices"]["bad-1"]["state"] in ("degraded", "offline")
    assert bad_status["link_downs"] == 1
    (warning,) = _warnings(caplog, "bad")
    assert "port lost" in warning and "Errno" not in warning


async def test_port_that_does_not_exist_then_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Configured before the adapter is plugged in: offline, "no such port", one
    WARNING; once the port appears, the bus comes online by itself."""
    caplog.set_level(logging.INFO)
    port = tmp_path / "ttyUSB0"  # a symlink to a pty, later: udev's by-id names are too
    async with agent_with(tmp_path, str(port)) as run:
        await run.until(lambda: run.status("bad")["state"] == "offline" and run.polls("good") >= 5)
        missing = run.status("bad")
        with RtuBus([RtuSlave(SLM, slave=1)], baud=115200) as plugged:
            port.symlink_to(plugged.port)
            await run.until(lambda: run.status("bad")["devices"]["bad-1"]["state"] == "online")
            back = run.status("bad")
            assert run.alive()
    assert "no such port" in missing["last_error"]
    assert missing["devices"]["bad-1"]["state"] in ("degraded", "offline")
    assert back["state"] == "online" and back["last_error"] == ""
    assert len(_warnings(caplog, "bad")) == 1
    assert any(r.getMessage().startswith("bus bad online again") for r in caplog.records)


async def test_parity_the_port_refuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """parity = "E" on a pty, which refuses parity bits (EINVAL from tcsetattr on
    some kernels, silently dropped on others): offline with the reason, not a crash."""
    caplog.set_level(logging.INFO)
    with RtuBus([RtuSlave(SLM, slave=1)], baud=115200) as bad:
        async with agent_with(tmp_path, bad.port, parity="E") as run:
            await run.until(lambda: run.status("bad")["state"] == "offline")
            good_then = run.polls("good")
            await run.until(lambda: run.polls("good") >= good_then + 10)
            status = run.status("bad")
            assert run.alive()
    assert "refused parity E" in status["last_error"]
    assert status["devices"]["bad-1"]["polls_failed"] == status["devices"]["bad-1"]["polls"]
    assert bad.requests == 0  # never talked on a line it could not set up
    assert len(_warnings(caplog, "bad")) == 1


async def test_port_held_by_another_program(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another program holds the port (flock, as pyserial's exclusive=True and
    ``vitals diag`` take it): "port busy" with its PID, and the agent never
    touches the line; once released, the bus comes online."""
    caplog.set_level(logging.INFO)
    with RtuBus([RtuSlave(SLM, slave=1)], baud=115200) as bad:
        holder = os.open(bad.port, os.O_RDWR | os.O_NOCTTY)
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            async with agent_with(tmp_path, bad.port) as run:
                await run.until(lambda: run.status("bad")["state"] == "offline")
                busy = run.status("bad")
                assert bad.requests == 0
                os.close(holder)
                holder = -1
                await run.until(lambda: run.status("bad")["devices"]["bad-1"]["state"] == "online")
                assert run.polls("good") > 0 and run.alive()
        finally:
            if holder >= 0:
                os.close(holder)
    assert "port busy" in busy["last_error"]
    assert f"(PID {os.getpid()})" in busy["last_error"]
    assert len(_warnings(caplog, "bad")) == 1


async def test_the_agent_holds_its_ports_exclusively(tmp_path: Path) -> None:
    """While the agent polls a port, nobody else can take its lock."""
    with RtuBus([RtuSlave(SLM, slave=1)], baud=115200) as bad:
        async with agent_with(tmp_path, bad.port) as run:
            await run.until(lambda: run.polls("bad") >= 2)
            other = os.open(bad.port, os.O_RDWR | os.O_NOCTTY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(other)


async def test_timer_closed_while_it_sleeps() -> None:
    """The port was lost (and the link closed its timer) while the RTU master
    slept on the timerfd: the sleep ends normally, the fd is released after it."""
    timer = Timer()
    if timer._fd < 0:
        pytest.skip("no timerfd on this system: the timer falls back to asyncio.sleep")
    sleep = asyncio.create_task(timer.sleep_until(time.monotonic() + 0.02))
    await asyncio.sleep(0)  # the sleep is on the timerfd now
    timer.close()
    # before the fix: ValueError: Invalid file descriptor: -1, or a sleep that never ends
    await asyncio.wait_for(sleep, 5)
    assert timer._fd == -1
