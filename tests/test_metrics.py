"""The gateway's Prometheus endpoint, scraped over HTTP while faults are injected.

A real agent (in this event loop) polls an emulated Modbus TCP terminal on a
real socket; its uplink points at a port where no broker listens (so the spool
fills). The endpoint is scraped with a plain HTTP client and parsed by
prometheus-client's own parser. The terminal then answers garbage, and then
nothing: the bad-frame, timeout and failed-poll counters move, the device's
state follows, the reply-time histogram counts the replies and not the
timeouts, the spool's depth and oldest age show. Off by default, and the
configuration refuses a non-loopback address unless told.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.ops.config import parse_config
from agent.ops.state import create_identity, save_hub_key
from agent.service import Agent
from drivers.profiles import load_profile
from protocols.ed25519 import PrivateKey
from protocols.errors import ConfigError
from simulator.broker import MosquittoBroker, free_port
from simulator.tcp import TcpTerminal

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
TCP = (("protocol", "tcp"),)


def _histogram(s: Samples, name: str, labels: tuple[tuple[str, str], ...]) -> list[float]:
    """The cumulative bucket counts of a histogram, by ascending bound (+Inf last)."""
    buckets = [
        (float(dict(ls)["le"]), v)
        for (n, ls), v in s.items()
        if n == f"{name}_bucket" and tuple(kv for kv in ls if kv[0] != "le") == labels
    ]
    return [v for _, v in sorted(buckets)]


def _scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        ctype = r.headers["Content-Type"]
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return ctype, out


def _config(tmp_path: Path, term_port: int, metrics: dict[str, object]) -> dict[str, object]:
    return {
        "gateway": {"id": "gw-metrics-1", "state_dir": str(tmp_path / "gw")},
        "uplink": {"host": "127.0.0.1", "port": free_port()},  # no broker there
        "batch": {"max_age_s": 0.2},
        "buses": [
            {
                "name": "tcp-1",
                "kind": "tcp",
                "host": "127.0.0.1",
                "tcp_port": term_port,
                "timeout_s": 0.2,
            }
        ],
        "devices": [
            {"name": "noise-1", "bus": "tcp-1", "profile": "sound_level_meter", "slave": 1}
            | {"interval_s": 0.1}
        ],
        "metrics": metrics,
    }


async def test_scraped_counters_move_with_garbage_and_silence(tmp_path: Path) -> None:
    term = TcpTerminal(load_profile("sound_level_meter"))
    await term.start()
    port = free_port()
    cfg = parse_config(
        _config(tmp_path, term.port, {"listen": f"127.0.0.1:{port}"}),
        source="<metrics test>",
        base=tmp_path,
    )
    ident = create_identity(cfg.gateway.state_dir)
    agent = Agent(cfg, identity=ident, drain_timeout_s=0.5)
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    bus, dev = (("bus", "tcp-1"),), (("bus", "tcp-1"), ("device", "noise-1"))
    try:
        await asyncio.wait_for(agent.ready.wait(), 10)

        async def scrape() -> Samples:
            ctype, samples = await asyncio.to_thread(_scrape, port)
            assert ctype.startswith("text/plain; version=")
            return samples

        async def scrape_until(cond: Callable[[Samples], bool], what: str) -> Samples:
            """Scrape until ``cond`` holds of what the endpoint says (fail naming ``what``)."""
            for _ in range(300):
                try:
                    samples = await scrape()
                except OSError:  # not listening yet: the server starts with the agent
                    await asyncio.sleep(0.1)
                    continue
                if cond(samples):
                    return samples
                await asyncio.sleep(0.1)
            pytest.fail(f"not within 30 s: {what}")

        def value(name: str, labels: tuple[tuple[str, str], ...]) -> Callable[[Samples], float]:
            return lambda s: s.get((name, labels), 0.0)

        polls = value("vitals_device_polls_total", dev)
        seen = await scrape_until(lambda s: polls(s) >= 5, "five polls")
        assert seen[("vitals_device_state", (*dev, ("state", "online")))] == 1.0
        assert seen[("vitals_device_state", (*dev, ("state", "offline")))] == 0.0
        assert seen[("vitals_bus_online", bus)] == 1.0
        assert seen[("vitals_uplink_connected", ())] == 0.0
        assert seen[("vitals_clock_synced", ())] in (0.0, 1.0)
        assert seen[("vitals_clock_jumps_total", ())] >= 0
        assert 0 < seen[("vitals_device_reply_seconds", dev)] < 1.0
        # the reply-time histogram (per protocol): cumulative, every reply in it
        name = "vitals_modbus_reply_seconds"
        buckets = _histogram(seen, name, TCP)
        assert len(buckets) == 11 and buckets == sorted(buckets)
        assert buckets[-1] == seen[(f"{name}_count", TCP)] >= 5
        assert 0 < seen[(f"{name}_sum", TCP)] < 0.2 * buckets[-1]  # under the timeout
        bad0 = seen.get(("vitals_bus_bad_frames_total", bus), 0.0)
        timeouts0 = seen.get(("vitals_bus_timeouts_total", bus), 0.0)
        failed0 = seen.get(("vitals_device_polls_failed_total", dev), 0.0)

        bad, timeouts = (
            value("vitals_bus_bad_frames_total", bus),
            value("vitals_bus_timeouts_total", bus),
        )
        failed = value("vitals_device_polls_failed_total", dev)
        term.fault = "garbage"
        garbage = await scrape_until(
            lambda s: bad(s) > bad0 and failed(s) > failed0,
            "bad frames and failed polls counted while the terminal answers garbage",
        )
        term.fault, term.dead = None, True
        silent = await scrape_until(
            lambda s: timeouts(s) > timeouts0 and failed(s) > failed(garbage),
            "timeouts and failed polls counted while the terminal is silent",
        )
        assert silent[("vitals_device_state", (*dev, ("state", "online")))] == 0.0
        # timeouts go on; the histogram counts replies only
        replies = silent[(f"{name}_count", TCP)]
        later = await scrape_until(
            lambda s: timeouts(s) > timeouts(silent), "more timeouts while silent"
        )
        assert later[(f"{name}_count", TCP)] == replies
        assert _histogram(later, name, TCP)[-1] == replies
        # nothing reaches a broker: the spool holds it, and says how old it is
        assert silent[("vitals_spool_batches", ())] > 0
        assert silent[("vitals_spool_bytes", ())] > 0
        assert silent[("vitals_spool_oldest_age_seconds", ())] >= 0
        assert silent[("vitals_spool_dropped_batches_total", (("reason", "too_old"),))] == 0
        # the broker never had them: none waits for a hub receipt
        assert silent[("vitals_spool_unconfirmed_batches", ())] == 0
        assert silent[("vitals_spool_confirmed_batches_total", ())] == 0
        # cardinality: only configured names as label values
        labels = {v for _, ls in silent for k, v in ls if k in ("bus", "device", "protocol")}
        assert labels == {"tcp-1", "noise-1", "tcp"}
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        await term.stop()


async def test_off_by_default_and_bound_to_loopback(tmp_path: Path) -> None:
    cfg = parse_config(_config(tmp_path, 1502, {}), source="gw.toml", base=tmp_path)
    assert cfg.metrics.listen == ""
    with pytest.raises(ConfigError, match=r"metrics\.listen: 0\.0\.0\.0 is not a loopback"):
        parse_config(
            _config(tmp_path, 1502, {"listen": "0.0.0.0:9108"}), source="gw.toml", base=tmp_path
        )
    remote = parse_config(
        _config(tmp_path, 1502, {"listen": "0.0.0.0:9108", "allow_remote": True}),
        source="gw.toml",
        base=tmp_path,
    )
    assert (remote.metrics.host, remote.metrics.port) == ("0.0.0.0", 9108)
    with pytest.raises(ConfigError, match=r"metrics\.listen: 'localhost' is not host:port"):
        parse_config(
            _config(tmp_path, 1502, {"listen": "localhost"}), source="gw.toml", base=tmp_path
        )


def test_the_agent_without_metrics_does_not_import_prometheus_client() -> None:
    import subprocess
    import sys

    code = "import sys, agent.runner, agent.service; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reply_histogram_sums_the_buses_of_each_protocol() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from agent.fieldbus.poller import REPLY_BUCKETS_S, _bucket
    from agent.ops.metrics import render

    # a bucket holds the replies up to its bound, inclusive (Prometheus' le)
    assert [_bucket(t) for t in (0.0, 0.002, 0.0021, 2.0, 30.0)] == [0, 0, 1, 9, 10]
    n = len(REPLY_BUCKETS_S) + 1

    def bus(kind: str, counts: list[int], total_s: float) -> dict[str, object]:
        return {"kind": kind, "reply_counts": counts, "reply_sum_s": total_s, "devices": {}}

    stats = {
        "uptime_s": 1.0,
        "epoch": 1,
        "buses": {
            "rs485-1": bus("rtu", [0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 1], 3.1),
            "rs485-2": bus("rtu", [0] * 4 + [5] + [0] * 6, 0.2),
            "meter": bus("tcp", [7] + [0] * (n - 1), 0.007),
        },
    }
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(render(stats).decode())
        for s in fam.samples
    }
    rtu = (("protocol", "rtu"),)
    assert _histogram(samples, "vitals_modbus_reply_seconds", rtu) == [
        0.0,
        0.0,
        0.0,
        1.0,
        8.0,
        8.0,
        8.0,
        8.0,
        8.0,
        8.0,
        9.0,
    ]
    assert samples[("vitals_modbus_reply_seconds_count", rtu)] == 9.0
    assert samples[("vitals_modbus_reply_seconds_sum", rtu)] == pytest.approx(3.3)
    assert _histogram(samples, "vitals_modbus_reply_seconds", TCP) == [7.0] * n


@pytest.mark.mosquitto
async def test_batches_the_broker_has_wait_for_the_hubs_receipt(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """Receipts on (the gateway knows a hub key) and no hub: the broker acknowledges
    every batch, none is confirmed, and the endpoint says how many wait."""
    term = TcpTerminal(load_profile("sound_level_meter"))
    await term.start()
    port = free_port()
    raw = _config(tmp_path, term.port, {"listen": f"127.0.0.1:{port}"})
    raw["uplink"] = {"host": mosquitto.host, "port": mosquitto.port}
    cfg = parse_config(raw, source="<metrics test>", base=tmp_path)
    ident = create_identity(cfg.gateway.state_dir)
    hub = PrivateKey.from_private_bytes(bytes(range(40, 72)))
    save_hub_key(cfg.gateway.state_dir, hub.public_key().public_bytes_raw())
    agent = Agent(cfg, identity=ident, drain_timeout_s=0.5)
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.ready.wait(), 10)
        for _ in range(300):
            try:
                _, s = await asyncio.to_thread(_scrape, port)
            except OSError:  # not listening yet
                s = {}
            if s.get(("vitals_spool_unconfirmed_batches", ()), 0) >= 2:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("no batch waiting for a receipt within 30 s")
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        await term.stop()
    assert s[("vitals_uplink_connected", ())] == 1.0
    assert s[("vitals_spool_sent_batches_total", ())] >= 2
    assert s[("vitals_spool_confirmed_batches_total", ())] == 0
