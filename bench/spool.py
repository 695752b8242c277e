"""Spool and uplink: ``python -m bench.spool [--readings 1000000]``.

1. **Write amplification**, per durability policy (full, normal, off): a fresh
   spool receives the backlog's signed batches one per transaction (as the
   agent appends them when they seal), then every batch is acknowledged in
   the uplink's groups (deleted with no fsync of their own). The process's
   ``write_bytes`` from ``/proc/self/io`` (bytes sent to the block layer, the
   SQLite thread included) is divided by the payload bytes (the signed
   batches' own size), for the append phase, the ack phase and both.
2. **Drain**: the real :class:`~agent.service.Agent`, polling emulated Modbus
   TCP terminals (live readings keep coming), starts with a spool that holds
   a backlog of ``--readings`` readings (batches of 500, like a gateway that
   was offline), a private Mosquitto on 127.0.0.1 and the real hub worker in a
   process of its own, which stores the batches and answers with signed
   receipts (docs/reliability.md). Time runs from the agent's start to the
   receipt that deletes the backlog's last batch (``--puback``: to its PUBACK,
   the old rule, no hub); the live batches sealed meanwhile and their delivery
   are reported too.

Needs the ``mosquitto`` binary. The figures in ``bench/README.md`` say which
machine they came from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from agent.ops.config import parse_config
from agent.ops.state import create_identity, next_epoch, save_hub_key
from agent.pipeline.spool import Spool
from agent.service import Agent
from drivers.profiles import load_profile
from protocols import ed25519, envelope
from protocols.reading import Reading
from simulator.broker import MosquittoBroker
from simulator.tcp import TcpTerminal

GW = "gw-bench-1"
PER_BATCH = 500
POINTS = 50
LIVE_PROFILES = ("sound_level_meter", "weather_station", "gas_detector", "pump_meter")
T0 = 1_780_000_000_000


def _write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def backlog(
    key: ed25519.PrivateKey, epoch: int, readings: int, t0: int = T0
) -> list[tuple[int, int, int, int, bytes]]:
    """Signed batches of ``readings`` realistic readings: 50 points at 1 Hz, random walks,
    from ``t0`` (ms)."""
    rng = random.Random(1)
    level = [rng.uniform(10, 90) for _ in range(POINTS)]
    rows = []
    n_batches = math.ceil(readings / PER_BATCH)
    per_poll = POINTS
    t = t0
    for seq in range(n_batches):
        rs: list[Reading] = []
        while len(rs) < PER_BATCH:
            for p in range(per_poll):
                level[p] += rng.gauss(0, 0.4)  # ~3 B/reading sealed, as bench.wire's demo
                rs.append(Reading(point=p, ts=t, value=round(level[p], 1)))
            t += 1000
        rs = rs[:PER_BATCH]
        data = envelope.seal(rs, gateway=GW, key=key, epoch=epoch, seq=seq)
        rows.append((epoch, seq, len(rs), rs[0].ts, data))
    return rows


async def amplification(
    rows: list[tuple[int, int, int, int, bytes]], durability: str, where: Path
) -> dict[str, Any]:
    payload = sum(len(r[4]) for r in rows)
    spool = await Spool.open(where / f"amp-{durability}.sqlite3", durability=durability)
    w0 = _write_bytes()
    t0 = time.perf_counter()
    for r in rows:
        await spool.append([r])
    t_append = time.perf_counter() - t0
    w1 = _write_bytes()
    ids = [r.id for r in await spool.pending(0, len(rows) + 1)]
    for i in range(0, len(ids), 32):  # PUBACKs arrive in window-sized waves
        spool.ack(ids[i : i + 32])
        await spool.flush_acks()
    await spool.close()  # includes the WAL checkpoint into the database file
    w2 = _write_bytes()
    return {
        "durability": durability,
        "payload_bytes": payload,
        "append_written": w1 - w0,
        "ack_written": w2 - w1,
        "wa_append": round((w1 - w0) / payload, 2),
        "wa_total": round((w2 - w0) / payload, 2),
        "appends_per_s": round(len(rows) / t_append),
    }


def _hub_process(db: str, host: str, port: int, pub: bytes, ready: Any) -> None:
    """The hub worker, in a process of its own (as on its own machine)."""
    from hub.core import HubCore
    from hub.enroll import hub_key_path, load_or_create_hub_key
    from hub.worker import Hub

    async def main() -> None:
        core = HubCore(Path(db))
        core.enroll(GW, pub)
        key = load_or_create_hub_key(hub_key_path(Path(db)))
        hub = Hub(core, host=host, port=port, shared=False, hub_key=key)
        task = asyncio.create_task(hub.run())
        await hub.subscribed.wait()
        ready.set()
        await task

    asyncio.run(main())


async def drain(
    readings: int, where: Path, durability: str, receipts: bool = True
) -> dict[str, Any]:
    state = where / "gw"
    ident = create_identity(state)
    epoch = next_epoch(state)
    # an outage that ended now: the hub takes readings of the last days only
    start = int(time.time() * 1000) - math.ceil(readings / POINTS) * 1000
    rows = backlog(ident.private_key, epoch, readings, start)
    spool = await Spool.open(state / "spool.sqlite3", durability=durability)
    await spool.append(rows)
    await spool.close()
    n_backlog = sum(r[2] for r in rows)

    terms = [TcpTerminal(load_profile(p), seed=i) for i, p in enumerate(LIVE_PROFILES)]
    for t in terms:
        await t.start()
    broker = MosquittoBroker()
    await broker.start()
    hub = None
    if receipts:
        from hub.enroll import hub_key_path, load_or_create_hub_key

        db = where / "hub.sqlite3"
        hub_key = load_or_create_hub_key(hub_key_path(db))
        save_hub_key(state, hub_key.public_key().public_bytes_raw())
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        hub = ctx.Process(
            target=_hub_process,
            args=(str(db), broker.host, broker.port, ident.public_raw, ready),
            daemon=True,
        )
        hub.start()
        if not await asyncio.to_thread(ready.wait, 30):
            raise RuntimeError("the hub worker did not subscribe within 30 s")
    cfg = parse_config(
        {
            "gateway": {"id": GW, "state_dir": str(state)},
            "uplink": {"host": broker.host, "port": broker.port},
            "batch": {"max_age_s": 1.0},
            "spool": {"durability": durability},
            "buses": [
                {"name": f"tcp-{i}", "kind": "tcp", "host": "127.0.0.1", "tcp_port": t.port}
                for i, t in enumerate(terms)
            ],
            "devices": [
                {"name": f"dev-{i}", "bus": f"tcp-{i}", "profile": p, "slave": 1, "interval_s": 0.2}
                for i, p in enumerate(LIVE_PROFILES)
            ],
        },
        source="<bench>",
        base=where,
    )
    agent = Agent(cfg, identity=ident)
    stop = asyncio.Event()
    out: dict[str, Any] = {}
    received = [0]
    subscribed = asyncio.Event()

    async def listen() -> None:  # a plain subscriber: proof that the broker forwarded them
        async with aiomqtt.Client(
            broker.host, broker.port, identifier="bench-sub", max_queued_incoming_messages=0
        ) as c:
            await c.subscribe(f"vitals/v1/{GW}/batch", qos=1)
            subscribed.set()
            async for _ in c.messages:
                received[0] += 1

    try:
        async with asyncio.TaskGroup() as tg:
            sub = tg.create_task(listen(), name="subscriber")
            await subscribed.wait()
            t0 = time.perf_counter()  # from agent start, connect included: conservative
            run = tg.create_task(agent.run(stop), name="agent")
            await agent.ready.wait()
            assert (
                agent.uplink is not None and agent.batcher is not None and agent.spool is not None
            )
            live0 = agent.batcher.readings_in
            # a bench polling a counter: no event to wait on; 5 ms resolution is plenty
            while agent.uplink.backlog_acked < len(rows):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            if receipts:  # until the hub's receipts have deleted the whole backlog
                last = len(rows) - 1
                while await agent.spool.held(epoch, [(0, last)]):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            dt = time.perf_counter() - t0
            live_polled = agent.batcher.readings_in - live0
            up = agent.uplink.statistics()
            await asyncio.sleep(1.5)  # let the live batches of the drain window go out
            stop.set()
            await run
            sub.cancel()
            out = {
                "confirm": "receipt" if receipts else "puback",
                "backlog_readings": n_backlog,
                "backlog_batches": len(rows),
                "drain_s": round(dt, 2),
                "drain_readings_per_s": round(n_backlog / dt),
                "live_readings_polled_meanwhile": live_polled,
                "live_batches_sent_meanwhile": up["live_batches_sent"],
                "live_readings_per_s": round(live_polled / dt),
                "spool_left_after_stop": agent.spool.statistics()["depth_batches"],
                "batches_at_subscriber": received[0],
            }
    finally:
        if hub is not None:
            hub.terminate()
            hub.join(10)
        await broker.stop()
        for t in terms:
            await t.stop()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--durability", default="full", help="policy of the drain run")
    ap.add_argument(
        "--puback", action="store_true", help="drain without a hub: the PUBACK deletes (old rule)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vitals-bench-spool-", dir="/var/tmp") as tmp:
        where = Path(tmp)
        key = ed25519.PrivateKey.from_private_bytes(bytes(32))
        rows = backlog(key, 1, args.readings)
        amp = [await amplification(rows, d, where) for d in ("full", "normal", "off")]
        dr = await drain(args.readings, where, args.durability, receipts=not args.puback)
    payload = amp[0]["payload_bytes"]
    print(f"spool bench on {platform.machine()} {platform.python_version()}, disk under {tmp}")
    print(
        f"backlog: {dr['backlog_readings']} readings in {dr['backlog_batches']} batches, {payload} payload bytes"
    )
    print()
    print(f"{'durability':<11}{'appends/s':>10}{'WA append':>11}{'WA total':>10}{'written':>12}")
    for a in amp:
        print(
            f"{a['durability']:<11}{a['appends_per_s']:>10}{a['wa_append']:>11}{a['wa_total']:>10}"
            f"{a['append_written'] + a['ack_written']:>12}"
        )
    print()
    print(
        f"drain ({args.durability}, {dr['confirm']}): {dr['drain_readings_per_s']} readings/s "
        f"({dr['drain_s']} s), live meanwhile {dr['live_readings_per_s']} readings/s, "
        f"{dr['live_batches_sent_meanwhile']} live batches sent, spool left "
        f"{dr['spool_left_after_stop']}, batches at a subscriber {dr['batches_at_subscriber']}"
    )
    print(json.dumps({"bench": "spool", "amplification": amp, "drain": dr}))


if __name__ == "__main__":
    asyncio.run(main())
