"""The hub's Prometheus endpoint, scraped over HTTP from a live ``vitals hub``."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from protocols import ed25519, envelope, topics
from protocols.reading import Quality, Reading
from simulator.broker import MosquittoBroker

pytest.importorskip("prometheus_client", reason="the metrics need prometheus-client (hub extra)")
aiomqtt = pytest.importorskip("aiomqtt", reason="the hub needs aiomqtt (the hub extra)")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

VITALS = [sys.executable, "-m", "agent"]
GW = "gw-metrics-1"


def _batch(key: ed25519.PrivateKey, seq: int, n: int = 4, age_s: float = 3.0) -> bytes:
    t1 = time.time_ns() // 1_000_000 - int(age_s * 1000)
    readings = [Reading(1, t1 - n + 1 + i, float(i), Quality.GOOD) for i in range(n)]
    return envelope.seal(readings, gateway=GW, epoch=1, seq=seq, key=key)


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _text(log: Path) -> str:
    return log.read_text()


async def _wait_for(pattern: str, log: Path, within: float = 20.0) -> re.Match[str]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        m = re.search(pattern, _text(log))
        if m:
            return m
        await asyncio.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in the hub's log:\n{_text(log)}")


@pytest.mark.mosquitto
async def test_metrics_over_http(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    key = ed25519.PrivateKey.generate()
    pub = key.public_key().public_bytes_raw().hex()
    log = tmp_path / "hub.log"
    with log.open("wb") as out:
        hub = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec
            [
                *VITALS,
                "hub",
                "--db",
                str(tmp_path / "hub.sqlite3"),
                "--broker",
                f"{mosquitto.host}:{mosquitto.port}",
                "--trust",
                f"{GW}={pub}",
                "--metrics-port",
                "0",
            ],
            stdout=out,
            stderr=out,
        )
    try:
        m = await _wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log)
        url = f"http://127.0.0.1:{m.group(1)}/metrics"
        await _wait_for("hub worker on the broker", log)  # logged once subscribed
        before = await asyncio.to_thread(_scrape, url)
        assert before[("vitals_hub_batches_stored_total", ())] == 0
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
            topic = topics.batch(GW)
            for seq in (0, 1, 3):  # seq 2 never comes: one missing
                await c.publish(topic, _batch(key, seq), qos=1)
            await c.publish(topic, _batch(key, 1), qos=1)  # again: a duplicate
            forged = _batch(ed25519.PrivateKey.generate(), 4)
            await c.publish(topic, forged, qos=1)  # another key: refused
            await c.publish(topics.enroll(GW), b"not a request", qos=1)  # refused too

        def done() -> bool:
            got = _scrape(url)
            return (
                got[("vitals_hub_duplicates_total", ())] >= 1
                and (
                    "vitals_hub_enrollments_total",
                    (("status", "malformed"),),
                )
                in got
            )

        deadline = time.monotonic() + 20
        while not await asyncio.to_thread(done):
            assert time.monotonic() < deadline, await asyncio.to_thread(_scrape, url)
            await asyncio.sleep(0.1)
        got = await asyncio.to_thread(_scrape, url)
        assert got[("vitals_hub_batches_stored_total", ())] == 3
        assert got[("vitals_hub_readings_stored_total", ())] == 12
        assert got[("vitals_hub_duplicates_total", ())] == 1
        assert got[("vitals_hub_refused_total", (("reason", "unknown_key"),))] == 1
        assert got[("vitals_hub_enrollments_total", (("status", "malformed"),))] == 1
        assert got[("vitals_hub_missing_batches", (("gateway", GW),))] == 1
        assert got[("vitals_hub_broker_connected", ())] == 1
        assert got[("vitals_hub_lag_seconds_count", ())] == 3
        # written about 3 s after their last reading
        assert got[("vitals_hub_lag_seconds_bucket", (("le", "2.0"),))] == 0
        assert got[("vitals_hub_lag_seconds_bucket", (("le", "10.0"),))] == 3
        newest = got[("vitals_hub_gateway_last_batch_timestamp_seconds", (("gateway", GW),))]
        assert abs(newest - (time.time() - 3)) < 30
        # anything but /metrics is a 404
        with pytest.raises(urllib.error.HTTPError, match="404"):
            await asyncio.to_thread(urllib.request.urlopen, url.replace("/metrics", "/x"), None, 10)
    finally:
        hub.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(hub.wait, 15) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [*VITALS, "hub", "--db", str(tmp_path / "h.sqlite3"), "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if not line[:4].isdigit()]  # not log lines
    assert err[0].startswith(f"error: --metrics-port {port} on 127.0.0.1:"), r.stderr
    assert err[1].startswith("hint: "), r.stderr
