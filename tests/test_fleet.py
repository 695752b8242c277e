"""CI's small fleet: real agent processes, emulated terminals, Mosquitto and the hub.

Five gateways x four terminals for 20 s must lose nothing and duplicate
nothing; a small typhoon must raise its events at every gateway it crosses.
Each runs ``python -m simulator.fleet --json`` as CI would, and checks its
exit status and report. No timing assertions: latency is reported, not judged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulator.broker import mosquitto_path

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto")


def fleet(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "simulator.fleet", "--json", "--workdir", str(tmp_path), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert proc.stdout, proc.stderr.decode()[-3000:]
    return proc.returncode, json.loads(proc.stdout)


def test_small_fleet_loses_nothing(tmp_path: Path) -> None:
    code, rep = fleet(tmp_path, "--gateways", "5", "--terminals", "4", "--duration", "20")
    total = rep["total"]
    assert code == 0, json.dumps(total)
    assert rep["ok"] is True
    assert len(rep["gateways"]) == 5
    assert total["lost_batches"] == 0
    assert total["duplicated"] == 0
    assert total["spool_left"] == 0
    assert total["rejected"] == 0
    # every gateway sealed batches and the hub has every one of them
    for g in rep["gateways"]:
        assert g["exit_code"] == 0
        assert g["sealed_batches"] > 0
        assert g["delivered_batches"] == g["sealed_batches"]
        assert g["delivered"] > 0
        assert g["peak_rss_mib"] > 0 and g["cpu_s"] > 0
    # the terminals' side agrees: what they served reached the hub as good readings
    assert total["generated"] > 0
    assert total["delivered_values"] + total["unanswered"] >= total["generated"]
    assert total["latency"]["p99_ms"] >= total["latency"]["p50_ms"] > 0


def test_small_typhoon_raises_events_everywhere(tmp_path: Path) -> None:
    code, rep = fleet(
        tmp_path,
        "--gateways", "3", "--terminals", "4", "--duration", "20", "--scenario", "typhoon",
    )  # fmt: skip
    assert code == 0, json.dumps(rep["total"])
    events = rep["events"]
    fired = {(e["gateway"], e["rule"]) for e in events if e["state"] == "fired"}
    for g in range(3):
        gw = f"fleet-gw-{g:03d}"
        assert (gw, "heavy-rain") in fired, events
        assert (gw, "gale") in fired, events
    # the storm reaches gateway 0 before gateway 2
    first = {
        e["gateway"]: e["ts"]
        for e in reversed(events)
        if e["rule"] == "heavy-rain" and e["state"] == "fired"
    }
    assert first["fleet-gw-000"] < first["fleet-gw-002"]
    # what fired on a live terminal also cleared as the storm moved on
    cleared = {(e["gateway"], e["device"]) for e in events if e["state"] == "cleared"}
    assert any(gw == "fleet-gw-002" for gw, _ in cleared)
