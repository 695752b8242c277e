"""``vitals diag read`` against an emulated Modbus TCP terminal.

The terminal runs in its own event loop on a thread, so the command under
test (in CliRunner, or as a real process in a tmux terminal) can use its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli.diag import diag_app
from drivers.profiles import load_profile
from protocols.reading import Quality
from simulator.tcp import TcpTerminal
from tests.virtual_time import VirtualClock

runner = CliRunner()
VITALS_PY = [sys.executable, "-c", "from agent.cli.diag import diag_app; diag_app()"]


class ThreadedTerminal:
    """A TcpTerminal serving from a background thread's event loop."""

    def __init__(self, profile: str, *, max_connections: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.terminal = TcpTerminal(load_profile(profile), max_connections=max_connections)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> TcpTerminal:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.terminal.start(), self.loop).result(10)
        return self.terminal

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.terminal.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def terminal() -> Iterator[TcpTerminal]:
    with ThreadedTerminal("sound_level_meter") as t:
        yield t


def _args(t: TcpTerminal, *more: str) -> list[str]:
    return [
        "read",
        "--host",
        "127.0.0.1",
        "--tcp-port",
        str(t.port),
        "--profile",
        "sound_level_meter",
        *more,
    ]


def test_json_one_object_per_sample(terminal: TcpTerminal) -> None:
    r = runner.invoke(diag_app, _args(terminal, "--samples", "3", "--interval", "0.05", "--json"))
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 3
    samples = [json.loads(line) for line in lines]
    assert [s["sample"] for s in samples] == [1, 2, 3]
    laeq = samples[0]["points"]["laeq"]
    assert laeq["unit"] == "dB(A)"
    assert laeq["quality"] == "good"
    assert 20.0 <= laeq["value"] <= 140.0
    assert laeq["rtt_ms"] > 0
    assert set(samples[0]["points"]) == {p.name for p in terminal.profile.points}
    assert terminal.reads >= 3


def test_device_exception_is_comm_error_and_exit_1(terminal: TcpTerminal) -> None:
    terminal.exception = 4  # server device failure on every request
    r = runner.invoke(diag_app, _args(terminal, "--samples", "1", "--json"))
    assert r.exit_code == 1
    s = json.loads(r.output.strip().splitlines()[0])
    assert s["points"]["laeq"]["quality"] == "comm-error"
    assert "exception 04" in s["points"]["laeq"]["error"]


