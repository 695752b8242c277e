"""The hub operator's journey: run the hub, issue a token, see the gateway arrive.

Through the installed ``vitals`` in subprocesses, against a real Mosquitto:
``vitals hub`` runs; ``vitals hub token`` issues a one-time token; a
technician provisions a gateway with it; ``vitals hub stats`` shows the
gateway as soon as it is enrolled, then with its batches once its agent runs;
the same token a second time is refused with a hint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from journeys.conftest import run, start, wait_for, wait_subscribed

from simulator.broker import MosquittoBroker

GW = "gw-0007"

TEMPLATE = """\
[gateway]
id = "${gateway_id}"
state_dir = "${state_dir}"

[uplink]
host = "${broker_host}"
port = ${broker_port}
${tls}
[batch]
max_age_s = 1

[[buses]]
name = "tcp-1"
kind = "tcp"
host = "127.0.0.1"
tcp_port = @PORT@

[[devices]]
name = "noise-1"
bus = "tcp-1"
profile = "sound_level_meter"
slave = 1
"""


def _stats(hub_dir: Path) -> dict[str, object]:
    res = run("hub", "--db", "hub.sqlite3", "stats", "--json", cwd=hub_dir)
    doc = json.loads(res.out)
    assert isinstance(doc, dict)
    return doc


def test_hub_token_provision_stats(journey_broker: MosquittoBroker, tmp_path: Path) -> None:
    hub_dir, gw_dir, logs = tmp_path / "hub", tmp_path / "gw", tmp_path / "logs"
    hub_dir.mkdir()
    gw_dir.mkdir()
    addr = f"{journey_broker.host}:{journey_broker.port}"
    hub = start("hub", "--db", "hub.sqlite3", "--broker", addr, logs=logs, cwd=hub_dir)
    term = start("sim", "tcp", "--profile", "sound_level_meter", logs=logs)
    agent = None
    try:
        wait_subscribed(journey_broker, "vitals/v1/enroll/+")
        # the operator issues a token for the gateway the technician will install
        issued = run("hub", "--db", "hub.sqlite3", "token", GW, cwd=hub_dir)
        token = issued.out.strip()
        assert re.fullmatch(r"[a-z2-7]+\.[0-9a-f]{16}", token), issued
        assert f"once, for {GW}" in issued.err

        # a typo in the gateway id: refused by the hub, with what to check; nothing kept
        typo = run(
            "provision", "--token", token, "--gateway-id", "gw-0070", "--broker", addr,
            "--config", gw_dir / "gateway.toml", "--state-dir", gw_dir / "state",
            expect=1,
        )  # fmt: skip
        assert "bad_token" in typo.err and "hint: the hub has no such token" in typo.err
        assert list(gw_dir.iterdir()) == []

        # the technician provisions with it (flags only, as a script would)
        port = term.wait_output(r"127\.0\.0\.1:(\d+)", stream="out").rsplit(":", 1)[1]
        (gw_dir / "cabinet.toml.in").write_text(TEMPLATE.replace("@PORT@", port))
        provisioned = run(
            "provision", "--token", token, "--gateway-id", GW, "--broker", addr,
            "--config", gw_dir / "gateway.toml", "--state-dir", gw_dir / "state",
            "--template", gw_dir / "cabinet.toml.in", "--json",
        )  # fmt: skip
        doc = json.loads(provisioned.out)
        assert doc["ok"] and doc["gateway"] == GW and doc["config_action"] == "created"

        # enrolled: the hub lists it at once, with no batches yet
        stats = _stats(hub_dir)
        assert GW in stats["gateways"]  # type: ignore[operator]

        # the same token again is refused, and the technician is told what to do
        reused = run(
            "provision", "--token", token, "--gateway-id", GW, "--broker", addr,
            "--config", tmp_path / "other.toml", "--state-dir", tmp_path / "other-state",
            expect=1,
        )  # fmt: skip
        assert "token_used" in reused.err and "hint: " in reused.err
        assert not (tmp_path / "other.toml").exists() and not (tmp_path / "other-state").exists()

        # the gateway runs; its batches show up in the operator's stats
        agent = start("run", "--config", gw_dir / "gateway.toml", logs=logs)

        def batches() -> int:
            g = _stats(hub_dir)["gateways"].get(GW, {})  # type: ignore[attr-defined]
            return int(g.get("batches", 0))

        wait_for(f"batches of {GW} at the hub", lambda: batches() >= 2, timeout=40)
        table = run("hub", "--db", "hub.sqlite3", "stats", cwd=hub_dir).out
        row = next(line for line in table.splitlines() if GW in line)
        assert int(re.findall(r"\d+", row.split(GW, 1)[1])[0]) >= 2, table
        assert "rejected: none" in table
    finally:
        if agent is not None:
            agent.stop()
        term.stop(expect=None)
        hub.stop(expect=None)
