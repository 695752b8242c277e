"""Every topic comes from protocols/topics.py, the prefix included: a gateway with
``topic_prefix = "city/v2"`` and a hub started with ``--prefix city/v2`` talk."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from agent.ops.state import create_identity
from drivers.profiles import load_profile
from hub.core import HubCore, Outcome
from hub.stats import hub_stats
from protocols import ed25519, envelope, topics
from protocols.errors import LocalError
from protocols.reading import Quality, Reading
from simulator.broker import MosquittoBroker
from simulator.demo import demo_config
from simulator.harness import agent_with_hub
from simulator.tcp import TcpTerminal

PREFIX = "city/v2"
# an event at the first reading: events travel under the prefix too
ALWAYS = {
    "id": "always",
    "kind": "threshold",
    "device": "noise-1",
    "point": "laeq",
    "above": -1000.0,
    "clear": -2000.0,
}


def test_topics_parse_what_they_build() -> None:
    for kind, build in (
        ("batch", topics.batch),
        ("meta", topics.meta),
        ("event", topics.event),
        ("gap", topics.gap),
        ("status", topics.status),
        ("cmd", topics.cmd),
        ("cmd/result", topics.cmd_result),
    ):
        assert topics.parse(build("gw-1", PREFIX), PREFIX) == ("gw-1", kind)
        assert topics.parse(build("gw-1", PREFIX)) is None  # not under the default prefix
    assert topics.parse(f"{PREFIX}/gw-1/other", PREFIX) is None
    assert topics.enroll_gateway(topics.enroll("gw-1", PREFIX), PREFIX) == "gw-1"
    assert topics.enroll_gateway(topics.enroll_result("gw-1", PREFIX), PREFIX) is None
    with pytest.raises(LocalError, match="topic level"):
        topics.diag("a/b")


def _batch(key: ed25519.PrivateKey, gw: str) -> bytes:
    import time

    now = time.time_ns() // 1_000_000
    readings = [Reading(1, now - 1000 + i, float(i), Quality.GOOD) for i in range(5)]
    return envelope.seal(readings, gateway=gw, epoch=1, seq=0, key=key)


def test_a_core_takes_only_its_prefix(tmp_path: Path) -> None:
    key = ed25519.PrivateKey.generate()
    core = HubCore(tmp_path / "hub.sqlite3", prefix=PREFIX)
    core.enroll("gw-1", key.public_key().public_bytes_raw())
    data = _batch(key, "gw-1")
    assert core.handle(topics.batch("gw-1"), data) is Outcome.IGNORED  # another prefix
    assert core.handle(topics.batch("gw-1", PREFIX), data) is Outcome.STORED
    assert core.handle(topics.batch("gw-2", PREFIX), data) is Outcome.TOPIC_MISMATCH
    assert Outcome.TOPIC_MISMATCH.refused and not Outcome.STORED.refused
    core.close()


@pytest.mark.mosquitto
async def test_a_custom_prefix_end_to_end(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """Agent (topic_prefix city/v2) -> Mosquitto -> hub (prefix city/v2): batches, the
    point table and events stored, nothing refused."""
    term = TcpTerminal(load_profile("sound_level_meter"))
    await term.start()
    try:
        config = demo_config(
            tmp_path / "gw",
            (mosquitto.host, mosquitto.port),
            {"noise-1": term.port},
            max_age_s=0.5,
            rules=[ALWAYS],
        )
        config = dataclasses.replace(
            config, uplink=dataclasses.replace(config.uplink, topic_prefix=PREFIX)
        )
        identity = create_identity(config.gateway.state_dir)
        db = tmp_path / "hub.sqlite3"
        async with agent_with_hub(config, identity, mosquitto.host, mosquitto.port, db) as run:
            await asyncio.sleep(2.5)
    finally:
        await term.stop()
    run.core.close()
    assert run.polled > 0
    stats = hub_stats(db)
    assert stats["rejected"] == {}, stats["rejected"]
    assert stats["readings"] == run.polled
    assert run.hub.results[Outcome.META] >= 1
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT count(*) FROM points").fetchone()[0] > 0
        assert con.execute("SELECT rule FROM events").fetchall() == [("always",)]
    finally:
        con.close()