def test_device_from_the_gateway_config(terminal: TcpTerminal, tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        '[gateway]\nid = "gw-1"\n'
        f'[[buses]]\nname = "lan"\nkind = "tcp"\nhost = "127.0.0.1"\ntcp_port = {terminal.port}\n'
        '[[devices]]\nname = "noise-7"\nbus = "lan"\nprofile = "sound_level_meter"\nslave = 1\n'
    )
    r = runner.invoke(
        diag_app, ["read", "--device", "noise-7", "--config", str(cfg), "--samples", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["device"].startswith("noise-7 on 127.0.0.1:")
    r = runner.invoke(diag_app, ["read", "--device", "nope", "--config", str(cfg)])
    assert r.exit_code == 2
    assert "no device named 'nope'" in r.output and "noise-7" in r.output


def test_one_tcp_connection_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A meter with one connection slot: diag read must not open a test connection first."""
    import simulator.tcp

    accepted: list[object] = []
    made = simulator.tcp._Conn.connection_made

    def counting(self: simulator.tcp._Conn, transport: asyncio.BaseTransport) -> None:
        accepted.append(transport)
        made(self, transport)

    monkeypatch.setattr(simulator.tcp._Conn, "connection_made", counting)
    with ThreadedTerminal("sound_level_meter", max_connections=1) as t:
        r = runner.invoke(diag_app, _args(t, "--samples", "2", "--interval", "0.05", "--json"))
        refused = t.refused
    assert r.exit_code == 0, r.output
    assert len(accepted) == 1 and refused == 0
    assert [json.loads(line)["points"]["laeq"]["quality"] for line in r.output.splitlines()] == [
        "good",
        "good",
    ]


@pytest.fixture
def rtu_bus() -> Iterator[str]:
    """An emulated RTU bus (``vitals sim rtu``'s) at 19200 baud: its pty's path."""
    sim = pytest.importorskip("simulator.rtu", reason="simulator/rtu.py not in this tree")
    slave = sim.RtuSlave(load_profile("sound_level_meter"), 1)
    with sim.RtuBus([slave], baud=19200) as bus:
        yield bus.port


@pytest.mark.parametrize("command", ["read", "probe"])
def test_a_pty_refuses_parity_every_time(rtu_bus: str, command: str) -> None:
    """The default parity E on an emulated bus: one line and the way out, every time
    (the first attempt on a fresh pty used to end in a termios traceback)."""
    args = [command, "--port", rtu_bus, "--baud", "19200"]
    if command == "read":
        args += ["--profile", "sound_level_meter", "--samples", "1"]
    for _ in range(2):
        r = runner.invoke(diag_app, args)
        assert r.exit_code == 3, r.output
        assert f"{rtu_bus}: this port refuses parity E" in r.output
        assert "use --parity N" in r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)


@pytest.mark.parametrize("command", ["read", "probe"])
def test_a_held_port_is_refused_untouched(rtu_bus: str, command: str) -> None:
    from test_diag_scan import held_by_another_process

    args = [command, "--port", rtu_bus, "--baud", "19200", "--parity", "N"]
    if command == "read":
        args += ["--profile", "sound_level_meter", "--samples", "1"]
    with held_by_another_process(rtu_bus) as holder:
        r = runner.invoke(diag_app, args)
    assert r.exit_code == 3, r.output
    assert "port busy: held by python" in r.output and f"(PID {holder.pid})" in r.output
    assert "hint:" in r.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--port", "/dev/ttyNOPE-1", "--profile", "sound_level_meter"], 3, "no such port"),
        (
            ["--port", "/dev/null", "--parity", "N", "--profile", "sound_level_meter"],
            3,
            "/dev/null: not a serial port",
        ),
        (
            ["--port", "/dev/ttyS0", "--host", "127.0.0.1", "--profile", "sound_level_meter"],
            2,
            "which one?",
        ),
        (
            ["--port", "/dev/null", "--slave", "300", "--profile", "sound_level_meter"],
            2,
            "--slave 300: a slave address on a serial bus is 1..247",
        ),
        (
            ["--host", "127.0.0.1", "--slave", "256", "--profile", "sound_level_meter"],
            2,
            "--slave 256: a Modbus TCP unit id is 0..255",
        ),
        # 0 is checked, not taken for "not given"
        (["--port", "/dev/null", "--baud", "0", "--profile", "sound_level_meter"], 2, "--baud 0"),
        (
            ["--host", "127.0.0.1", "--timeout", "0", "--profile", "sound_level_meter"],
            2,
            "--timeout 0",
        ),
        (["--port", "/dev/null", "--slave", "0", "--profile", "sound_level_meter"], 2, "--slave 0"),
        (["--host", "nosuch.invalid", "--profile", "sound_level_meter"], 3, "unknown host"),
        (
            ["--host", "127.0.0.1", "--tcp-port", "1", "--profile", "sound_level_meter"],
            3,
            "connection refused",
        ),
        (["--port", "/dev/null", "--profile", "no_such_profile"], 2, "no such profile"),
        (["--profile", "sound_level_meter"], 2, "which port?"),
    ],
)
def test_technician_errors_are_one_line(args: list[str], code: int, message: str) -> None:
    r = runner.invoke(diag_app, ["read", *args, "--samples", "1"])
    assert r.exit_code == code, r.output
    assert message in r.output
    assert "hint:" in r.output
    assert "Traceback" not in r.output


# -- the live screen, in a real terminal ----------------------------------------------


def _tmux(sock: str, *args: str) -> str:
    return subprocess.run(
        ["tmux", "-L", sock, *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package)")
def test_live_table_in_a_real_terminal(terminal: TcpTerminal, tmp_path: Path) -> None:
    sock = f"vitals-test-{uuid.uuid4().hex[:8]}"
    cmd = " ".join(
        [
            *(f"'{a}'" for a in VITALS_PY),
            *_args(terminal, "--samples", "4", "--interval", "0.3"),
            f"; echo EXIT=$? > {tmp_path / 'rc'}; sleep 60",
        ]
    )
    env = {"TERM": "xterm-256color", "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    subprocess.run(
        [
            "tmux",
            "-L",
            sock,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "40",
            "-c",
            os.getcwd(),
            cmd,
        ],
        check=True,
        timeout=10,
        env=env,
    )
    try:
        screens: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            screen = _tmux(sock, "capture-pane", "-p", "-t", "0")
            screens.append(screen)
            if (tmp_path / "rc").exists():
                break
            time.sleep(0.1)
        screen = _tmux(sock, "capture-pane", "-p", "-t", "0")
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], timeout=10, check=False)
    assert (tmp_path / "rc").read_text().strip() == "EXIT=0", screen
    # the header names the device, profile and the last sample of 4
    assert f"127.0.0.1:{terminal.port}" in screen
    assert "profile sound_level_meter (VX-SLM-1)" in screen
    assert "sample 4/4" in screen
    # the live view redrew in place: intermediate samples were on screen at some point
    assert any("sample 2/4" in s or "sample 3/4" in s for s in screens)
    # one table, drawn once (Live redraws in place, it does not scroll copies)
    assert screen.count("┃ point") == 1
    rows = {
        line.split("│")[1].strip(): line for line in screen.splitlines() if line.count("│") >= 6
    }
    assert set(rows) == {p.name for p in terminal.profile.points}
    laeq = [c.strip() for c in rows["laeq"].split("│")]
    assert laeq[3] == "dB(A)" and laeq[4] == "good"
    assert 20.0 <= float(laeq[2]) <= 140.0
    assert float(laeq[5]) > 0
    assert "valid 20..140" in rows["laeq"]
    assert [c.strip() for c in rows["overload"].split("│")][2] in ("on", "off")


@pytest.mark.virtual_time
async def test_a_link_that_never_answers_cannot_hang_a_sample(virtual_clock: VirtualClock) -> None:
    """A link whose read never ends (the timerfd fault once made diag read hang for
    10 minutes): the sample ends as comm-error after 3 link timeouts + 2 s, the link
    is closed to start afresh, and the rest is not tried."""
    from agent.cli.diag.read import read_sample
    from protocols.modbus import plan

    class StuckLink:
        timeout_s = 0.5
        describe = "stuck"
        closed = False

        async def read(self, *args: object) -> list[int]:
            await asyncio.sleep(3600)
            return []

        def close(self) -> None:
            self.closed = True

    prof = load_profile("sound_level_meter")
    link = StuckLink()
    requests = plan(prof.specs, max_registers=prof.max_registers, max_gap=prof.max_gap)
    t0 = virtual_clock.monotonic()
    sample = await read_sample(link, 1, prof, requests, 1)  # type: ignore[arg-type]
    assert virtual_clock.monotonic() - t0 == 3 * 0.5 + 2
    assert not sample.answered and link.closed
    assert {p.quality for p in sample.points} == {Quality.COMM_ERROR}
    assert len(sample.points) == len(prof.points)
