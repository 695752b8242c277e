"""agent/service.py wires the reading's path, it does not carry it (issue 20): every
bus hands its readings to :meth:`Batcher.add`, the edge rules look at them inside it,
and the spool takes the batcher's sealed batches off their channel itself
(:meth:`Spool.keep`). docs/architecture.md counts the path without service.py."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from agent.clock import SystemClock
from agent.ops.config import load_config
from agent.ops.state import create_identity
from agent.pipeline.batcher import Batcher
from agent.service import Agent
from protocols import envelope
from protocols.ed25519 import PrivateKey
from protocols.reading import Columns, Quality, Reading

GW = "gw-path"


async def test_a_set_up_agents_buses_hand_their_readings_to_the_batcher(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's own objects, as `_setup` wires them: the poller's sink IS the
    batcher's add, the batcher's observer IS the edge rules'; a reading handed to that
    sink fires the rule, and once the batcher closes, `Spool.keep` has spooled it."""
    cfg_file = tmp_path / "gw.toml"
    cfg_file.write_text(
        f'[gateway]\nid = "{GW}"\nstate_dir = "{tmp_path / "state"}"\n'
        '[spool]\ndurability = "off"\n'
        '[[buses]]\nname = "lan"\nkind = "tcp"\nhost = "127.0.0.1"\n'
        '[[devices]]\nname = "noise-1"\nbus = "lan"\nprofile = "sound_level_meter"\nslave = 1\n'
        '[[rules]]\nid = "loud"\nkind = "threshold"\ndevice = "noise-1"\npoint = "laeq"\n'
        "above = -1000.0\n"
    )
    cfg = load_config(cfg_file)
    create_identity(cfg.gateway.state_dir)
    agent = Agent(cfg)
    await agent._setup()
    batcher, spool, events = agent.batcher, agent.spool, agent.events
    assert batcher is not None and spool is not None and events is not None
    try:
        (poller,) = agent.pollers
        assert poller._sink == batcher.add  # no glue between the bus and the batcher
        assert batcher._observe == events.observe

        (pid,) = [i for i, (d, p) in cfg.points.items() if p.spec.name == "laeq"]
        readings = Columns.of([Reading(pid, int(time.time() * 1000), 70.5, Quality.GOOD)])
        caplog.set_level(logging.DEBUG, logger="agent.pipeline.spool")
        keep = asyncio.create_task(spool.keep(batcher.sealed))
        await poller._sink(readings)
        assert len(events.outbox) == 1 and batcher.readings_in == 1
        await batcher.close()
        await asyncio.wait_for(keep, 30)  # the channel closed and all spooled: it ends
        (row,) = await spool.pending(0, 10)
        assert envelope.parse(row.data).readings() == list(readings)
        assert f"spooled epoch={agent.epoch} seq=0 n=1 t0={readings[0].ts}" in caplog.text
        await asyncio.gather(*events._writes)
        assert len(await spool.events_held()) == 1  # the event's outbox, on disk
    finally:
        await spool.close()


async def test_the_observer_sees_the_readings_before_the_batcher_takes_them() -> None:
    seen: list[tuple[list[Reading], int]] = []
    batcher: Batcher

    def observe(readings: object) -> None:
        assert isinstance(readings, list)
        seen.append((list(readings), batcher.readings_in))

    batcher = Batcher(
        gateway=GW,
        key=PrivateKey.from_private_bytes(bytes(range(1, 33))),
        epoch=1,
        max_readings=2,
        max_age_s=3600.0,
        encoding="msgpack+zlib",
        clock=SystemClock(),
        observe=observe,
    )
    first = [Reading(1, 1_700_000_000_000, 1.0), Reading(2, 1_700_000_000_000, 2.0)]
    await batcher.add(first)
    await batcher.add([Reading(1, 1_700_000_001_000, 3.0)])
    # each call observed whole, before any of it was taken (rules first, as before)
    assert seen == [(first, 0), ([Reading(1, 1_700_000_001_000, 3.0)], 2)]
    (sealed,) = batcher.take(10)  # the first call filled a batch: sealed
    assert sealed.n == 2 and batcher.readings_in == 3
