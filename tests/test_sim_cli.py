"""``vitals sim ...`` as a user runs it: the installed command in a subprocess.

A mistake on the command line is one ``error:`` line and one ``hint:`` line with
exit 2 (a usage error), never a traceback; a good command line starts the emulator.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from test_cli import VITALS, assert_one_error, vitals

pytestmark = pytest.mark.skipif(
    not VITALS.exists(), reason=f"the installed CLI is not at {VITALS} (pip install -e .)"
)

MISTAKES = [
    (["sim", "rtu", "--profile", "nosuch"], ["no profile 'nosuch'", "choose from", "rain_gauge"]),
    (["sim", "rtu", "--device", "3=nosuch"], ["'3=nosuch'", "choose from"]),
    (["sim", "rtu", "--device", "3"], ["SLAVE=PROFILE"]),
    (["sim", "rtu", "--device", "=rain_gauge"], ["1..247"]),
    (["sim", "rtu", "--device", "300=rain_gauge"], ["'300=rain_gauge'", "1..247"]),
    (["sim", "rtu", "--device", "0=rain_gauge"], ["1..247"]),
    (["sim", "rtu", "--device", "3=pms5003"], ["serial sensor", "choose from"]),
    (["sim", "rtu", "--device", "3=rain_gauge", "--device", "3=pump_meter"], ["twice"]),
    (["sim", "rtu", "--profile", "rain_gauge", "--fault", "9:silent"], ["no terminal at slave 9"]),
    (["sim", "rtu", "--fault", "1:explode"], ["no fault 'explode'", "silent"]),
    (["sim", "rtu", "--fault", "1:late=soon"], ["not a number"]),
    (["sim", "tcp", "--profile", "nosuch"], ["no profile 'nosuch'", "choose from"]),
    (["sim", "tcp", "--profile", "gps_nmea"], ["serial sensor"]),
    (["sim", "firmware", "--profile", "weather_station"], ["sound_level_meter"]),
    (["sim", "fleet", "--scenario", "nosuch"], ["no such scenario", "steady"]),
    (["sim", "fleet", "--broker", "rabbit"], ["auto, mosquitto, embedded"]),
    # refused by typer itself, reported the same way
    (["sim", "rtu", "--baud", "0"], ["--baud", "'vitals sim rtu --help'"]),
    (["sim", "rtu", "--bogus"], ["--bogus"]),
    (["sim", "firmware", "--slave", "248"], ["--slave"]),
]


@pytest.mark.parametrize(("args", "fragments"), MISTAKES, ids=lambda v: " ".join(v))
def test_a_mistake_is_one_line_and_a_hint(args: list[str], fragments: list[str]) -> None:
    assert_one_error(vitals(*args), 2, *fragments)


@pytest.mark.parametrize("module", ["simulator.rtu", "simulator.firmware", "simulator.fleet"])
def test_python_m_simulator_parses_as_vitals_sim(module: str) -> None:
    bad = {
        "simulator.rtu": ["--device", "300=rain_gauge"],
        "simulator.firmware": ["--profile", "rain_gauge"],
        "simulator.fleet": ["--scenario", "nosuch"],
    }[module]
    r = subprocess.run(
        [sys.executable, "-m", module, *bad], capture_output=True, text=True, check=False
    )
    assert_one_error(r, 2)


def test_sim_rtu_serves_the_highest_address_and_reports_at_the_end() -> None:
    r = vitals(
        "sim", "rtu", "--device", "247=rain_gauge", "--device", "1=sound_level_meter",
        "--fault", "1:silent", "--duration", "0.3",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("/dev/")
    stats = json.loads(lines[-1])
    assert set(stats["slaves"]) == {"1", "247"}
    assert stats["slaves"]["1"]["fault"] == "silent"


def test_sim_tcp_prints_its_terminals_and_stops_on_ctrl_c() -> None:
    with subprocess.Popen(
        [str(VITALS), "sim", "tcp", "--profile", "rain_gauge", "--profile", "pump_meter"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            first, second = proc.stdout.readline(), proc.stdout.readline()
            assert first.startswith("rain_gauge 127.0.0.1:"), first
            assert second.startswith("pump_meter 127.0.0.1:"), second
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
            assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
